"""Tree packing: the learner's forward over every trajectory of a tree in one row, each shared prefix computed once.

A tree's trajectories share their prompt and early turns. Path by path (one padded row per root -> leaf path) every
shared token is recomputed once per leaf; packed, each node's tokens appear once, depth first, and a tree attention
mask gives every token exactly the context it had in its own trajectory. For the tree P -> A -> C, P -> B (prompt
P = p1 p2, turns A = a1 a2, B = b1, C = c1; leaves C and B):

    packed      p1 p2 a1 a2 c1 b1       query row, key column: x where the query may attend
    position     0  1  2  3  4  2       (b1 sits where a1 does: both follow the prompt)
    predictor    -  p1 p2 a1 a2 p2       (a node's first token is predicted by its parent's last token)

              p1 p2 a1 a2 c1 b1
        p1     x
        p2     x  x
        a1     x  x  x
        a2     x  x  x  x
        c1     x  x  x  x  x
        b1     x  x           x        (b1 does not see its sibling's turn a1 a2 nor c1)

`tree_attention` computes attention block by block (one block per node, its queries against the keys it may see),
so the masked-out part costs nothing; `load_policy` registers it with transformers under the name "atpo_tree"
(every forward without tree blocks stays plain sdpa). `packed_token_log_probs` then gives each trajectory the same
log-probs as `token_log_probs` on its own padded row: the same loss and gradient, fewer tokens.

torch + transformers (and psutil, for the free memory); it reads finished trees of atpo_tree.py (`Tree.nodes`, `parents`, `leaves`, `path`).
"""

from dataclasses import dataclass

import psutil
import torch

from atpo_tree import Tree, children_lists


def pad(rows: list[list], value, dtype: torch.dtype) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


@dataclass
class PackedTrees:
    """Several trees laid out as one row of unique tokens, for one forward pass over every trajectory.

    Every node's tokens appear once (depth-first, each tree after the previous one); a token sees the tokens of
    its own node up to itself and every token of its ancestors (`attention_mask`), and sits at its position along
    its root -> leaf path (`position_ids`). Token t of a trajectory is predicted by the logits at `predictor`:
    the previous token of its node, or for a node's first token the last token of its parent (the same position
    for all siblings).
    """

    input_ids: torch.Tensor  # [N] long
    position_ids: torch.Tensor  # [N] long
    node_ids: torch.Tensor  # [N] long, a global node index (trees numbered one after another)
    loss_mask: torch.Tensor  # [N] long, 1 on model tokens of turns
    predictor: torch.Tensor  # [N] long, the position whose logits predict this token (-1 for each tree's first)
    ancestors: torch.Tensor  # [nodes, nodes] bool, ancestors[a, b]: b is a or an ancestor of a, in the same tree
    rows: list[list[int]]  # per trajectory (trees in order, leaves in index order): positions of its response

    def attention_mask(self) -> torch.Tensor:
        """[N, N] bool, True where query token i may attend key token j."""
        n = len(self.input_ids)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        return self.ancestors[self.node_ids][:, self.node_ids] & causal

    def attention_blocks(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """The tree mask cut into one block per node, for `tree_attention`: (first, end, keys, mask) where the node's
        tokens are first..end-1, `keys` [K] the positions its last token may attend (its ancestors' tokens and its
        own) and `mask` [end - first, K] the mask of those rows and columns. Outside the blocks the mask is False."""
        mask = self.attention_mask()
        bounds = [0] + (torch.nonzero(self.node_ids[1:] != self.node_ids[:-1])[:, 0] + 1).tolist() + [len(self.node_ids)]
        blocks = []
        for first, end in zip(bounds[:-1], bounds[1:]):
            keys = torch.nonzero(mask[end - 1])[:, 0]
            blocks.append((first, end, keys, mask[first:end][:, keys]))
        return blocks


def tree_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   blocks: list[tuple[int, int, torch.Tensor, torch.Tensor]], scale: float | None = None) -> torch.Tensor:
    """Attention under the tree mask, computed block by block: each node's queries against only the keys it may see,
    so the masked-out part of the N x N scores (siblings, cousins, later tokens) costs nothing.
    query [B, Hq, N, D], key and value [B, Hkv, N, D] (Hq a multiple of Hkv), blocks from `attention_blocks`.
    Returns [B, Hq, N, D]. The blocks must be on the tensors' device."""
    # every block's keys gathered at once: one gradient scatter in the backward instead of one full-size [N] per block
    # (a default update 3 % faster on a 2-core CPU)
    keys = torch.cat([block_keys for _, _, block_keys, _ in blocks])
    sizes = [len(block_keys) for _, _, block_keys, _ in blocks]
    block_key_rows, block_value_rows = key.index_select(2, keys).split(sizes, 2), value.index_select(2, keys).split(sizes, 2)
    outputs = []
    for (first, end, _, mask), k, v in zip(blocks, block_key_rows, block_value_rows):
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            query[:, :, first:end], k, v, attn_mask=mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1]))
    return torch.cat(outputs, dim=2)


def pack_trees(trees: list[Tree]) -> PackedTrees:
    """Lay finished trees out for a tree-masked forward pass (each shared prefix computed once)."""
    ids, positions, nodes, loss, predictor, rows = [], [], [], [], [], []
    parents_global: list[int] = []
    for tree in trees:
        offset = len(parents_global)
        parents_global += [p + offset if p >= 0 else -1 for p in tree.parents]
        children = children_lists(tree.parents)
        last_position = {}  # node -> packed position of its last token (where its children's first token is predicted)
        start_of = {}  # node -> packed position of its first token
        depth_after = {}  # node -> path length in tokens after the node
        stack = [0]
        while stack:  # depth-first, children in index order
            node = stack.pop()
            stack += reversed(children[node])
            tokens = tree.prompt_ids if node == 0 else tree.nodes[node].token_ids + tree.nodes[node].obs_ids
            parent = tree.nodes[node].parent
            first_position = 0 if node == 0 else depth_after[parent]
            start_of[node] = len(ids)
            for i, token in enumerate(tokens):
                ids.append(token)
                positions.append(first_position + i)
                nodes.append(node + offset)
                loss.append(int(node > 0 and i < len(tree.nodes[node].token_ids)))
                if i > 0:
                    predictor.append(len(ids) - 2)
                else:
                    predictor.append(last_position[parent] if node > 0 else -1)
            if not tokens:
                raise ValueError(f"node {node} has no tokens: nothing can predict its children")
            last_position[node] = len(ids) - 1
            depth_after[node] = first_position + len(tokens)
        for leaf in tree.leaves():
            row = []
            for n in tree.path(leaf):
                row += range(start_of[n], start_of[n] + len(tree.nodes[n].token_ids) + len(tree.nodes[n].obs_ids))
            rows.append(row)
    ancestors = torch.zeros(len(parents_global), len(parents_global), dtype=torch.bool)
    for node in range(len(parents_global)):
        a = node
        while a >= 0:
            ancestors[node, a] = True
            a = parents_global[a]
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedTrees(as_long(ids), as_long(positions), as_long(nodes), as_long(loss), as_long(predictor), ancestors, rows)


def token_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(x_t | x_<t) at the sampling temperature for every position t >= 1 with loss_mask 1, else 0.

    input_ids, attention_mask, loss_mask: [B, L] -> float32 [B, L-1] (position t-1 holds token t's log-prob).
    The vocabulary projection runs only on the positions that are trained on.
    """
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
    picked = loss_mask[:, 1:].bool()  # [B, L-1]
    picked_log_probs = next_token_log_probs(model, hidden[:, :-1][picked], input_ids[:, 1:][picked], temperature)
    return torch.zeros(picked.shape, device=hidden.device).masked_scatter(picked, picked_log_probs)


def next_token_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(lm_head(hidden) / temperature)[target] for each of N positions: hidden [N, H], targets [N]."""
    logits = model.get_output_embeddings()(hidden).float() / temperature  # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


TREE_ATTENTION = "atpo_tree"


def load_policy(path: str, device: torch.device):
    """The trained policy (HF, fp32) with attention "atpo_tree": block-by-block tree attention in a tree-packed
    forward (`tree_blocks` given), exactly sdpa (same masks, same kernel) in every other forward."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, tree_blocks=None, **kwargs):
        if tree_blocks is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        return tree_attention(query, key, value, tree_blocks, scaling).transpose(1, 2).contiguous(), None  # [B, N, H, D]

    AttentionInterface.register(TREE_ATTENTION, attention)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=TREE_ATTENTION).to(device)


# bytes kept for the backward per token, layer and hidden unit, measured on the default model (2,048 tokens, peak
# above the loaded model less the gradients): fp32 3,680 - 540 MiB, bf16 autocast 2,887 - 540 MiB
ACTIVATION_BYTES = {"float32": 95, "bfloat16": 70}


def fit_checkpointing(model, tokens: int, mode: str, dtype: str) -> None:
    """Gradient checkpointing on or off for a forward over `tokens` tokens in `dtype` ("float32" / "bfloat16" autocast):
    mode "on", "off", or "auto": on only when the activations kept for the backward would take more than the
    training state itself (float32 weights, gradients and two AdamW moments: 16 bytes a parameter) or more than half
    the free memory, so that activations never dominate the step's memory."""
    on = mode == "on"
    if mode == "auto":
        kept = ACTIVATION_BYTES[dtype] * model.config.num_hidden_layers * model.config.hidden_size * tokens
        training_state = 16 * sum(p.numel() for p in model.parameters())
        free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else psutil.virtual_memory().available
        on = kept > min(training_state, free / 2)
    if on != model.is_gradient_checkpointing:
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()


def packed_token_log_probs(model, packed: PackedTrees, temperature: float, device: torch.device) -> torch.Tensor:
    """Tree packing: one forward over every unique token of the trees, with tree attention and path positions;
    log pi of each model token at the sampling temperature, 0 elsewhere. Returns float32 [N]."""
    if model.config._attn_implementation != TREE_ATTENTION:
        raise ValueError(f"tree packing needs the policy loaded by atpo_packing.load_policy (attention {TREE_ATTENTION!r}), this "
                         f"model uses {model.config._attn_implementation!r}; or train with --packing path")
    blocks = [(first, end, keys.to(device), mask.to(device)) for first, end, keys, mask in packed.attention_blocks()]
    hidden = model.get_decoder()(input_ids=packed.input_ids[None].to(device), position_ids=packed.position_ids[None].to(device),
                                 tree_blocks=blocks).last_hidden_state[0]  # [N, H]
    picked = packed.loss_mask.bool().to(device)
    picked_log_probs = next_token_log_probs(model, hidden[packed.predictor.to(device)[picked]], packed.input_ids.to(device)[picked], temperature)
    return torch.zeros(picked.shape, device=device).masked_scatter(picked, picked_log_probs)
