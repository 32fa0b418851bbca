"""Rollouts without vLLM: the policy being trained samples its own turns, with torch and transformers alone.

`TransformersEngine` has the interface of engine.VllmEngine (`sampler`, `sleep`, `push_weights`), so train.py and
evaluation.py run the same loop on either (`--engine transformers`, or `auto` where vLLM is not installed). There is
nothing to sync: the trainer's model samples, under the trainer's autocast (its linear layers' bfloat16 weights, which
autocast would cast at every forward, cast once a sampler and dropped with it; on a CPU also laid out once in oneDNN's
blocked format, which torch's bfloat16 product would redo at every call).

Like vLLM, a sampler keeps one running batch: a turn submitted joins it at the next step (its context prefilled in a
forward of its own, then written in below the running rows), every live row gets one token a forward, and a row leaves
the batch the moment its turn ends (EOS, a stop string, or its token limit), which `wait` returns. Nothing is
prefilled twice: identical contexts (a tree's M chains) are computed once, and a context that continues an earlier
turn (the branch's next turn, a sibling re-sampled from the same state) reuses that turn's KV cache. Each request
draws its tokens with a torch.Generator of its own seed (the step's generator gives the seeds, as to vLLM's requests).
The log-probs returned are the model's own (temperature 1, as vLLM's default raw_logprobs), so node entropy (§1.2)
means the same thing on both engines.
"""

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

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
        self.bfloat16 = self.args.dtype == "bfloat16"  # under the trainer's autocast, as its forwards
        self.linears = bfloat16_linears(self.model, self.device) if self.bfloat16 else {}  # their forwards in a wait
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
        for module, forward in self.linears.items():
            module.forward = forward  # over the class's forward, until this wait returns
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16):
                while self.rows or self.queued:
                    logits = self.forward()
                    ended = self.sample(logits)
                    if ended:
                        return [(row.key, row.tokens, row.logprobs) for row in ended]
                return []
        finally:
            for module in self.linears:
                del module.forward
            self.model.train(was_training)

    def forward(self) -> torch.Tensor:
        """One decoding step of the running rows (their last sampled tokens), and the queued turns that fit prefilled in
        a forward of their own, then written into the batch. Returns the next-token logits of every row, [B, V]."""
        logits = []
        if self.rows:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            self.position = self.position + 1
            mask = additive(self.mask, torch.bfloat16 if self.bfloat16 else self.model.dtype)  # [B, 1, 1, L]
            logits.append(self.model(input_ids=self.picked[:, None], attention_mask=mask, position_ids=self.position[:, None],
                                   past_key_values=self.cache, use_cache=True, decoding=True).logits[:, -1])
        joining = self.joining()
        if joining:  # each distinct context once: its longest kept prefix's cache, then the rest of its tokens
            distinct = list(dict.fromkeys(tuple(row.context) for row in joining))
            parts = [(layers, list(c[n:])) for c in distinct for n, layers in [self.kept.longest(list(c))]]
            cache, mask, position, new_logits = prefill(self.model, parts, self.tokenizer, self.args.max_turn_tokens, self.device)
            of_row = torch.tensor([distinct.index(tuple(row.context)) for row in joining], device=self.device)
            cache.reorder_cache(of_row)
            if self.rows and self.cache.layers[0].can_add(len(joining), mask.shape[1]):  # below the running rows, in place
                for layer, new in zip(self.cache.layers, cache.layers):
                    layer.add_rows(new.keys, new.values)
                self.mask = torch.cat([self.mask, left_padded(mask[of_row], self.mask.shape[1], dim=1)])
            elif self.rows:  # into a larger room: twice the rows while the budget holds them at full length
                longest = max(len(row.context) + row.max_tokens for row in self.rows + joining)
                rows_room = min(2 * (len(self.rows) + len(joining)), self.budget // (longest * self.bytes_per_token))
                self.cache, self.mask = merged(self.cache, self.mask, cache, mask[of_row], self.args.max_turn_tokens, rows_room)
            else:
                self.cache, self.mask = cache, mask[of_row]
            self.position = torch.cat([self.position, position[of_row]]) if len(self.rows) else position[of_row]
            logits.append(new_logits[of_row])
            self.rows += joining
            release_freed_memory()  # the replaced cache and the prefill's activations back to the OS (else the heap only grows)
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

    def drop(self, gone: list[int]) -> None:
        """These rows leave the batch: the last row moves into each freed place (one row's cache copied, not all)."""
        for b in sorted(gone, reverse=True):  # the rows behind b have left already or moved in from behind
            last = len(self.rows) - 1
            if b != last:
                for layer in self.cache.layers:
                    layer.move_row(last, b)
                for tensor in (self.mask, self.position, self.picked):
                    tensor[b] = tensor[last]
                self.rows[b] = self.rows[last]
            self.rows.pop()
        for layer in self.cache.layers:
            layer.keep_rows(len(self.rows))
        self.mask, self.position, self.picked = (t[: len(self.rows)] for t in (self.mask, self.position, self.picked))

    def sample(self, logits: torch.Tensor) -> list[Row]:
        """One token for every row from its next-token logits [B, V]; the rows whose turn ended leave the batch (their
        KV cache kept for what continues them). Returns those."""
        logits = logits.float()  # [B, V]
        log_probs = torch.log_softmax(logits, dim=-1)  # [B, V]
        if self.temperature == 0:
            picked = log_probs.argmax(-1)
        else:  # inverse transform sampling: each row's one uniform draw from its own generator, located in its CDF
            cdf = torch.softmax(logits / self.temperature, dim=-1).cumsum(-1)  # [B, V]
            uniform = torch.cat([torch.rand(1, generator=row.generator, device=self.device) for row in self.rows])  # [B]
            picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=cdf.shape[1] - 1)
        self.picked, gone = picked, []
        for b, (row, token, lp) in enumerate(zip(self.rows, picked.tolist(), log_probs.gather(1, picked[:, None])[:, 0].tolist())):
            row.tokens.append(token)
            row.logprobs.append(lp)
            if (token == self.tokenizer.eos_token_id or len(row.tokens) >= row.max_tokens
                    or any(s in self.tokenizer.decode(row.tokens, skip_special_tokens=True) for s in STOP)):
                gone.append(b)  # its cache holds the context and the turn but its last token (sampled, never fed)
                self.kept.keep(tuple(row.context + row.tokens[:-1]), self.row_cache(b))
        ended = sorted((self.rows[b] for b in gone), key=lambda row: row.key)  # in the order submitted, wherever they sat
        self.drop(gone)
        return ended


class SpareLayer(DynamicLayer):
    """transformers' DynamicLayer with room behind its keys and values for `spare` more tokens and below them for more
    rows: a decoding step writes its token in place, and turns that join the batch are written below the running rows,
    instead of the whole cache being copied into a larger one (DynamicLayer's concatenation)."""

    def __init__(self, spare: int):
        super().__init__()
        self.spare = spare
        self.key_room = self.value_room = None  # [rows it can hold, heads, tokens it can hold, head dim]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        key_states = key_states.to(value_states.dtype)  # rotary embedding left keys in float32 under autocast: attention reads them in bf16
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, old = key_states.shape[0], self.get_seq_length()
        new = old + key_states.shape[-2]
        if self.key_room is None or new > self.key_room.shape[2]:  # a room of new + spare tokens, what was kept copied in
            self.key_room, self.value_room = self.room(self.keys, key_states, old, new), self.room(self.values, value_states, old, new)
        self.key_room[:rows, :, old:new] = key_states
        self.value_room[:rows, :, old:new] = value_states
        self.keys, self.values = self.key_room[:rows, :, :new], self.value_room[:rows, :, :new]
        return self.keys, self.values

    def room(self, kept: torch.Tensor, fresh: torch.Tensor, old: int, new: int) -> torch.Tensor:
        rows = fresh.shape[0] if self.key_room is None else self.key_room.shape[0]
        room = fresh.new_empty(rows, fresh.shape[1], new + self.spare, fresh.shape[3])
        if old:
            room[: kept.shape[0], :, :old] = kept
        return room

    @classmethod
    def of_rows(cls, batches: list[tuple[torch.Tensor, torch.Tensor]], length: int, spare: int, rows_room: int = 0) -> "SpareLayer":
        """A layer holding the rows of these (keys, values) [rows, heads, tokens, head dim] one batch after another,
        each left-padded with zeros to `length` tokens, with room for `spare` more tokens and `rows_room` rows in all."""
        layer, (like, _) = cls(spare), batches[0]
        rows = sum(keys.shape[0] for keys, _ in batches)
        layer.key_room, layer.value_room = (like.new_empty(max(rows, rows_room), like.shape[1], length + spare, like.shape[3])
                                            for _ in range(2))
        layer.keys, layer.values = layer.key_room[:0, :, :length], layer.value_room[:0, :, :length]
        layer.dtype, layer.device, layer.is_initialized = like.dtype, like.device, True
        for keys, values in batches:
            layer.add_rows(keys, values)
        return layer

    def can_add(self, rows: int, tokens: int) -> bool:
        return self.keys.shape[0] + rows <= self.key_room.shape[0] and tokens <= self.keys.shape[2]

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Rows [rows, heads, tokens, head dim] written below the present ones, left-padded with zeros to their length."""
        first, length = self.keys.shape[0], self.keys.shape[2]
        last, start = first + keys.shape[0], length - keys.shape[2]
        for room, new in ((self.key_room, keys), (self.value_room, values)):
            room[first:last, :, :start] = 0
            room[first:last, :, start:length] = new
        self.keys, self.values = self.key_room[:last, :, :length], self.value_room[:last, :, :length]

    def move_row(self, source: int, target: int) -> None:
        self.key_room[target], self.value_room[target] = self.key_room[source], self.value_room[source]

    def keep_rows(self, count: int) -> None:
        """Only the first `count` rows (views: nothing copied, the room kept)."""
        self.keys, self.values = self.keys[:count], self.values[:count]

    def reorder_cache(self, rows: torch.LongTensor) -> None:
        length = self.get_seq_length()
        self.key_room, self.value_room = self.key_room.index_select(0, rows), self.value_room.index_select(0, rows)
        self.keys, self.values = self.key_room[:, :, :length], self.value_room[:, :, :length]


def prefill(model, parts: list[tuple[Layers | None, list[int]]], tokenizer, spare: int, device: torch.device):
    """One forward of `model` over rows given as (the KV cache of a row's first tokens or None, its next tokens): each
    row is [padding | cached tokens | padding | next tokens], the cache holding the first two parts, the forward the last
    two. The cache has room for `spare` more tokens. Returns it, the attention mask [U, cache length], each row's last
    position [U] and last logits [U, V]."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cached = [layers[0][0].shape[1] if layers else 0 for layers, _ in parts]
    width, length = max(len(ids) for _, ids in parts), max(cached)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for _, x in parts], device=device)  # [U, width]
    positions = torch.tensor([[0] * (width - len(x)) + list(range(n, n + len(x))) for (_, x), n in zip(parts, cached)], device=device)
    mask = torch.tensor([[0] * (length - n) + [1] * n + [0] * (width - len(x)) + [1] * len(x) for (_, x), n in zip(parts, cached)],
                        device=device)
    if length:  # the kept tokens in place, with room for this forward's and `spare` more
        like = next(layers for layers, _ in parts if layers)[0][0]  # [heads, n, head dim]: shape and dtype of an empty row
        cache = Cache(layers=[SpareLayer.of_rows([(layers[i][0][None], layers[i][1][None]) if layers else (like[None, :, :0],) * 2
                                                  for layers, _ in parts], length, width + spare)
                              for i in range(model.config.num_hidden_layers)])
    else:
        cache = Cache(layers=[SpareLayer(spare) for _ in range(model.config.num_hidden_layers)])
    last = torch.tensor([width - 1], device=device)  # an index, not a count: a one-row slice would take torch's slow matmul path
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                   logits_to_keep=last, decoding=True).logits[:, -1]
    return cache, mask, positions[:, -1], logits


def merged(a: Cache, mask_a: torch.Tensor, b: Cache, mask_b: torch.Tensor, spare: int, rows_room: int) -> tuple[Cache, torch.Tensor]:
    """Two batches as one: the rows of `a`, then those of `b`, each left-padded to the longer cache (room for `spare`
    more tokens and `rows_room` rows). Returns the cache and its attention mask."""
    length = max(mask_a.shape[1], mask_b.shape[1])
    cache = Cache(layers=[SpareLayer.of_rows([(x.keys, x.values), (y.keys, y.values)], length, spare, rows_room)
                          for x, y in zip(a.layers, b.layers)])
    return cache, torch.cat([left_padded(mask_a, length, dim=1), left_padded(mask_b, length, dim=1)])


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask [B, L] (1: attended) as SDPA's additive mask for one query a row, [B, 1, 1, L] of 0 and -inf in
    attention's dtype: transformers would build a boolean one at every forward and SDPA convert it in every layer."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask == 0, float("-inf"))[:, None, None, :]


def left_padded(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros in front along `dim` up to `length`."""
    shape = list(tensor.shape)
    shape[dim] = length - shape[dim]
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def bfloat16_linears(model, device: torch.device) -> dict[torch.nn.Linear, Callable[[torch.Tensor], torch.Tensor]]:
    """A forward for each linear layer of `model` on its bfloat16 weights cast once (autocast would cast them at every
    forward): where oneDNN runs bfloat16 products (a CPU), on the weight laid out once in oneDNN's blocked format, as
    torch's product lays it out at every call (the same products; some large prefill shapes round apart by one bfloat16
    step); elsewhere autocast's linear."""
    onednn = device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    forwards = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight.detach().to(torch.bfloat16)
            bias = None if module.bias is None else module.bias.detach().to(torch.bfloat16)
            forwards[module] = (partial(onednn_linear, torch.ops.mkldnn._reorder_linear_weight(weight), bias) if onednn
                                else partial(torch.nn.functional.linear, weight=weight, bias=bias))
    return forwards


def onednn_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias in bfloat16, `weight` in oneDNN's blocked layout (torch.ops.mkldnn._reorder_linear_weight)."""
    return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), weight, bias, "none", [], "")


def kv_bytes_per_token(config, dtype: str) -> int:
    """Bytes of keys and values one token keeps in the cache, over every layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * (2 if dtype == "bfloat16" else 4)
