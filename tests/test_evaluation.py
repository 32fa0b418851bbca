"""evaluation.py: an episode's record and a step's rollout diagnostics, by hand."""

import pytest

from atpo_tree import Tree
from envs import Task
from tests.handmade import episode_tree


def test_episode_record_by_hand():
    import evaluation

    def record(source: str, actions: list[str], em: float) -> dict:
        tree = episode_tree(Task("q", ["a"], source), [(actions, em)])
        return evaluation.episode_record(tree.task, [tree.nodes[n] for n in tree.path(tree.leaves()[0])])

    assert record("default-3hop", ["search", "search", "answer"], 1.0) == {
        "em": 1.0, "em/default-3hop": 1.0, "well_formed": 1.0, "searches": 2, "turns": 3, "three_hop_third_search": 0.0}
    assert record("default-3hop", ["search", "search", "search", "answer"], 0.0)["three_hop_third_search"] == 1.0
    assert record("default-2hop", ["search", "invalid", "answer"], 0.0) == {
        "em": 0.0, "em/default-2hop": 0.0, "well_formed": 2 / 3, "searches": 1, "turns": 3, "two_hop_second_search": 0.0}
    assert record("", ["answer"], 1.0) == {"em": 1.0, "well_formed": 1.0, "searches": 0, "turns": 1}


def test_rollout_stats_by_hand():
    import evaluation

    a = episode_tree(Task("q", ["a"], "2hop"), [(["search", "search", "answer"], 1.0), (["search", "answer"], 0.0)])
    b = episode_tree(Task("r", ["a"], "1hop"), [(["search", "answer"], 1.0), (["search", "answer"], 1.0)])
    stats = evaluation.rollout_stats([a, b])
    assert stats["charts/reward"] == pytest.approx(0.75) and stats["charts/em"] == pytest.approx(0.75)
    assert stats["charts/turns"] == pytest.approx((3 + 2 + 2 + 2) / 4)
    assert stats["charts/uniform_trees"] == 0.5 and stats["charts/trees_drawn"] == 2
    assert stats["charts/reward/2hop"] == 0.5 and stats["charts/reward/1hop"] == 1.0
    assert stats["charts/second_search/2hop"] == 0.5 and stats["charts/second_search/1hop"] == 0.0
    # turn entropies: depth d has log-prob -0.1 d, so entropy 0.1 d at every depth
    assert stats["charts/entropy/turn1"] == pytest.approx(0.1) and stats["charts/entropy/turn3"] == pytest.approx(0.3)
    assert stats["charts/generated_tokens"] == 9
    assert stats["charts/tokens_per_leaf/2hop"] == 2.5 and stats["charts/tokens_per_leaf/1hop"] == 2.0  # 5 and 4 turns
    # a shared first turn is generated once: 3 turns of one token for 2 leaves
    shared = Tree([1], Task("s", ["a"], "2hop"))
    first = shared.add(0, [5], [-0.1])
    for _ in range(2):
        leaf = shared.add(first, [6], [-0.2])
        shared.nodes[leaf].info = {"action": "answer", "em": 0.0, "end": "answer"}
        shared.nodes[leaf].done, shared.nodes[leaf].reward = True, 0.0
    shared.nodes[first].info = {"action": "search", "em": 0.0, "end": None}
    assert evaluation.rollout_stats([shared])["charts/tokens_per_leaf/2hop"] == 1.5
