"""learner.py: the optimizer step and its guard, the attention it needs."""

import math

import pytest
import torch

from atpo_packing import pack_trees
from tests.handmade import PROMPT, SHAPES, make_tree


def test_a_non_finite_gradient_takes_no_step():
    from learner import clip_and_step

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    assert math.isnan(clip_and_step(model, optimizer, 1.0))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # untouched, optimizer state too
    assert optimizer.state == {} or all(not s for s in optimizer.state.values())
    optimizer.zero_grad()
    model(torch.tensor([[1.0, 2.0, 0.0]])).sum().backward()
    norm = clip_and_step(model, optimizer, 1.0)
    assert norm == pytest.approx(math.sqrt(2 * (1 + 4) + 2))  # d/dW of sum(Wx + b): x per output row, 1 per bias
    assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_fused_adamw_takes_the_for_loop_step():
    """The learner's AdamW is the fused one (a speed option): the same parameters as the for-loop AdamW after steps
    on the same gradients, weight decay and bias correction included (float32 rounding apart)."""
    import learner

    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = []
    for make in (lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=False), lambda params: learner.adamw(params, 1e-2)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    assert optimizer.defaults["fused"]  # learner.adamw's
    for loop, fused, begin in zip(*results, start):
        assert not torch.equal(loop, begin)  # the steps moved the parameters
        torch.testing.assert_close(fused, loop, rtol=0, atol=1e-6)


def test_unsupported_attention_is_a_clear_error(tokenizer):
    from transformers import AutoModelForCausalLM

    import learner

    from default_model import default_model_path

    sdpa = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32, attn_implementation="sdpa")
    packed = pack_trees([make_tree(tokenizer, PROMPT, SHAPES["one_leaf"])])
    with pytest.raises(ValueError, match="tree packing needs the policy loaded by learner.load_policy"):
        learner.packed_token_log_probs(sdpa, packed, 1.0, torch.device("cpu"))


def test_chunked_log_probs_equal_the_full_projection_and_keep_no_logits(model, tokenizer):
    """--logprob-chunk: the same log-probs and gradients as one projection over every position (float32, 1e-6), and
    the backward keeps no [positions, vocabulary] tensor (each chunk's logits are recomputed)."""
    import learner

    ids = torch.tensor([tokenizer.encode(" ".join(f"<search> query {i} </search>" for i in range(20)))])
    mask = torch.ones_like(ids)

    def run(chunk: int):
        model.zero_grad()
        kept = []

        def pack(t):
            kept.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            log_probs = learner.token_log_probs(model, ids, mask, mask, 1.0, chunk)
        (log_probs * torch.linspace(-1, 1, log_probs.shape[1])).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return log_probs.detach(), grads, [shape for shape in kept if shape[-1:] == (vocabulary,) and len(shape) == 2]

    positions, vocabulary = ids.shape[1] - 1, model.config.vocab_size
    assert positions > 64
    full, full_grads, full_kept = run(4096)
    chunked, chunked_grads, chunked_kept = run(64)
    assert (full - chunked).abs().max().item() <= 1e-6
    assert ((full_grads - chunked_grads).norm() / full_grads.norm()).item() <= 1e-6
    assert (positions, vocabulary) in full_kept  # one projection keeps its [positions, V] logits for the backward
    assert chunked_kept == []  # chunked: no logits kept at all (each chunk's are recomputed in the backward)


def test_the_8bit_optimizer_keeps_two_bytes_a_parameter_and_steps_like_adamw():
    """--optimizer adamw8bit: bitsandbytes' AdamW with one-byte moments (about 2 bytes a parameter, learner.OPTIMIZER_BYTES)
    moves the weights as float32 AdamW does, to its quantisation error."""
    import learner

    torch.manual_seed(0)
    start = torch.randn(512, 256)
    grads = [torch.randn(512, 256) for _ in range(5)]
    moved = {}
    for kind in ("adamw", "adamw8bit"):
        weight = torch.nn.Parameter(start.clone())
        optimizer = learner.adamw([weight], 1e-2, kind)
        for g in grads:
            weight.grad = g.clone()
            optimizer.step()
        state = [v for v in optimizer.state[weight].values() if isinstance(v, torch.Tensor)]
        moved[kind] = (weight.detach() - start, sum(t.nbytes for t in state) / weight.numel())
    assert moved["adamw"][1] == pytest.approx(learner.OPTIMIZER_BYTES["adamw"], abs=0.01)
    assert moved["adamw8bit"][1] == pytest.approx(learner.OPTIMIZER_BYTES["adamw8bit"], abs=0.1)
    step32, step8 = moved["adamw"][0], moved["adamw8bit"][0]
    assert step32.abs().mean() > 0.02  # five steps of lr 1e-2 moved every weight
    assert ((step8 - step32).norm() / step32.norm()).item() < 0.05
