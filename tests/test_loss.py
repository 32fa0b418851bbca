import math

import pytest
import torch

from atpo_loss import policy_loss, turn_ids
from tests.naive import loop_policy_loss


def grad_of(level, log_prob, old_log_prob, advantages, mask, **kw):
    lp = log_prob.clone().requires_grad_(True)
    loss, stats = policy_loss(lp, old_log_prob, advantages, mask, level=level, **kw)
    loss.backward()
    return loss.detach(), lp.grad, stats


def random_batch(b=6, t=40, seed=0, dtype=torch.float64, turns_per_row=(1, 5)):
    """Rows with a few turns separated by observation gaps, a padding tail, and turn-constant advantages."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, t, dtype=torch.long)
    adv = torch.zeros(b, t, dtype=dtype)
    for i in range(b):
        pos = int(torch.randint(0, 3, (1,), generator=g))
        for _ in range(int(torch.randint(turns_per_row[0], turns_per_row[1] + 1, (1,), generator=g))):
            length = int(torch.randint(1, 6, (1,), generator=g))
            if pos + length > t:
                break
            mask[i, pos : pos + length] = 1
            adv[i, pos : pos + length] = float(torch.randn((), generator=g, dtype=dtype))
            pos += length + int(torch.randint(1, 4, (1,), generator=g))
    log_prob = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    old_log_prob = log_prob + 0.02 * torch.randn(b, t, generator=g, dtype=dtype)
    return log_prob, old_log_prob, adv, mask


def test_turn_ids_by_hand():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0, 1], [0] * 8, [1] * 8])
    expected = torch.tensor([[0, 1, 1, 0, 2, 0, 3, 3], [1, 1, 1, 0, 0, 0, 0, 2], [0] * 8, [1] * 8])
    assert torch.equal(turn_ids(mask), expected)
    assert torch.equal(turn_ids(mask.bool()), expected)
    assert turn_ids(mask).dtype == torch.long


def test_two_turn_example_by_hand():
    # turn 1 = tokens 0-1, observation at 2, turn 2 = tokens 3-4.
    log_prob = torch.tensor([[-1.0, -2.0, -7.0, -0.5, -1.5]], dtype=torch.float64)
    old = torch.tensor([[-1.1, -1.9, -3.0, -0.5, -1.7]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 5.0, 2.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    # turn 1: l = (0.1 - 0.1)/2 = 0, s = 1; turn 2: l = (0 + 0.2)/2 = 0.1, s = e^0.1 = 1.10517 > 1 + 4e-3.
    # A > 0 and s above the clip: the clipped term -2 * 1.004 is the larger one, its gradient is 0.
    loss, grad, stats = grad_of("turn", log_prob, old, adv, mask)
    assert loss.item() == pytest.approx((-1 - 1 - 2 * 1.004 - 2 * 1.004) / 4, abs=1e-12)
    assert grad.tolist()[0] == pytest.approx([-0.25, -0.25, 0.0, 0.0, 0.0], abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx((1 + math.exp(0.1)) / 2)
    assert stats["approx_kl"] == pytest.approx(-(0.1 - 0.1 + 0.0 + 0.2) / 4)  # mean of log pi_old - log pi_theta
    # A wider clip leaves turn 2 unclipped: gradient -A * s / N on each of its tokens.
    loss, grad, stats = grad_of("turn", log_prob, old, adv, mask, clip_high=0.2)
    s = math.exp(0.1)
    assert loss.item() == pytest.approx((-2 - 4 * s) / 4, abs=1e-12)
    assert grad.tolist()[0] == pytest.approx([-0.25, -0.25, 0.0, -2 * s / 4, -2 * s / 4], abs=1e-12)
    assert stats["clip_frac"] == 0.0


def test_matches_naive_loop_implementation():
    for seed in range(5):
        log_prob, old, adv, mask = random_batch(seed=seed)
        for kw in ({}, {"clip_low": 0.2, "clip_high": 0.28}):
            loss, grad, _ = grad_of("turn", log_prob, old, adv, mask, **kw)
            lp = log_prob.clone().requires_grad_(True)
            ref = loop_policy_loss(lp, old, adv, mask, **kw)
            ref.backward()
            assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
            torch.testing.assert_close(grad, lp.grad, rtol=0, atol=1e-12)


def test_one_turn_rows_equal_sequence_level():
    log_prob, old, adv, _ = random_batch(seed=1)
    mask = torch.zeros_like(log_prob, dtype=torch.long)
    for i, (start, end) in enumerate([(0, 10), (3, 40), (5, 6), (1, 30), (20, 39), (0, 40)]):
        mask[i, start:end] = 1
        adv[i] = float(i) - 2.5  # one advantage per row
    for kw in ({}, {"clip_low": 0.2, "clip_high": 0.2}):
        loss_t, grad_t, _ = grad_of("turn", log_prob, old, adv, mask, **kw)
        loss_s, grad_s, _ = grad_of("sequence", log_prob, old, adv, mask, **kw)
        assert loss_t.item() == pytest.approx(loss_s.item(), abs=1e-12)
        torch.testing.assert_close(grad_t, grad_s, rtol=0, atol=1e-12)
    # and differs once a row has two turns with different ratios
    mask[1, 20] = 0
    assert grad_of("turn", log_prob, old, adv, mask)[1][1].ne(grad_of("sequence", log_prob, old, adv, mask)[1][1]).any()


def token_ppo_reference(log_prob, old, adv, mask, clip_low, clip_high):
    """Textbook token-level PPO-clip, seq-mean-token-mean."""
    ratio = torch.exp(log_prob - old)
    per_token = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    m = mask.to(log_prob.dtype)
    return ((per_token * m).sum(1) / m.sum(1)).mean()


def test_one_token_turns_equal_token_level_ppo():
    log_prob, old, adv, _ = random_batch(seed=2)
    old = log_prob + 0.3 * torch.randn(log_prob.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    mask = torch.zeros_like(log_prob, dtype=torch.long)
    mask[:, ::2] = 1  # every model token is a turn of its own
    adv = torch.randn(log_prob.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for clip in ((3e-3, 4e-3), (0.2, 0.28)):
        lp = log_prob.clone().requires_grad_(True)
        ref = token_ppo_reference(lp, old, adv, mask, *clip)
        ref.backward()
        for level in ("turn", "token"):
            loss, grad, _ = grad_of(level, log_prob, old, adv, mask, clip_low=clip[0], clip_high=clip[1])
            assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
            torch.testing.assert_close(grad, lp.grad, rtol=0, atol=1e-12)
    # token level on multi-token turns is still textbook PPO
    _, _, adv2, mask2 = random_batch(seed=4)
    lp = log_prob.clone().requires_grad_(True)
    token_ppo_reference(lp, old, adv2, mask2, 0.2, 0.28).backward()
    _, grad, _ = grad_of("token", log_prob, old, adv2, mask2, clip_low=0.2, clip_high=0.28)
    torch.testing.assert_close(grad, lp.grad, rtol=0, atol=1e-12)


def test_on_policy_all_levels_give_the_same_gradient():
    """With pi_old = pi_theta (one optimizer step per batch) every ratio is 1, nothing is clipped, and all three
    levels reduce to the gradient -A_t grad log pi_t, seq-mean-token-mean: they differ only off-policy."""
    log_prob, _, adv, mask = random_batch(seed=5)
    m = mask.to(log_prob.dtype)
    expected = -(adv * m) / m.sum(1, keepdim=True).clamp(min=1) / (m.sum(1) > 0).sum()  # written out by hand
    for level in ("turn", "sequence", "token"):
        loss, grad, stats = grad_of(level, log_prob, log_prob.clone(), adv, mask)
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)
        assert stats["clip_frac"] == 0.0
    _, old, _, _ = random_batch(seed=5)  # off-policy (old log-probs 0.02 nats apart): the levels differ
    grads = [grad_of(level, log_prob, old, adv, mask)[1] for level in ("turn", "sequence", "token")]
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[0], grads[2])


def test_masked_positions_do_not_matter_and_get_no_gradient():
    log_prob, old, adv, mask = random_batch(seed=5)
    loss, grad, stats = grad_of("turn", log_prob, old, adv, mask)
    assert (grad[mask == 0] == 0).all()
    assert (grad[mask == 1] != 0).any()
    off = mask == 0
    junk = [float("nan"), float("inf"), -float("inf"), 1e30]
    for value in junk:
        lp2, old2, adv2 = log_prob.clone(), old.clone(), adv.clone()
        lp2[off], old2[off], adv2[off] = value, -value, value
        loss2, grad2, stats2 = grad_of("turn", lp2, old2, adv2, mask)
        assert loss2.item() == loss.item()
        assert torch.equal(grad2, grad)
        assert stats2 == stats


def test_log_ratio_cap_limits_value_and_stops_gradient():
    log_prob = torch.tensor([[-1.0, -1.0, -2.0]], dtype=torch.float64)
    old = torch.tensor([[-12.0, -12.0, -2.0]], dtype=torch.float64)  # turn 1: l = 11 > 10
    adv = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss, grad, stats = grad_of("turn", log_prob, old, adv, mask)
    # A < 0: the unclipped term -A * s is the larger; s is capped at e^10 and carries no gradient.
    assert loss.item() == pytest.approx(math.exp(10.0), rel=1e-12)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert stats["capped_frac"] == 1.0
    # just below the cap the gradient is -A * s / N = e^9.5 / 2 per token
    old = torch.tensor([[-10.5, -10.5, -2.0]], dtype=torch.float64)
    loss, grad, _ = grad_of("turn", log_prob, old, adv, mask)
    assert loss.item() == pytest.approx(math.exp(9.5), rel=1e-12)
    assert grad.tolist()[0] == pytest.approx([math.exp(9.5) / 2, math.exp(9.5) / 2, 0.0], rel=1e-12)


def test_clipping_zeroes_gradient_only_where_clipped_term_wins():
    # one-token turns with ratios below, inside and above the clip range, for both signs of A
    log_ratio = torch.tensor([[-0.01, 0.0, 0.01, -0.01, 0.0, 0.01]], dtype=torch.float64)
    old = torch.full_like(log_ratio, -1.0)
    log_prob = old + log_ratio
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(log_ratio, dtype=torch.long)
    loss, grad, stats = grad_of("token", log_prob, old, adv, mask)
    r = torch.exp(log_ratio)[0].tolist()
    # A>0: clipped wins above 1+eps_high; A<0: clipped wins below 1-eps_low.
    expected_loss = [-r[0], -1.0, -1.004, 0.997, 1.0, r[5]]
    assert loss.item() == pytest.approx(sum(expected_loss) / 6, abs=1e-12)
    assert grad.tolist()[0] == pytest.approx([-r[0] / 6, -1 / 6, 0.0, 0.0, 1 / 6, r[5] / 6], abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(2 / 6)


def test_empty_row_is_finite_and_ignored():
    log_prob, old, adv, mask = random_batch(seed=6)
    loss, grad, _ = grad_of("turn", log_prob, old, adv, mask)
    with_empty = [torch.cat([x, torch.zeros_like(x[:1])]) for x in (log_prob, old, adv, mask)]
    for level in ("turn", "sequence", "token"):
        loss_e, grad_e, stats = grad_of(level, *with_empty)
        assert torch.isfinite(loss_e) and torch.isfinite(grad_e).all()
        assert stats["rows"] == 6.0
    loss_e, grad_e, _ = grad_of("turn", *with_empty)
    assert loss_e.item() == pytest.approx(loss.item(), abs=1e-12)
    torch.testing.assert_close(grad_e[:-1], grad, rtol=0, atol=1e-12)
    # a batch of nothing but empty rows: loss 0, gradient 0, still differentiable
    loss0, grad0, stats0 = grad_of("turn", log_prob, old, adv, torch.zeros_like(mask))
    assert loss0.item() == 0.0 and torch.equal(grad0, torch.zeros_like(grad0))
    assert all(math.isfinite(v) for v in stats0.values())


def test_float32_and_float64_agree():
    log_prob, old, adv, mask = random_batch(b=16, t=200, seed=7)
    for level in ("turn", "sequence", "token"):
        loss64, grad64, _ = grad_of(level, log_prob, old, adv, mask, clip_low=0.2, clip_high=0.28)
        loss32, grad32, _ = grad_of(level, log_prob.float(), old.float(), adv.float(), mask, clip_low=0.2, clip_high=0.28)
        assert loss32.dtype == torch.float32 and grad32.dtype == torch.float32
        assert loss32.item() == pytest.approx(loss64.item(), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(grad32.double(), grad64, rtol=1e-4, atol=1e-7)


def test_bad_input_is_a_clear_error():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="level"):
        policy_loss(x, x, x, x, level="turns")
    with pytest.raises(ValueError, match="shape"):
        policy_loss(x, x, x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dimensions"):
        policy_loss(x[0], x[0], x[0], x[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    log_prob, old, adv, mask = random_batch(seed=8)
    loss, grad, _ = grad_of("turn", log_prob, old, adv, mask)
    loss_c, grad_c, _ = grad_of("turn", log_prob.cuda(), old.cuda(), adv.cuda(), mask.cuda())
    assert loss_c.item() == pytest.approx(loss.item(), abs=1e-10)
    torch.testing.assert_close(grad_c.cpu(), grad, rtol=0, atol=1e-10)


def test_kl_penalty_is_zero_at_the_reference_and_k3_by_hand():
    from atpo_loss import kl_penalty

    log_prob, _, _, mask = random_batch(seed=3)
    lp = log_prob.clone().requires_grad_(True)
    at_start = kl_penalty(lp, log_prob, mask)
    at_start.backward()
    assert at_start.item() == 0.0 and torch.count_nonzero(lp.grad) == 0  # zero, and no pull, at the start policy
    # two rows by hand: r = log pi_ref - log pi_theta; k3 = exp(r) - r - 1; seq-mean-token-mean (empty row ignored)
    theta = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    k3 = lambda r: math.exp(r) - r - 1  # noqa: E731
    expected = ((k3(-0.5) + k3(1.0)) / 2 + k3(0.0)) / 2
    assert kl_penalty(theta, ref, mask).item() == pytest.approx(expected, rel=1e-6)
    lp = theta.clone().requires_grad_(True)
    kl_penalty(lp, ref, mask).backward()  # d/d log pi_theta of (exp(r) - r - 1) = 1 - exp(r), / (2 tokens * 2 rows)
    assert lp.grad[0, 0].item() == pytest.approx((1 - math.exp(-0.5)) / 4, rel=1e-6)
    assert lp.grad[0, 2].item() == 0.0 and lp.grad[2].abs().sum().item() == 0.0
