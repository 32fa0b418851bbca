import math

import numpy as np
import pytest
import torch

from atpo_credit import backup, token_advantages, value_sources

# root 0 -> turns 1, 2; turn 1 -> leaves 3, 4; 2 is a leaf.
PARENTS = [-1, 0, 0, 1, 1]
ENTROPIES = [0.0, 0.5, 0.3, 1.0, 2.0]
REWARDS = {2: 1.0, 3: 1.0, 4: 0.0}

# z-scores of [1, 1, 0] worked out by hand: mean 2/3, population std sqrt(2)/3.
STD = math.sqrt(2) / 3
V_WIN = (1 - 2 / 3) / (STD + 1e-6)
V_LOSE = (0 - 2 / 3) / (STD + 1e-6)


def test_child_mean_by_hand():
    values, adv = backup(PARENTS, ENTROPIES, REWARDS, value_mode="child_mean")
    v1 = (V_WIN + V_LOSE) / 2
    v0 = (v1 + V_WIN) / 2
    assert values.tolist() == pytest.approx([v0, v1, V_WIN, V_WIN, V_LOSE], abs=1e-12)
    assert adv.tolist() == pytest.approx(values.tolist(), abs=1e-12)  # node_value
    assert values.dtype == torch.float64


def test_child_softmax_by_hand():
    values, _ = backup(PARENTS, ENTROPIES, REWARDS)  # the defaults: child_softmax, node_value
    v1 = (math.e**1.0 * V_WIN + math.e**2.0 * V_LOSE) / (math.e**1.0 + math.e**2.0)
    v0 = (math.e**0.5 * v1 + math.e**0.3 * V_WIN) / (math.e**0.5 + math.e**0.3)
    assert values.tolist() == pytest.approx([v0, v1, V_WIN, V_WIN, V_LOSE], abs=1e-12)


def test_leaf_mean_by_hand():
    values, _ = backup(PARENTS, ENTROPIES, REWARDS, value_mode="leaf_mean")
    # node 1 sees leaves 3, 4; the root sees 2, 3, 4, whose z-scores add up to 0 (not the mean of its children)
    assert values.tolist() == pytest.approx([0.0, (V_WIN + V_LOSE) / 2, V_WIN, V_WIN, V_LOSE], abs=1e-12)


def test_advantage_modes_by_hand():
    v1 = (V_WIN + V_LOSE) / 2  # child_mean: values [v0, v1, W, W, L]
    v0 = (v1 + V_WIN) / 2
    _, adv = backup(PARENTS, ENTROPIES, REWARDS, value_mode="child_mean", adv_mode="diff_parent")
    assert adv.tolist() == pytest.approx([v0, v1 - v0, V_WIN - v0, V_WIN - v1, V_LOSE - v1], abs=1e-12)
    _, adv = backup(PARENTS, ENTROPIES, REWARDS, value_mode="child_mean", adv_mode="diff_global")
    assert adv.tolist() == pytest.approx([v0, v1 - v0, V_WIN - v0, V_WIN - v0, V_LOSE - v0], abs=1e-12)
    _, adv = backup(PARENTS, ENTROPIES, REWARDS, value_mode="child_mean", adv_mode="diff_localglobal")
    assert adv.tolist() == pytest.approx([v0, 2 * v1 - 2 * v0, 2 * V_WIN - 2 * v0, 2 * V_WIN - v1 - v0,
                                          2 * V_LOSE - v1 - v0], abs=1e-12)


def test_value_sources_by_hand():
    """The weights behind each value (what the tree explorer shows): exp(H - max H) of the children, 1 for a mean."""
    softmax = value_sources(PARENTS, ENTROPIES, "child_softmax")
    assert softmax[1] == pytest.approx({3: math.exp(-1.0), 4: 1.0}) and softmax[0] == pytest.approx({1: 1.0, 2: math.exp(-0.2)})
    assert softmax[2] == softmax[3] == softmax[4] == {}
    assert value_sources(PARENTS, ENTROPIES, "child_mean")[0] == {1: 1.0, 2: 1.0}
    assert value_sources(PARENTS, ENTROPIES, "leaf_mean")[0] == {2: 1.0, 3: 1.0, 4: 1.0}


@pytest.mark.parametrize("value_mode", ["child_softmax", "child_mean", "leaf_mean"])
@pytest.mark.parametrize("adv_mode", ["node_value", "diff_parent", "diff_global", "diff_localglobal"])
def test_all_equal_rewards_give_zero(value_mode, adv_mode):
    rewards = {2: 0.7, 3: 0.7, 4: 0.7}
    values, adv = backup(PARENTS, ENTROPIES, rewards, value_mode=value_mode, adv_mode=adv_mode)
    assert values.tolist() == [0.0] * 5 and adv.tolist() == [0.0] * 5


@pytest.mark.parametrize("value_mode", ["child_softmax", "child_mean"])
def test_chains_give_grpo_advantage(value_mode):
    # 5 chains of different lengths under one root; every turn of chain i gets GRPO's z-score of R_i.
    rng = np.random.default_rng(0)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5]
    lengths = [3, 1, 4, 2, 2]
    parents, entropies, chain_of, leaf_rewards = [-1], [0.0], [None], {}
    for chain, (length, reward) in enumerate(zip(lengths, rewards)):
        previous = 0
        for _ in range(length):
            parents.append(previous)
            entropies.append(float(rng.uniform(0, 3)))
            chain_of.append(chain)
            previous = len(parents) - 1
        leaf_rewards[previous] = reward
    grpo = (np.array(rewards) - np.mean(rewards)) / (np.std(rewards) + 1e-6)  # np.std is ddof=0
    _, adv = backup(parents, entropies, leaf_rewards, value_mode=value_mode)
    for node in range(1, len(parents)):
        assert adv[node].item() == pytest.approx(grpo[chain_of[node]], abs=1e-12)


def test_malformed_trees_and_rewards_are_value_errors():
    with pytest.raises(ValueError, match="node 2"):
        backup([-1, 0, 3, 1], [0.0] * 4, {2: 1.0, 3: 0.0})
    with pytest.raises(ValueError, match="parents\\[0\\]"):
        backup([0, 0], [0.0] * 2, {1: 1.0})
    with pytest.raises(ValueError, match="node 4 is a leaf but has no reward"):
        backup(PARENTS, ENTROPIES, {2: 1.0, 3: 1.0})
    with pytest.raises(ValueError, match="node 1 has a reward but is not a leaf"):
        backup(PARENTS, ENTROPIES, {**REWARDS, 1: 0.0})
    with pytest.raises(ValueError, match="node 3: reward nan"):
        backup(PARENTS, ENTROPIES, {**REWARDS, 3: float("nan")})
    with pytest.raises(ValueError, match="entropies"):
        backup(PARENTS, ENTROPIES[:-1], REWARDS)
    with pytest.raises(ValueError, match="no turns"):
        backup([-1], [0.0], {})
    with pytest.raises(ValueError, match="value_mode"):
        backup(PARENTS, ENTROPIES, REWARDS, value_mode="mean")


def test_token_advantages():
    node_adv = torch.tensor([9.0, 1.0, -2.0, 3.0])
    token_nodes = torch.tensor([[1, 1, 1, 3, 3, -1], [2, 2, 2, 2, -1, -1]])
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 0, 1, 0, 0]])
    expected = torch.tensor([[1.0, 1.0, 0.0, 3.0, 3.0, 0.0], [-2.0, 0.0, 0.0, -2.0, 0.0, 0.0]])
    assert torch.equal(token_advantages(node_adv, token_nodes, mask), expected)
