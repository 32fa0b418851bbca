"""The learner: the Hugging Face policy that the loss trains, its log-probs of sampled tokens, and its optimizer step.

`load_policy` registers the attention "atpo_tree" with transformers (block-by-block tree attention in a packed
forward, plain sdpa in every other one). `response_log_probs` gives every response token of a micro-batch its
log-prob, by path (one padded row per trajectory, `token_log_probs`) or by tree (each tree's unique tokens once,
`packed_token_log_probs`): the same numbers either way.
"""

import math
from dataclasses import dataclass

import psutil
import torch

from atpo_credit import backup, token_advantages
from atpo_packing import PackedTrees, pack_trees, tree_attention
from atpo_tree import Trajectory, Tree

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # of the trainer (vLLM picks its own)
TREE_ATTENTION = "atpo_tree"
# bytes kept for the backward per token, layer and hidden unit, measured on the default model (docs/notes.md)
ACTIVATION_BYTES = {"float32": 95, "bfloat16": 70}


@dataclass
class TrainingRow:
    """One trajectory of a step's trees, with its credit: what the update trains on (train.training_rows)."""

    tree: int  # its tree's index in the step's list
    traj: Trajectory
    advantages: torch.Tensor  # [T] float32: each response token's turn advantage (§2.4), 0 on observations
    old_log_probs: torch.Tensor | None = None  # [T] pi_old, kept for the optimizer steps after a batch's first

    def has_model_tokens(self) -> bool:
        return any(self.traj.response_mask)


def tree_credit(tree: Tree, value_mode: str, adv_mode: str) -> tuple[torch.Tensor, torch.Tensor, list[tuple[Trajectory, torch.Tensor]]]:
    """Credit (§2) for one tree from its leaves' rewards: node values, node advantages, and each trajectory with its
    tokens' advantages [T] (§2.4). What train.training_rows and trl_atpo.TreeRollouts train on."""
    rewards = {leaf: tree.nodes[leaf].reward for leaf in tree.leaves()}
    values, node_adv = backup(tree.parents, tree.entropies, rewards, value_mode=value_mode, adv_mode=adv_mode)
    return values, node_adv, [(traj, token_advantages(node_adv.float(), torch.tensor(traj.token_nodes), torch.tensor(traj.response_mask)))
                              for traj in tree.trajectories()]


def pad(rows: list[list], value, dtype: torch.dtype) -> torch.Tensor:
    """Ragged rows -> one [B, max length] tensor, filled with `value`."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


def load_policy(path: str, device: torch.device):
    """The trained policy (HF, float32 master weights) with attention "atpo_tree" (`register_tree_attention`)."""
    from transformers import AutoModelForCausalLM

    register_tree_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=TREE_ATTENTION).to(device)
    model.config.use_cache = False
    return model


def register_tree_attention() -> None:
    """Attention "atpo_tree" for transformers: tree attention in a tree-packed forward (`tree_blocks` given), grouped-
    query SDPA in a sampling forward of transformers_engine (`decoding`), exactly sdpa (same masks, same kernel) in
    every other forward."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, tree_blocks=None, decoding=False, **kwargs):
        with safe_attention(query.device):  # here, not around the forward: a checkpoint's recompute runs in the backward
            if decoding:  # transformers_engine's steps: grouped key/value heads read as they are, not copied per query head
                mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
                causal = mask is None and query.shape[2] > 1  # transformers drops a mask that is plain causal, as for sdpa
                out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                                                       is_causal=causal, enable_gqa=True)
                return out.transpose(1, 2).contiguous(), None  # [B, N, H, D]
            if tree_blocks is None:
                return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
            return tree_attention(query, key, value, tree_blocks, scaling).transpose(1, 2).contiguous(), None  # [B, N, H, D]

    AttentionInterface.register(TREE_ATTENTION, attention)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)


def next_token_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, chunk: int = 4096) -> torch.Tensor:
    """log softmax(lm_head(hidden) / temperature)[target] for each of N positions: hidden [N, H], targets [N] -> [N].
    Over `chunk` positions at a time, each recomputed in the backward: no [N, V] float32 logits tensor is ever kept."""
    head = model.get_output_embeddings()

    def picked(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float() / temperature  # [chunk, V]
        return torch.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0]

    if len(hidden) <= chunk:
        return picked(hidden, targets)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(picked, h, t, use_reentrant=False) for h, t in zip(hidden.split(chunk), targets.split(chunk))])


def token_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, temperature: float,
                    chunk: int = 4096) -> torch.Tensor:
    """log pi(x_t | x_<t) at the sampling temperature for every position t >= 1 with loss_mask 1, else 0.

    input_ids, attention_mask, loss_mask: [B, L] -> float32 [B, L-1] (position t-1 holds token t's log-prob).
    The vocabulary projection runs only on the positions that are trained on.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
    picked = loss_mask[:, 1:].bool()  # [B, L-1]
    picked_log_probs = next_token_log_probs(model, hidden[:, :-1][picked], input_ids[:, 1:][picked], temperature, chunk)
    return torch.zeros(picked.shape, device=hidden.device).masked_scatter(picked, picked_log_probs)


def packed_token_log_probs(model, packed: PackedTrees, temperature: float, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """Tree packing: one forward over every unique token of the trees, with tree attention and path positions;
    log pi of each model token at the sampling temperature, 0 elsewhere. Returns float32 [N]."""
    if model.config._attn_implementation != TREE_ATTENTION:
        raise ValueError(f"tree packing needs the policy loaded by learner.load_policy (attention {TREE_ATTENTION!r}), this "
                         f"model uses {model.config._attn_implementation!r}; or train with --packing path")
    blocks = [(first, end, keys.to(device), mask.to(device)) for first, end, keys, mask in packed.attention_blocks()]
    hidden = model.get_decoder()(input_ids=packed.input_ids[None].to(device), position_ids=packed.position_ids[None].to(device),
                                 tree_blocks=blocks).last_hidden_state[0]  # [N, H]
    picked = packed.loss_mask.bool().to(device)
    picked_log_probs = next_token_log_probs(model, hidden[packed.predictor.to(device)[picked]], packed.input_ids.to(device)[picked],
                                            temperature, chunk)
    return torch.zeros(picked.shape, device=device).masked_scatter(picked, picked_log_probs)


def fit_checkpointing(model, tokens: int, mode: str, dtype: str) -> None:
    """Gradient checkpointing "on", "off", or "auto": on only when the activations a forward over `tokens` tokens
    keeps for the backward would pass the training state (16 bytes a parameter) or half the free memory."""
    on = mode == "on"
    if mode == "auto":
        kept = ACTIVATION_BYTES[dtype] * model.config.num_hidden_layers * model.config.hidden_size * tokens
        training_state = 16 * sum(p.numel() for p in model.parameters())  # float32 weights, gradients, two moments
        free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else psutil.virtual_memory().available
        on = kept > min(training_state, free / 2)
    if on != model.is_gradient_checkpointing:
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()


def response_log_probs(model, unit: list[TrainingRow], trees: list, args, pad_id: int) -> torch.Tensor:
    """log pi of every response token of the unit's rows (train.training_rows): [B, T] float32, junk where the
    response mask is 0. By path, one padded row per trajectory; by tree, the unit's trees packed into one row."""
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        if args.packing == "tree":
            order = list(dict.fromkeys(r.tree for r in unit))  # the unit's trees, in the order of its rows
            leaves = [[r.traj.leaf for r in unit if r.tree == t] for t in order]
            if [(r.tree, r.traj.leaf) for r in unit] != [(t, leaf) for t, ls in zip(order, leaves) for leaf in sorted(ls)]:
                raise ValueError("tree packing needs each tree's rows together, in leaf order")
            packed = pack_trees([trees[t] for t in order], leaves)
            fit_checkpointing(model, len(packed.input_ids), args.gradient_checkpointing, args.dtype)
            flat = packed_token_log_probs(model, packed, args.temperature, DEVICE, args.logprob_chunk)  # [N]
            return flat[pad(packed.rows, 0, torch.long).to(DEVICE)]
        prompts = [trees[r.tree].prompt_ids for r in unit]
        ids = [p + r.traj.response_ids for p, r in zip(prompts, unit)]
        loss_mask = [[0] * len(p) + r.traj.response_mask for p, r in zip(prompts, unit)]
        fit_checkpointing(model, len(ids) * max(map(len, ids)), args.gradient_checkpointing, args.dtype)
        full = token_log_probs(model, pad(ids, pad_id, torch.long).to(DEVICE), pad([[1] * len(i) for i in ids], 0, torch.long).to(DEVICE),
                               pad(loss_mask, 0, torch.long).to(DEVICE), args.temperature, args.logprob_chunk)  # [B, L-1]
        index = [[len(p) - 1 + j for j in range(len(r.traj.response_ids))] for p, r in zip(prompts, unit)]
        return full.gather(1, pad(index, 0, torch.long).to(DEVICE))


def safe_attention(device: torch.device):
    """On CUDA, masked attention by the memory-efficient or the math kernel, never cuDNN's: with a boolean mask it has
    given NaN gradients at some lengths on Hopper (pytorch#196678). A no-op on the CPU."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def micro_batches(groups: list[list[TrainingRow]], trees: list, args) -> list[list[TrainingRow]]:
    """The rows of `groups` (a whole tree's rows each with tree packing, one trajectory each by path) in forward/backward
    units: --micro-batch groups each, or with --micro-batch-tokens as many as fit that many tokens, a tree larger
    than that split along its paths (shared turns then computed once per piece; the same gradient)."""
    if args.micro_batch_tokens == 0:
        return [sum(groups[i : i + args.micro_batch], []) for i in range(0, len(groups), args.micro_batch)]
    budget, by_tree = args.micro_batch_tokens, args.packing == "tree"

    def added(tree, leaf: int, seen: set) -> int:  # tokens a leaf's path adds to a piece that holds the nodes `seen`
        fresh = [n for n in tree.path(leaf) if n not in seen]
        return (0 if seen else len(tree.prompt_ids)) + sum(len(tree.nodes[n].token_ids) + len(tree.nodes[n].obs_ids) for n in fresh)

    pieces = []  # (rows, tokens): each group's rows in order, a tree cut where its next path would pass the budget
    for group in groups:
        piece, seen, size = [], set(), 0
        for row in group:
            tree, leaf = trees[row.tree], row.traj.leaf
            if piece and size + added(tree, leaf, seen) > budget:
                pieces.append((piece, size))
                piece, seen, size = [], set(), 0
            size += added(tree, leaf, seen)
            piece.append(row)
            seen.update(tree.path(leaf))
        pieces.append((piece, size))
    units, sizes = [], []  # sizes: a unit's tokens; by path its longest row (padded rows cost rows x longest)
    for rows, tokens in pieces:
        grown = (sizes[-1] + tokens if by_tree else (len(units[-1]) + len(rows)) * max(sizes[-1], tokens)) if units else None
        if grown is not None and grown <= budget:
            units[-1] += rows
            sizes[-1] = grown if by_tree else max(sizes[-1], tokens)
        else:
            units.append(list(rows))
            sizes.append(tokens)
    return units


# optimizer state bytes per parameter (beside the float32 weights and gradients, 8 bytes): memory.py's table
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}


def adamw(params, lr: float, kind: str = "adamw") -> torch.optim.Optimizer:
    """The RL optimizer: AdamW, fused (one kernel for every parameter; the same step as the for-loop AdamW) with two
    float32 moments, or bitsandbytes' 8-bit AdamW (its moments block-quantized to one byte each)."""
    if kind == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, fused=True)


def keep_old_log_probs(model, minibatch: list[list[TrainingRow]], trees: list, args, pad_id: int) -> None:
    """pi_old (§3.6) of the rows an optimizer step after the batch's first trains on: their log-probs under the weights
    that sampled them, taken before the first step changes those weights."""
    with torch.no_grad():
        for unit in micro_batches(minibatch, trees, args):
            for row, old in zip(unit, response_log_probs(model, unit, trees, args, pad_id).cpu()):
                row.old_log_probs = old[: len(row.traj.response_ids)]


def padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-row 1-D tensors -> one [B, max length] tensor on DEVICE, zeros behind."""
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(DEVICE)


def sampler_gap(unit: list[TrainingRow], log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |sampler's log-prob - trainer's| over the unit's model tokens: what the weight sync and the two engines'
    numerics leave between them (log_probs, mask: [B, T])."""
    sampler = pad([r.traj.sampler_logprobs for r in unit], 0.0, torch.float32).to(DEVICE)
    return ((sampler - log_probs.detach()).abs() * mask).sum().item() / max(mask.sum().item(), 1)


def fill_missing_gradients(model) -> None:
    """Zeros for the parameters no micro-batch gave a gradient (every unit skipped): AdamW then steps on zeros, as it
    would have had they run."""
    for param in model.parameters():
        if param.grad is None:
            param.grad = torch.zeros_like(param)


def clip_and_step(model, optimizer, max_grad_norm: float) -> float:
    """Clip the gradient norm and step, unless the gradient holds a NaN or inf (one such step would ruin every
    weight). Returns the norm before clipping (non-finite when the step was skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
    if math.isfinite(norm):
        optimizer.step()
    return norm
