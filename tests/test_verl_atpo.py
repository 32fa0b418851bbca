"""verl_atpo.py through verl's own registries and call signatures (runs in .venv-verl: ./setup.sh --verl)."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl lives in .venv-verl: ./setup.sh --verl && .venv-verl/bin/python -m pytest tests/test_verl_atpo.py")

from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import verl_atpo  # noqa: E402, F401  (registers "atpo")
from atpo_loss import policy_loss  # noqa: E402
from tests.naive import loop_token_losses  # noqa: E402


def actor_config(**clip):
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=1, **clip)


def ragged_batch(seed=0, rows=6, length=14):
    """Rows of several turns separated by observation tokens, one fully masked row, log-ratios large enough to clip."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    for r in range(rows - 1):
        t = int(torch.randint(0, 2, (), generator=g))
        while t < length:
            run = int(torch.randint(1, 5, (), generator=g))
            mask[r, t:t + run] = True
            t += run + int(torch.randint(1, 4, (), generator=g))
    old = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    log_prob = (old + 0.3 * torch.randn(rows, length, generator=g, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(rows, length, generator=g, dtype=torch.float64)
    return log_prob, old, advantages, mask


def test_policy_loss_is_registered_and_equals_ours_with_grads():
    log_prob, old, adv, mask = ragged_batch()
    assert not mask[-1].any() and mask.sum(dim=1)[:-1].min() > 0
    verl_loss, metrics = get_policy_loss_fn("atpo")(old, log_prob, adv, mask, "seq-mean-token-mean",
                                                     actor_config(clip_ratio_low=0.05, clip_ratio_high=0.08))
    (verl_grad,) = torch.autograd.grad(verl_loss, log_prob)
    our_loss, stats = policy_loss(log_prob, old, adv, mask, clip_low=0.05, clip_high=0.08)
    (our_grad,) = torch.autograd.grad(our_loss, log_prob)
    torch.testing.assert_close(verl_loss, our_loss)
    torch.testing.assert_close(verl_grad, our_grad)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(stats["clip_frac"]) and 0 < stats["clip_frac"] < 1
    assert metrics["actor/ppo_kl"] == pytest.approx(stats["approx_kl"])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_loss_agg_modes_match_the_loop_oracle(mode):
    """verl's aggregation modes applied to the per-token losses of the straightforward loop in tests/naive.py."""
    log_prob, old, adv, mask = ragged_batch(seed=1)
    config = actor_config(clip_ratio_low=0.1, clip_ratio_high=0.15)
    loss, _ = verl_atpo.atpo_policy_loss(old, log_prob, adv, mask, mode, config)
    rows = [row for row in loop_token_losses(log_prob, old, adv, mask, clip_low=0.1, clip_high=0.15) if len(row)]
    expected = {
        "token-mean": torch.cat(rows).sum() / sum(len(row) for row in rows),
        "seq-mean-token-mean": torch.stack([row.mean() for row in rows]).mean(),
        "seq-mean-token-sum": torch.stack([row.sum() for row in rows]).mean(),
    }[mode]
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, log_prob)[0], torch.autograd.grad(expected, log_prob)[0])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_data_parallel_ranks_average_to_the_single_rank_loss(mode):
    """Two ranks with verl's global_batch_info: DDP's mean of their gradients is the one-rank gradient."""
    log_prob, old, adv, mask = ragged_batch(seed=2)
    single, _ = verl_atpo.atpo_policy_loss(old, log_prob, adv, mask, mode, actor_config())
    (single_grad,) = torch.autograd.grad(single, log_prob)
    info = {"dp_size": 2, "batch_num_tokens": int(mask.sum()), "global_batch_size": int(mask.any(dim=1).sum())}
    ranks = []
    for rows in (slice(0, 2), slice(2, None)):  # unequal shares: 2 rows and 4 (one of them empty)
        config = actor_config()
        config.global_batch_info.update(info)
        loss, _ = verl_atpo.atpo_policy_loss(old[rows], log_prob[rows], adv[rows], mask[rows], mode, config)
        ranks.append(loss)
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, single)
    torch.testing.assert_close(torch.autograd.grad((ranks[0] + ranks[1]) / 2, log_prob)[0], single_grad)


def test_rollout_correction_weights_scale_each_token():
    log_prob, old, adv, mask = ragged_batch(seed=3)
    weights = torch.rand(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    loss, _ = verl_atpo.atpo_policy_loss(old, log_prob, adv, mask, "token-mean", actor_config(), weights)
    rows = loop_token_losses(log_prob, old, adv, mask, clip_low=0.2, clip_high=0.2)  # verl's default clip_ratio
    weighted = [row * weights[r][mask[r]] for r, row in enumerate(rows) if len(row)]
    torch.testing.assert_close(loss, torch.cat(weighted).sum() / mask.sum())


def tree_batch():
    """Three trajectories of two turns each, one observation between: rows 0 and 1 share their first turn.

        root 0 -> 1 (rows 0, 1) -> 2 (row 0, reward 1), 3 (row 1, reward 0)
               -> 4 (row 2)     -> 5 (row 2, reward 0)
    H(n) = -mean old log-prob of n's tokens: H1 = H4 = 1, H3 = 0.5, H2 = 0.5 + ln 2 (softmax weights 2/3, 1/3).
    """
    turn = [1, 1, 1, 0, 0, 1, 1, 1, 0, 0]  # turn 1: positions 0-2; turn 2: 5-7
    mask = torch.tensor([turn] * 3, dtype=torch.bool)
    rewards = torch.zeros(3, 10)
    rewards[0, 7] = 1.0  # verl puts the outcome on the last response token
    entropy = {(0, 1): 1.0, (1, 1): 1.0, (2, 1): 1.0, (0, 2): 0.5 + math.log(2), (1, 2): 0.5, (2, 2): 0.7}
    old = torch.zeros(3, 10)
    for (row, k), h in entropy.items():
        old[row, (0 if k == 1 else 5):(3 if k == 1 else 8)] = -h
    return rewards, mask, np.array(["q", "q", "q"], dtype=object), [[1, 2], [1, 3], [4, 5]], old


def turn_values(advantages, row):
    return advantages[row, 0].item(), advantages[row, 5].item()


def test_tree_backup_by_hand():
    rewards, mask, uid, nodes, old = tree_batch()
    s = math.sqrt(2) / 3  # population std of the rewards (1, 0, 0); leaf values 2/3 / s = sqrt 2 and -1/sqrt 2
    v2, v3, v5 = (2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s
    v1 = (2 / 3) * v2 + (1 / 3) * v3  # child_softmax with weights 2/3, 1/3
    advantages = verl_atpo.tree_advantages(rewards, mask, uid, nodes, old)
    assert turn_values(advantages, 0) == pytest.approx((v1, v2), abs=1e-5)
    assert turn_values(advantages, 1) == pytest.approx((v1, v3), abs=1e-5)
    assert turn_values(advantages, 2) == pytest.approx((v5, v5), abs=1e-5)
    assert (advantages[~mask] == 0).all()
    assert (advantages[:, 0:3] == advantages[:, 0:1]).all() and (advantages[:, 5:8] == advantages[:, 5:6]).all()
    # diff_parent: V(root) = mean of V1 and V4 (equal entropies) = (v1 + v5) / 2
    diff = verl_atpo.tree_advantages(rewards, mask, uid, nodes, old, adv_mode="diff_parent")
    root = (v1 + v5) / 2
    assert turn_values(diff, 0) == pytest.approx((v1 - root, v2 - v1), abs=1e-5)
    assert turn_values(diff, 2) == pytest.approx((v5 - root, 0.0), abs=1e-5)


def test_tree_errors_name_the_problem():
    rewards, mask, uid, nodes, old = tree_batch()
    with pytest.raises(ValueError, match="needs old_log_probs"):
        verl_atpo.tree_advantages(rewards, mask, uid, nodes)
    with pytest.raises(ValueError, match="node 2 has parents"):
        verl_atpo.tree_advantages(rewards, mask, uid, [[1, 2], [4, 2], [4, 5]], old)
    with pytest.raises(ValueError, match="without gaps"):
        verl_atpo.tree_advantages(rewards, mask, uid, [[1, 2], [1, 3], [4, 6]], old)
    with pytest.raises(ValueError, match="2 turn node ids for 1 turns"):
        verl_atpo.tree_advantages(rewards, mask & (torch.arange(10) < 4), uid, nodes, old)


def test_grpo_groups_through_verls_compute_advantage():
    """algorithm.adv_estimator=atpo in verl's own dispatcher: uid groups become chains; the reference credit gives
    every turn of a trajectory its z-scored reward (population std), observations and padding 0."""
    assert get_adv_estimator_fn("atpo") is verl_atpo.compute_atpo_advantage
    turn = [1, 1, 0, 0, 1, 1, 0, 0]
    mask = torch.tensor([turn] * 6, dtype=torch.float32)
    rewards = torch.zeros(6, 8)
    rewards[[0, 3, 4, 5], 5] = 1.0  # group a: 1, 0, 0, 1 -> z = 1, -1, -1, 1; group b: 1, 1 -> 0
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask},
        non_tensors={"uid": np.array(["a", "a", "a", "a", "b", "b"], dtype=object)},
    )
    data = compute_advantage(data, adv_estimator="atpo", config=AlgoConfig(adv_estimator="atpo"))
    expected = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0]).unsqueeze(1) * mask
    torch.testing.assert_close(data.batch["advantages"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(data.batch["returns"], data.batch["advantages"])


def test_search_tool_through_verls_loader_against_our_retrieval_server(tmp_path, monkeypatch):
    """examples/verl_search_tool.py loaded as verl's agent loop loads it, asking retrieval_server.py (run from .venv
    on loopback) for the default corpus; a server that is down raises instead of returning an empty observation."""
    import asyncio
    import socket
    import subprocess
    import time
    import urllib.error
    from pathlib import Path

    from verl.tools.function_tool import load_function_tools_from_path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ATPO_RETRIEVAL_URL", f"http://127.0.0.1:{port}/retrieve")
    (tool,) = load_function_tools_from_path(str(root / "examples" / "verl_search_tool.py"))
    assert tool.name == "search" and list(tool.tool_schema.function.parameters.properties) == ["query"]
    with pytest.raises(urllib.error.URLError):
        asyncio.run(tool.call({"query": "Vobipos"}))

    server = subprocess.Popen(
        [str(root / ".venv" / "bin" / "python"), "retrieval_server.py", "--corpus", "data/default/corpus.jsonl",
         "--port", str(port), "--cache-dir", str(tmp_path)],
        cwd=root,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                observation = asyncio.run(tool.call({"query": "Vobipos"}))
                break
            except urllib.error.URLError:
                assert server.poll() is None and time.time() < deadline, "retrieval_server.py did not come up"
                time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert observation.splitlines()[0] == "Doc 1 (Title: Vobipos) Vobipos is a country. Its capital is Razil."
    assert len(observation.splitlines()) == 3
