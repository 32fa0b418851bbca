"""Rollouts without vLLM: the policy being trained samples its own turns, with torch and transformers alone.

`TransformersEngine` has the interface of engine.VllmEngine (`sampler`, `sleep`, `push_weights`), so train.py and
evaluation.py run the same loop on either (`--engine transformers`, or `auto` where vLLM is not installed). There is
no second copy of the weights and nothing to sync: the trainer's model samples, under the trainer's autocast.

Like vLLM, a sampler keeps one running batch: a turn submitted joins it at the next step (its context prefilled in a
forward of its own, then merged in), every live row gets one token a forward, and a row leaves the batch the moment
its turn ends (EOS, a stop string, or its token limit), which `wait` returns. Nothing is prefilled twice: identical
contexts (a tree's M chains) are computed once, and a context that continues an earlier turn (the branch's next turn,
a sibling re-sampled from the same state) reuses that turn's KV cache. Each request draws its tokens with a
torch.Generator of its own seed (the step's generator gives the seeds, as to vLLM's requests). The log-probs returned
are the model's own (temperature 1, as vLLM's default raw_logprobs), so node entropy (§1.2) means the same thing on
both engines.
"""

import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicLayer

from envs import STOP
from memory import release_freed_memory

PREFILL_TOKENS = 8192  # joining rows x their widest new part that one prefill may hold: bounds its activations
Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) of some tokens, each [heads, tokens, head dim]


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


@dataclass
class Row:
    """One submitted turn: its request and what has been sampled of it."""

    key: int
    context: list[int]
    max_tokens: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


class KeptPrefixes:
    """The KV cache of turns sampled earlier, for a later context that starts with their tokens: token tuple ->
    Layers; the least recently used dropped past `budget` bytes."""

    def __init__(self, budget: int):
        self.entries: OrderedDict[tuple, Layers] = OrderedDict()
        self.budget, self.bytes = budget, 0

    def longest(self, context: list[int]) -> tuple[int, Layers | None]:
        """The longest kept prefix of `context` that leaves it at least one token: (its length, its layers)."""
        for length in sorted({len(key) for key in self.entries if len(key) < len(context)}, reverse=True):
            if (key := tuple(context[:length])) in self.entries:
                self.entries.move_to_end(key)
                return length, self.entries[key]
        return 0, None

    def keep(self, tokens: tuple, layers: Layers) -> None:
        if tokens not in self.entries:
            self.entries[tokens] = layers
            self.bytes += sum(k.nbytes + v.nbytes for k, v in layers)
        while self.bytes > self.budget and len(self.entries) > 1:
            self.bytes -= sum(k.nbytes + v.nbytes for k, v in self.entries.popitem(last=False)[1])


class TransformersSampler:
    """atpo_tree's sampler interface (submit, wait) on a TransformersEngine: one running batch of rows."""

    def __init__(self, engine: TransformersEngine, seeds: random.Random, temperature: float):
        self.model, self.tokenizer, self.args = engine.model, engine.tokenizer, engine.args
        self.seeds, self.temperature = seeds, temperature
        self.device = next(self.model.parameters()).device
        self.budget = int(self.args.kv_cache_gb * 2**30)
        self.bytes_per_token = kv_bytes_per_token(self.model.config, self.args.dtype)
        self.kept = KeptPrefixes(self.budget)  # of this sampler's turns: one policy's KV
        self.queued: list[Row] = []
        self.rows: list[Row] = []  # the running batch, in batch order
        self.cache = self.mask = self.position = self.picked = None  # its KV cache, [B, cache length], [B], [B]
        self.submitted = 0

    def submit(self, context: list[int]) -> int:
        max_tokens = min(self.args.max_turn_tokens, self.args.max_length - len(context))
        generator = torch.Generator(self.device).manual_seed(self.seeds.randrange(2**31))
        self.queued.append(Row(self.submitted, list(context), max_tokens, generator))
        self.submitted += 1
        return self.submitted - 1

    def wait(self) -> list[tuple[int, list[int], list[float]]]:
        """Forwards until one or more turns end: (key, token ids, log-probs) each."""
        was_training = self.model.training
        self.model.eval()  # no dropout; and transformers drops the KV cache of a model training with gradient checkpointing
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.dtype == "bfloat16"):
                while self.rows or self.queued:
                    logits = self.forward()
                    ended = self.sample(logits)
                    if ended:
                        return [(row.key, row.tokens, row.logprobs) for row in ended]
                return []
        finally:
            self.model.train(was_training)

    def forward(self) -> torch.Tensor:
        """One decoding step of the running rows (their last sampled tokens), and the queued turns that fit prefilled in
        a forward of their own, then merged into the batch. Returns the next-token logits of every row, [B, V]."""
        logits = []
        if self.rows:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            self.position = self.position + 1
            logits.append(self.model(input_ids=self.picked[:, None], attention_mask=self.mask, position_ids=self.position[:, None],
                                     past_key_values=self.cache, use_cache=True, decoding=True).logits[:, -1])
        joining = self.joining()
        if joining:  # each distinct context once: its longest kept prefix's cache, then the rest of its tokens
            distinct = list(dict.fromkeys(tuple(row.context) for row in joining))
            parts = [(layers, list(c[n:])) for c in distinct for n, layers in [self.kept.longest(list(c))]]
            cache, mask, position, new_logits = prefill(self.model, parts, self.tokenizer, self.args.max_turn_tokens, self.device)
            of_row = torch.tensor([distinct.index(tuple(row.context)) for row in joining], device=self.device)
            cache.reorder_cache(of_row)
            if self.rows:
                self.cache, self.mask = merged(self.cache, self.mask, cache, mask[of_row], self.args.max_turn_tokens)
                self.position = torch.cat([self.position, position[of_row]])
            else:
                self.cache, self.mask, self.position = cache, mask[of_row], position[of_row]
            logits.append(new_logits[of_row])
            self.rows += joining
        release_freed_memory()  # freed caches and activations back to the OS (else a long evaluation's heap only grows)
        return torch.cat(logits)

    def joining(self) -> list[Row]:
        """The queued turns that join the batch now, in order: while the batch's KV cache at full length fits the
        budget and their prefill (rows x the longest part not kept) PREFILL_TOKENS; into an empty batch at least one."""
        joining, widest = [], 0
        longest = max((len(r.context) + r.max_tokens for r in self.rows), default=0)
        while self.queued:
            row = self.queued[0]
            longest = max(longest, len(row.context) + row.max_tokens)
            widest = max(widest, len(row.context) - self.kept.longest(row.context)[0])
            fits = ((len(self.rows) + len(joining) + 1) * longest * self.bytes_per_token <= self.budget
                    and (len(joining) + 1) * widest <= PREFILL_TOKENS)
            if not fits and (self.rows or joining):
                break
            joining.append(self.queued.pop(0))
        return joining

    def row_cache(self, b: int) -> Layers:
        """Row b's keys and values at its real positions (the batch's padding left out)."""
        real = self.mask[b].nonzero()[:, 0]
        return [(layer.keys[b][:, real], layer.values[b][:, real]) for layer in self.cache.layers]

    def select(self, rows: torch.Tensor) -> None:
        """Keep these rows of the batch (a row may be taken twice), in this order."""
        self.cache.reorder_cache(rows)
        self.mask, self.position = self.mask[rows], self.position[rows]

    def sample(self, logits: torch.Tensor) -> list[Row]:
        """One token for every row from its next-token logits [B, V]; the rows whose turn ended leave the batch (their
        KV cache kept for what continues them). Returns those."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
        if self.temperature == 0:
            picked = log_probs.argmax(-1)
        else:  # inverse transform sampling: each row's one uniform draw from its own generator, located in its CDF
            cdf = torch.softmax(logits.float() / self.temperature, dim=-1).cumsum(-1)  # [B, V]
            uniform = torch.cat([torch.rand(1, generator=row.generator, device=self.device) for row in self.rows])  # [B]
            picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.shape[1] - 1)
        ended, going = [], []
        for b, (row, token, lp) in enumerate(zip(self.rows, picked.tolist(), log_probs.gather(1, picked[:, None])[:, 0].tolist())):
            row.tokens.append(token)
            row.logprobs.append(lp)
            if (token == self.tokenizer.eos_token_id or len(row.tokens) >= row.max_tokens
                    or any(s in self.tokenizer.decode(row.tokens, skip_special_tokens=True) for s in STOP)):
                ended.append(row)  # its cache holds the context and the turn but its last token (sampled, never fed)
                self.kept.keep(tuple(row.context + row.tokens[:-1]), self.row_cache(b))
            else:
                going.append(b)
        if ended and going:
            self.select(torch.tensor(going, device=self.device))
        self.rows, self.picked = [self.rows[b] for b in going], picked[going]
        return ended


class SpareLayer(DynamicLayer):
    """transformers' DynamicLayer with room for `spare` more tokens behind its keys and values: a decoding step writes
    its token in place instead of copying the whole cache into a longer one, as DynamicLayer's concatenation does."""

    def __init__(self, spare: int):
        super().__init__()
        self.spare = spare

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.key_room = self.value_room = None
        old = self.get_seq_length()
        new = old + key_states.shape[-2]
        if self.key_room is None or new > self.key_room.shape[-2]:  # a room of new + spare tokens, what was kept copied in
            self.key_room, self.value_room = self.room(self.keys, key_states, old, new), self.room(self.values, value_states, old, new)
        self.key_room[:, :, old:new] = key_states
        self.value_room[:, :, old:new] = value_states
        self.keys, self.values = self.key_room[:, :, :new], self.value_room[:, :, :new]
        return self.keys, self.values

    def room(self, kept: torch.Tensor, fresh: torch.Tensor, old: int, new: int) -> torch.Tensor:
        room = fresh.new_empty(*fresh.shape[:2], new + self.spare, fresh.shape[3])
        if old:
            room[:, :, :old] = kept
        return room

    def reorder_cache(self, rows: torch.LongTensor) -> None:
        length = self.get_seq_length()
        self.key_room, self.value_room = self.key_room.index_select(0, rows), self.value_room.index_select(0, rows)
        self.keys, self.values = self.key_room[:, :, :length], self.value_room[:, :, :length]


def prefill(model, parts: list[tuple[Layers | None, list[int]]], tokenizer, spare: int, device: torch.device):
    """One forward over rows given as (the KV cache of a row's first tokens or None, its next tokens): each row is
    [padding | cached tokens | padding | next tokens], the cache holding the first two parts, the forward the last two.
    The cache has room for `spare` more tokens. Returns it, the attention mask [U, cache length], each row's last
    position [U] and last logits [U, V]."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cached = [layers[0][0].shape[1] if layers else 0 for layers, _ in parts]
    width, length = max(len(ids) for _, ids in parts), max(cached)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for _, x in parts], device=device)  # [U, width]
    positions = torch.tensor([[0] * (width - len(x)) + list(range(n, n + len(x))) for (_, x), n in zip(parts, cached)], device=device)
    mask = torch.tensor([[0] * (length - n) + [1] * n + [0] * (width - len(x)) + [1] * len(x) for (_, x), n in zip(parts, cached)],
                        device=device)
    cache = Cache(layers=[SpareLayer(spare) for _ in range(model.config.num_hidden_layers)])
    if length:
        like = next(layers for layers, _ in parts if layers)[0][0]  # [heads, n, head dim]: the zeros' shape and dtype
        for i in range(model.config.num_hidden_layers):
            keys, values = (torch.stack([left_padded(layers[i][part] if layers else like[:, :0], length, dim=1) for layers, _ in parts])
                            for part in (0, 1))
            cache.update(keys, values, i)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=1, decoding=True).logits[:, -1]
    return cache, mask, positions[:, -1], logits


def merged(a: Cache, mask_a: torch.Tensor, b: Cache, mask_b: torch.Tensor, spare: int) -> tuple[Cache, torch.Tensor]:
    """Two batches as one: the rows of `a`, then those of `b`, each left-padded to the longer cache (room for `spare`
    more tokens). Returns the cache and its attention mask."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    cache = Cache(layers=[SpareLayer(spare) for _ in a.layers])
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        cache.update(torch.cat([left_padded(x.keys, length, dim=2), left_padded(y.keys, length, dim=2)]),
                     torch.cat([left_padded(x.values, length, dim=2), left_padded(y.values, length, dim=2)]), i)
    return cache, torch.cat([left_padded(mask_a, length, dim=1), left_padded(mask_b, length, dim=1)])


def left_padded(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros in front along `dim` up to `length`."""
    shape = list(tensor.shape)
    shape[dim] = length - shape[dim]
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def kv_bytes_per_token(config, dtype: str) -> int:
    """Bytes of keys and values one token keeps in the cache, over every layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * (2 if dtype == "bfloat16" else 4)
