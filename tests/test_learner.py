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
