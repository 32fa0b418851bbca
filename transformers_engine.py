"""Rollouts without vLLM: the policy being trained samples its own turns, with torch and transformers alone.

`TransformersEngine` has the interface of engine.VllmEngine (`sampler`, `sleep`, `push_weights`), so train.py and
evaluation.py run the same loop on either (`--engine transformers`, or `auto` where vLLM does not import). There is
no second copy of the weights and nothing to sync: the trainer's model samples, under the trainer's autocast.

A sampler's `wait` samples every turn submitted since the last one, in batches of at most --kv-cache-gb of KV cache:
identical contexts (a tree's M chains, the branches of one parent) are prefilled once, then each row decodes with
a KV cache until it ends (EOS, a stop string, or its token limit) and leaves the batch. Each request draws its
tokens with a torch.Generator of its own seed (the step's generator gives the seeds, as it does vLLM's requests),
by vLLM's rule: argmax(p / q) with q ~ Exp(1). The log-probs returned are the model's own (temperature 1, as vLLM's
default raw_logprobs), so node entropy (§1.2) means the same thing on both engines.
"""

import random
from collections import OrderedDict

import torch

from envs import STOP


class TransformersEngine:
    """The rollout engine on the trainer's own model (`model`, its `tokenizer`)."""

    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args

    def sampler(self, seeds: random.Random, temperature: float) -> "TransformersSampler":
        return TransformersSampler(self, seeds, temperature)

    def sleep(self) -> bool:
        return False  # nothing of its own to free: the weights are the trainer's

    def push_weights(self, model, asleep: bool = False) -> None:
        pass  # it samples with the trainer's weights: always in sync


class TransformersSampler:
    """atpo_tree's sampler interface (submit, wait) on a TransformersEngine."""

    def __init__(self, engine: TransformersEngine, seeds: random.Random, temperature: float):
        self.engine, self.seeds, self.temperature = engine, seeds, temperature
        self.kept = KeptPrefixes(int(engine.args.kv_cache_gb * 2**30))  # of this sampler's turns: one policy's KV
        self.queued: list[tuple[int, list[int], int, int]] = []  # (key, context, max tokens, seed)
        self.submitted = 0

    def submit(self, context: list[int]) -> int:
        args = self.engine.args
        max_tokens = min(args.max_turn_tokens, args.max_length - len(context))
        self.queued.append((self.submitted, list(context), max_tokens, self.seeds.randrange(2**31)))
        self.submitted += 1
        return self.submitted - 1

    def wait(self) -> list[tuple[int, list[int], list[float]]]:
        """Every turn submitted since the last wait: (key, token ids, log-probs) each, in submission order."""
        queued, self.queued = self.queued, []
        done = []
        for batch in kv_batches(queued, kv_bytes_per_token(self.engine.model.config, self.engine.args.dtype),
                                int(self.engine.args.kv_cache_gb * 2**30)):
            turns = sample_turns(self.engine.model, self.engine.tokenizer, [q[1] for q in batch], [q[2] for q in batch],
                                 [q[3] for q in batch], self.temperature, self.engine.args.dtype, self.kept)
            done += [(q[0], ids, logprobs) for q, (ids, logprobs) in zip(batch, turns)]
        return done


def kv_bytes_per_token(config, dtype: str) -> int:
    """Bytes of keys and values one token keeps in the cache, over every layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * (2 if dtype == "bfloat16" else 4)


def kv_batches(queued: list[tuple], bytes_per_token: int, budget: int) -> list[list[tuple]]:
    """The queued requests (key, context, max tokens, seed) in submission order, cut into batches whose KV cache at
    full length (rows x longest context + max tokens) stays within `budget` bytes; a request alone may pass it."""
    batches, longest = [], 0
    for request in queued:
        length = len(request[1]) + request[2]
        if batches and (len(batches[-1]) + 1) * max(longest, length) * bytes_per_token <= budget:
            batches[-1].append(request)
            longest = max(longest, length)
        else:
            batches.append([request])
            longest = length
    return batches


class KeptPrefixes:
    """The KV cache of turns sampled earlier, for a later context that starts with their tokens (the branch's next
    turn, a sibling re-sampled from the same state), so that only what came after is prefilled. Token tuple ->
    per-layer (keys, values), each [heads, tokens, head dim]; the least recently used dropped past `budget` bytes."""

    def __init__(self, budget: int):
        self.entries: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.budget, self.bytes = budget, 0

    def longest(self, context: list[int]) -> tuple[int, list | None]:
        """The longest kept prefix of `context` that leaves it at least one token: (its length, its layers)."""
        for length in sorted({len(key) for key in self.entries if len(key) < len(context)}, reverse=True):
            if (key := tuple(context[:length])) in self.entries:
                self.entries.move_to_end(key)
                return length, self.entries[key]
        return 0, None

    def keep(self, tokens: tuple, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if tokens in self.entries:
            return
        self.entries[tokens] = layers
        self.bytes += size(layers)
        while self.bytes > self.budget and len(self.entries) > 1:
            self.bytes -= size(self.entries.popitem(last=False)[1])


def size(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers)


@torch.no_grad()
def sample_turns(model, tokenizer, contexts: list[list[int]], max_tokens: list[int], seeds: list[int], temperature: float,
                 dtype: str, kept: KeptPrefixes) -> list[tuple[list[int], list[float]]]:
    """One turn after each context: (token ids, the model's log-prob of each), sampled at `temperature` (0: greedy)
    with a generator per row seeded by `seeds`; a row ends at EOS (kept), a stop string (kept) or max_tokens. Each
    turn's KV cache goes into `kept` for the contexts that will continue it."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout; and transformers drops the KV cache of a model training with gradient checkpointing
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):  # the trainer's numerics
            return decode(model, tokenizer, contexts, max_tokens, seeds, temperature, kept, device)
    finally:
        model.train(was_training)


def prefill(model, contexts: list[tuple], kept: KeptPrefixes, pad_id: int, device: torch.device):
    """One forward over what each context adds to its longest kept prefix (that prefix's KV reused, not recomputed).
    A row is [padding | kept prefix | padding | new tokens]: the cache holds the first two, the forward the last two.
    Returns the cache, the attention mask [U, cache length] and each row's last logits [U, V] and position [U]."""
    from transformers import DynamicCache

    reused = [kept.longest(list(c)) for c in contexts]  # (length, layers or None) each
    new = [list(c[n:]) for c, (n, _) in zip(contexts, reused)]
    width, cached = max(map(len, new)), max(n for n, _ in reused)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in new], device=device)  # [U, width]
    positions = torch.tensor([[0] * (width - len(x)) + list(range(n, n + len(x))) for x, (n, _) in zip(new, reused)], device=device)
    mask = torch.tensor([[0] * (cached - n) + [1] * n + [0] * (width - len(x)) + [1] * len(x) for x, (n, _) in zip(new, reused)],
                        device=device)
    cache = DynamicCache(config=model.config)
    if cached:
        like = next(layers for _, layers in reused if layers)[0][0]  # [heads, n, head dim]: shape and dtype of the zeros
        for i in range(model.config.num_hidden_layers):
            keys, values = (torch.stack([padded_left(layers[i][part] if layers else like[:, :0], cached) for _, layers in reused])
                            for part in (0, 1))
            cache.update(keys, values, i)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    return cache, mask, logits, positions[:, -1]


def padded_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[heads, n, head dim] -> [heads, length, head dim], zeros in front."""
    return torch.cat([tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], tensor.shape[2]), tensor], dim=1)


def decode(model, tokenizer, contexts, max_tokens, seeds, temperature, kept, device) -> list[tuple[list[int], list[float]]]:
    """sample_turns' loop: prefill each distinct context once, copy its cache to the rows that share it, then one
    token per live row a forward; a row that ends leaves the batch, its KV cache kept for what continues it."""
    distinct = list(dict.fromkeys(map(tuple, contexts)))
    of_row = torch.tensor([distinct.index(tuple(c)) for c in contexts], device=device)  # [B] -> its distinct context
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache, mask, logits, position = prefill(model, distinct, kept, pad_id, device)
    cache.reorder_cache(of_row)
    logits, mask, position = logits[of_row], mask[of_row], position[of_row]  # [B, V], [B, cache length], [B]

    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    tokens: list[list[int]] = [[] for _ in contexts]
    logprobs: list[list[float]] = [[] for _ in contexts]
    live = list(range(len(contexts)))  # the rows still decoding, in batch order
    while live:
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [b, V]
        if temperature == 0:
            picked = log_probs.argmax(-1)
        else:
            race = torch.stack([torch.empty(log_probs.shape[1], device=device).exponential_(generator=generators[r]) for r in live])
            picked = (torch.softmax(logits.float() / temperature, dim=-1) / race).argmax(-1)  # [b]
        picked_log_probs = log_probs.gather(1, picked[:, None])[:, 0]
        keep = []
        for b, (r, token, lp) in enumerate(zip(live, picked.tolist(), picked_log_probs.tolist())):
            tokens[r].append(token)
            logprobs[r].append(lp)
            ended = (token == tokenizer.eos_token_id or len(tokens[r]) >= max_tokens[r]
                     or any(s in tokenizer.decode(tokens[r], skip_special_tokens=True) for s in STOP))
            if not ended:
                keep.append(b)
            else:  # its cache holds the context and every token of the turn but the last (sampled, never fed)
                real = mask[b].nonzero()[:, 0]
                kept.keep(tuple(contexts[r]) + tuple(tokens[r][:-1]),
                          [(layer.keys[b][:, real], layer.values[b][:, real]) for layer in cache.layers])
        if not keep:
            break
        if len(keep) < len(live):
            kept_rows = torch.tensor(keep, device=device)
            cache.reorder_cache(kept_rows)
            mask, position, picked = mask[kept_rows], position[kept_rows], picked[kept_rows]
        live = [live[b] for b in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        logits = model(input_ids=picked[:, None], attention_mask=mask, position_ids=position[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return list(zip(tokens, logprobs))
