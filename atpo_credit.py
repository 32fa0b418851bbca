"""Turn-wise credit assignment on a rollout tree (AT²PO, arXiv 2601.04767; docs/method.md §2).

A tree is a list of parent indices: `parents[0] == -1` is the root (the prompt), every other node is one turn
and `parents[i] < i`. Leaves are nodes without children; each leaf ends one trajectory (root -> leaf).

    leaf value       v = (R - mean_tree R) / (std_tree R + 1e-6)                   (population std)
    child_softmax    V(n) = sum_c softmax_c(H(c)) V(c)                              (the official code's default)
    child_mean       V(n) = mean_c V(c)
    leaf_mean        V(n) = mean of the values of the leaves under n
    node_value       A(n) = V(n)                                                    (the official code's default)
    diff_parent      A(n) = V(n) - V(parent)
    diff_global      A(n) = V(n) - V(root)
    diff_localglobal A(n) = (V(n) - V(parent)) + (V(n) - V(root))
The root's advantage is V(root) in every mode; every model token of turn n gets A(n).
"""

import math

import torch

VALUE_MODES = ("child_softmax", "child_mean", "leaf_mean")
ADV_MODES = ("node_value", "diff_parent", "diff_global", "diff_localglobal")


def children_of(parents: list[int]) -> list[list[int]]:
    """Children of every node, in index order; raises ValueError naming the first malformed node."""
    if not parents or parents[0] != -1:
        raise ValueError(f"parents[0] must be -1 (the root), got {parents[:1]}")
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        if not 0 <= parent < node:
            raise ValueError(f"node {node}: parent {parent} must satisfy 0 <= parent < {node}")
        children[parent].append(node)
    return children


def normalize_leaf_rewards(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """Leaf value (§2.1): z-score of the outcome rewards inside one tree, population std (ddof 0)."""
    if min(rewards) == max(rewards):
        return [0.0] * len(rewards)  # exactly, not the rounding error of (r - mean)
    mean, std = reward_mean_std(rewards)
    return [(r - mean) / (std + eps) for r in rewards]


def reward_mean_std(rewards: list[float]) -> tuple[float, float]:
    """The mean and population std of one tree's outcome rewards (§2.1)."""
    mean = sum(rewards) / len(rewards)
    return mean, math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))


def value_sources(parents: list[int], entropies: list[float], value_mode: str) -> list[dict[int, float]]:
    """What each node's value is the weighted mean of (§2.2), as {node: weight} (weights not normalised; {} at a leaf):
    child_softmax: its children, weight exp(H(c) - max H); child_mean: its children, 1 each; leaf_mean: the leaves
    under it, 1 each."""
    if value_mode not in VALUE_MODES:
        raise ValueError(f"value_mode must be one of {VALUE_MODES}, got {value_mode!r}")
    children = children_of(parents)
    leaves_under = [[n] if not children[n] else [] for n in range(len(parents))]
    sources: list[dict[int, float]] = [{} for _ in parents]
    for node in reversed(range(len(parents))):  # parents[i] < i: every child is seen before its parent
        kids = children[node]
        for c in kids:
            leaves_under[node] += leaves_under[c]
        if kids and value_mode == "child_softmax":
            top = max(entropies[c] for c in kids)
            sources[node] = {c: math.exp(entropies[c] - top) for c in kids}
        elif kids:
            sources[node] = dict.fromkeys(kids if value_mode == "child_mean" else leaves_under[node], 1.0)
    return sources


def turn_advantage(value: float, parent_value: float, root_value: float, adv_mode: str) -> float:
    """A turn's advantage (§2.3) from its value V(n), its parent's and the root's."""
    if adv_mode == "node_value":
        return value
    if adv_mode == "diff_parent":
        return value - parent_value
    if adv_mode == "diff_global":
        return value - root_value
    return (value - parent_value) + (value - root_value)  # diff_localglobal


def backup(
    parents: list[int],
    entropies: list[float],
    leaf_rewards: dict[int, float],
    *,
    value_mode: str = "child_softmax",
    adv_mode: str = "node_value",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Node values V (§2.2) backed up from the leaves' z-scored rewards (§2.1), and turn advantages A (§2.3).

    entropies[i] is the mean negative log-prob of node i's sampled tokens (the root's is ignored);
    leaf_rewards maps every leaf index to its outcome reward. Returns (values, advantages), float64 [N].
    """
    if adv_mode not in ADV_MODES:
        raise ValueError(f"adv_mode must be one of {ADV_MODES}, got {adv_mode!r}")
    children = children_of(parents)
    if len(entropies) != len(parents):
        raise ValueError(f"{len(entropies)} entropies for {len(parents)} nodes")
    leaves = [n for n in range(1, len(parents)) if not children[n]]
    if not leaves:
        raise ValueError("the tree has no turns: the root needs at least one child")
    for node in leaves:
        if node not in leaf_rewards:
            raise ValueError(f"node {node} is a leaf but has no reward")
        if not math.isfinite(leaf_rewards[node]):
            raise ValueError(f"node {node}: reward {leaf_rewards[node]} is not finite")
    for node in leaf_rewards:
        if not (0 <= node < len(parents)) or children[node] or node == 0:
            raise ValueError(f"node {node} has a reward but is not a leaf")
    for node in range(1, len(parents)):
        if not math.isfinite(entropies[node]):
            raise ValueError(f"node {node}: entropy {entropies[node]} is not finite")

    values = [0.0] * len(parents)
    for node, value in zip(leaves, normalize_leaf_rewards([float(leaf_rewards[n]) for n in leaves])):
        values[node] = value
    sources = value_sources(parents, entropies, value_mode)
    for node in reversed(range(len(parents))):  # bottom-up: every source has a larger index than its node
        if sources[node]:
            values[node] = sum(w * values[s] for s, w in sources[node].items()) / sum(sources[node].values())
    advantages = [values[0]] + [turn_advantage(values[n], values[parents[n]], values[0], adv_mode) for n in range(1, len(parents))]
    return torch.tensor(values, dtype=torch.float64), torch.tensor(advantages, dtype=torch.float64)


def token_advantages(node_advantages: torch.Tensor, token_nodes: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Token advantages (§2.4): every model token of turn n gets A(n); every other position gets 0.

    node_advantages: [N] (several trees concatenated, `token_nodes` indexing into it);
    token_nodes: [B, T] long, the node of every token (any value, e.g. -1, where the mask is 0);
    response_mask: [B, T]. Returns [B, T] in node_advantages' dtype.
    """
    mask = response_mask.bool()
    gathered = node_advantages[torch.where(mask, token_nodes, 0)]
    return torch.where(mask, gathered, gathered.new_zeros(()))
