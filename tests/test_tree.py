import dataclasses
import random

import pytest

from atpo_credit import backup
from atpo_tree import BatchSampler, StepResult, Tree, TreeGrower, breadth_first, expansion_scores, grow_trees, select_expansion

ANSWER, SEARCH = 1, 2


class ScriptedWorld:
    """A seeded stand-in for an engine and an environment.

    A turn is 1-4 random tokens ending in ANSWER (episode ends) or SEARCH (a 2-token observation follows);
    the 4th turn always ends the episode. Records every batch it was asked to generate.
    """

    def __init__(self, seed=0, answer_prob=0.4, max_turns=4):
        self.rng = random.Random(seed)
        self.answer_prob, self.max_turns = answer_prob, max_turns
        self.batches = []

    def generate(self, contexts):
        self.batches.append([list(c) for c in contexts])
        out = []
        for _ in contexts:
            n = self.rng.randint(0, 3)
            end = ANSWER if self.rng.random() < self.answer_prob else SEARCH
            ids = [self.rng.randint(10, 99) for _ in range(n)] + [end]
            out.append((ids, [-self.rng.uniform(0.01, 3.0) for _ in ids]))
        return out

    def step(self, requests):
        results = []
        for req in requests:
            if req.turn_ids[-1] == ANSWER or req.turn_number >= self.max_turns:
                reward = float(req.turn_ids[-1] == ANSWER and sum(req.turn_ids) % 2 == 0)
                results.append(StepResult([], True, reward, {"end": "answer"}))
            else:
                results.append(StepResult([200 + req.turn_number, 300], False, None, {}))
        return results


def test_breadth_first_order_differs_from_index_order():
    # 0 -> 1 -> 2, and 0 -> 3: breadth first visits 3 before 2
    assert breadth_first([-1, 0, 1, 0]) == [0, 1, 3, 2]


def test_entropy_scores_and_ties_by_hand():
    parents = [-1, 0, 0, 1, 1, 2]
    entropies = [0.0, 0.5, 0.5, 0.9, 0.2, 0.4]
    is_leaf = [False, False, False, True, False, True]
    # children: root 2, node 1 2, node 2 1. Scores: root -0.05; node 1 and node 2 0.5 - 0.05 (tie, 1 first);
    # node 4: 0.2 - 0.05 = 0.15; leaves 3 and 5 are not candidates.
    assert select_expansion(parents, entropies, is_leaf, 2) == [1, 2]
    assert select_expansion(parents, entropies, is_leaf, 4) == [1, 2, 4, 0]
    # fewer candidates than k: the sorted list repeats from its start
    assert select_expansion(parents, entropies, is_leaf, 6) == [1, 2, 4, 0, 1, 2]
    assert select_expansion(parents, entropies, is_leaf, 9) == [1, 2, 4, 0, 1, 2, 4, 0, 1]


def test_alpha_penalises_nodes_with_many_siblings():
    parents = [-1, 0, 0, 1, 1, 1, 2]
    entropies = [0.0, 0.1, 0.5, 0.0, 0.6, 0.0, 0.0]
    is_leaf = [False, False, False, True, False, True, True]
    # node 4 has two siblings: score 0.6 - 2 alpha; node 2 has one: 0.5 - alpha; node 1: 0.1 - alpha
    assert select_expansion(parents, entropies, is_leaf, 4, alpha=0.05) == [4, 2, 1, 0]  # 0.5, 0.45, 0.05, -0.05
    assert select_expansion(parents, entropies, is_leaf, 4, alpha=0.2) == [2, 4, 1, 0]  # 0.3, 0.2, -0.1, -0.2
    scores = expansion_scores(parents, entropies, is_leaf, alpha=0.2)
    assert list(scores) == [0, 1, 2, 4]  # breadth-first, leaves left out
    assert [round(scores[n], 12) for n in scores] == [-0.2, -0.1, 0.3, 0.2]


def test_ties_keep_breadth_first_order():
    # 0 -> 1 -> 2 -> 5, 0 -> 3 -> 4
    parents = [-1, 0, 1, 0, 3, 2]
    is_leaf = [False, False, False, False, True, True]
    # children: root 2, node 1 1, node 2 1, node 3 1.
    # scores: 1: 0.3 - 0.05; 3: 0.3 - 0.05; 2: 0.25 - 0 = 0.25 -> three-way tie; BFS order is 1, 3, 2.
    entropies = [0.0, 0.3, 0.25, 0.3, 0.0, 0.0]
    assert select_expansion(parents, entropies, is_leaf, 3) == [1, 3, 2]


def test_random_mode_is_reproducible_and_uniform():
    parents = [-1, 0, 0, 1, 1, 2]
    is_leaf = [False, False, False, True, False, True]
    picks = [select_expansion(parents, [0.0] * 6, is_leaf, 2, mode="random", rng=random.Random(s)) for s in range(5)]
    again = [select_expansion(parents, [0.0] * 6, is_leaf, 2, mode="random", rng=random.Random(s)) for s in range(5)]
    assert picks == again
    assert all(len(set(p)) == 2 and set(p) <= {0, 1, 2, 4} for p in picks)  # no repeats when enough candidates
    many = select_expansion(parents, [0.0] * 6, is_leaf, 4000, mode="random", rng=random.Random(0))
    counts = {n: many.count(n) for n in (0, 1, 2, 4)}
    assert set(many) == {0, 1, 2, 4} and all(900 < c < 1100 for c in counts.values())
    with pytest.raises(ValueError, match="rng"):
        select_expansion(parents, [0.0] * 6, is_leaf, 2, mode="random")


@pytest.mark.parametrize("mode", ["entropy", "random", "chains"])
def test_leaf_count_and_batched_generation(mode):
    world = ScriptedWorld(seed=1)
    prompts = [[5, 6, 7], [8, 9]]
    trees = grow_trees(prompts, ["q1", "q2"], BatchSampler(world.generate), world.step, m=3, l=2, k=4, mode=mode, rng=random.Random(0))
    for tree in trees:
        assert len(tree.leaves()) == 3 + 2 * 4
        assert all(n.reward is not None for n in tree.nodes if n.done)
        has_child = set(tree.parents[1:])
        assert set(tree.leaves()) == set(range(1, len(tree.nodes))) - has_child  # done <=> no children
    # the first call carries every chain of every tree at once
    assert len(world.batches[0]) == 2 * (11 if mode == "chains" else 3)
    if mode == "chains":
        for tree in trees:  # independent chains: only the root branches
            assert sum(p == 0 for p in tree.parents) == 11
            assert all(tree.parents.count(i) <= 1 for i in range(1, len(tree.nodes)))


def test_nodes_record_their_round_and_the_rounds_that_picked_them():
    world = ScriptedWorld(seed=5)
    tree = grow_trees([[5]], [None], BatchSampler(world.generate), world.step, m=3, l=2, k=2)[0]
    rounds = [n.round for n in tree.nodes[1:]]
    assert rounds == sorted(rounds)  # a round starts when the previous one has ended: nodes are in round order
    assert [sum(tree.nodes[n].round == r for n in tree.leaves()) for r in range(3)] == [3, 2, 2]
    for r in (1, 2):  # round r's picks: select_expansion on the tree as the rounds before r left it
        before = rounds.index(r) + 1
        prefix = tree.nodes[:before]
        picks = select_expansion([n.parent for n in prefix], [n.entropy for n in prefix], [n.done for n in prefix], 2)
        assert sorted(i for i, n in enumerate(tree.nodes) for p in n.picked_in if p == r) == sorted(picks)


def test_expansion_branches_from_the_parents_of_the_picks():
    world = ScriptedWorld(seed=3)
    trees = grow_trees([[5]], [None], BatchSampler(world.generate), world.step, m=4, l=0)
    tree = trees[0]
    before = len(tree.nodes)
    picks = select_expansion(tree.parents, tree.entropies, tree.is_leaf, 5)
    world2 = ScriptedWorld(seed=3)
    expanded = grow_trees([[5]], [None], BatchSampler(world2.generate), world2.step, m=4, l=1, k=5)[0]
    # the picks are recorded on the nodes (a node picked twice counts 2), the chains are the same (same seed)
    assert [len(n.picked_in) for n in expanded.nodes[:before]] == [picks.count(i) for i in range(before)]
    assert sum(len(n.picked_in) for n in expanded.nodes) == 5
    assert [dataclasses.replace(n, picked_in=[]) for n in expanded.nodes[:before]] == tree.nodes
    new_roots = [i for i in range(before, len(expanded.nodes)) if expanded.parents[i] < before]
    assert sorted(expanded.parents[i] for i in new_roots) == sorted(max(tree.parents[n], 0) for n in picks)
    # each re-sampled sibling was generated from exactly its parent's state
    for i in new_roots:
        assert any(batch_ctx == expanded.context(expanded.parents[i]) for batch in world2.batches for batch_ctx in batch)


def test_trajectories_share_prefix_spans_and_mask_observations():
    world = ScriptedWorld(seed=4, answer_prob=0.3)
    tree = grow_trees([[5, 6]], [None], BatchSampler(world.generate), world.step, m=2, l=2, k=3)[0]
    rows = tree.trajectories()
    assert [r.leaf for r in rows] == tree.leaves()
    for row in rows:
        assert len(row.response_ids) == len(row.response_mask) == len(row.token_nodes)
        assert tree.context(row.leaf) == tree.prompt_ids + row.response_ids
        assert row.reward == tree.nodes[row.leaf].reward
        for tok, m, node in zip(row.response_ids, row.response_mask, row.token_nodes):
            assert m == (0 if tok >= 200 else 1)  # observations are the 200+/300 tokens
        # walk up from the leaf by hand: the tokens of each node on the path, in order
        expected, n = [], row.leaf
        while n > 0:
            expected = tree.nodes[n].token_ids + tree.nodes[n].obs_ids + expected
            n = tree.parents[n]
        assert row.response_ids == expected
        assert len(row.sampler_logprobs) == len(row.response_ids)
        for node in set(row.token_nodes):
            span = [lp for lp, o, m in zip(row.sampler_logprobs, row.token_nodes, row.response_mask) if o == node and m]
            assert span == tree.nodes[node].logprobs
        assert all(lp == 0.0 for lp, m in zip(row.sampler_logprobs, row.response_mask) if not m)
    shared = 0
    for a in rows:
        for b in rows:
            common = set(a.token_nodes) & set(b.token_nodes)
            for node in common:
                span_a = [t for t, o in zip(a.response_ids, a.token_nodes) if o == node]
                span_b = [t for t, o in zip(b.response_ids, b.token_nodes) if o == node]
                start_a, start_b = a.token_nodes.index(node), b.token_nodes.index(node)
                assert span_a == span_b and start_a == start_b
                shared += a.leaf != b.leaf
    assert shared > 0  # the tree did share prefixes


def test_environment_without_reward_or_bad_generator_is_an_error():
    def no_reward_step(requests):
        return [StepResult([], True, None, {}) for _ in requests]

    world = ScriptedWorld()
    with pytest.raises(ValueError, match="without a reward"):
        grow_trees([[1]], [None], BatchSampler(world.generate), no_reward_step, m=1, l=0)
    with pytest.raises(ValueError, match="log-probs"):
        grow_trees([[1]], [None], BatchSampler(lambda c: [([1, 2], [-0.1])] * len(c)), world.step, m=1, l=0)
    with pytest.raises(ValueError, match="generate returned"):
        grow_trees([[1]], [None], BatchSampler(lambda c: []), world.step, m=1, l=0)
    with pytest.raises(ValueError, match="mode"):
        grow_trees([[1]], [None], BatchSampler(world.generate), world.step, mode="tree")


def test_grown_tree_feeds_credit():
    world = ScriptedWorld(seed=5)
    tree = grow_trees([[5]], [None], BatchSampler(world.generate), world.step, m=3, l=2, k=2)[0]
    rewards = {leaf: tree.nodes[leaf].reward for leaf in tree.leaves()}
    values, adv = backup(tree.parents, tree.entropies, rewards)
    assert values.shape == adv.shape == (len(tree.nodes),)


def test_node_entropy_is_mean_negative_logprob():
    tree = Tree([1])
    node = tree.add(0, [4, 5, 6], [-0.5, -1.0, -3.0])
    assert tree.nodes[node].entropy == pytest.approx(1.5)
    assert tree.nodes[0].entropy == 0.0


class ContextWorld(ScriptedWorld):
    """A ScriptedWorld whose turn is a function of its context and of how often that context was sampled before
    (1-3 tokens from a large vocabulary, so two turns never share a context by chance): trees then do not depend
    on the order in which turns are sampled."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def generate(self, contexts):
        out = []
        for context in contexts:
            key = tuple(context)
            rng = random.Random(hash((key, self.seen.get(key, 0))))  # a tuple of ints hashes the same in every run
            self.seen[key] = self.seen.get(key, 0) + 1
            ids = [rng.randrange(1000, 10**6) for _ in range(rng.randint(1, 3))] + [ANSWER if rng.random() < 0.4 else SEARCH]
            out.append((ids, [-rng.uniform(0.01, 3.0) for _ in ids]))
        return out


class ShuffledSampler:
    """An engine that finishes a random non-empty subset of the running turns at each wait, in random order."""

    def __init__(self, world, seed):
        self.world, self.rng, self.running, self.waits = world, random.Random(seed), {}, []

    def submit(self, context):
        key = f"request-{len(self.running)}-{self.rng.random()}"
        self.running[key] = context
        return key

    def wait(self):
        keys = self.rng.sample(sorted(self.running), self.rng.randint(1, len(self.running)))
        self.waits.append(len(keys) < len(self.running))
        return [(key, *self.world.generate([self.running.pop(key)])[0]) for key in keys]


def canonical(tree, node=0):
    """A tree as nested tuples, children sorted: equal for trees that differ only in node numbering."""
    n = tree.nodes[node]
    children = sorted(canonical(tree, c) for c in range(len(tree.nodes)) if tree.parents[c] == node)
    return (tuple(n.token_ids), tuple(n.logprobs), tuple(n.obs_ids), n.done, n.reward, tuple(n.picked_in), tuple(children))


@pytest.mark.parametrize("mode", ["entropy", "chains"])
def test_trees_do_not_depend_on_the_order_turns_finish(mode):
    """Pipelined growth (each turn handled as it finishes) gives the trees of turn depths in lockstep."""
    prompts = [[5, 6], [7], [8, 9, 10]]
    for seed in range(10):
        lockstep = grow_trees(prompts, [None] * 3, BatchSampler(ContextWorld().generate), ScriptedWorld().step,
                              m=3, l=2, k=3, mode=mode)
        sampler = ShuffledSampler(ContextWorld(), seed)
        shuffled = grow_trees(prompts, [None] * 3, sampler, ScriptedWorld().step, m=3, l=2, k=3, mode=mode)
        assert any(sampler.waits)  # some waits really left turns running
        assert [canonical(t) for t in shuffled] == [canonical(t) for t in lockstep]
        assert all(len(t.leaves()) == 9 for t in shuffled)


def test_a_tree_expands_without_waiting_for_the_others():
    """An engine that always finishes tree A's turns first: tree A is grown to its last leaf, both expansion rounds
    included, before any turn of tree B comes back (with turn depths in lockstep B's first turns come back first)."""
    world, order = ContextWorld(), []

    class AFirst(ShuffledSampler):
        def wait(self):
            keys = [k for k, c in self.running.items() if c[0] == 5] or list(self.running)
            order.extend(self.running[k][0] for k in keys)
            return [(key, *self.world.generate([self.running.pop(key)])[0]) for key in keys]

    trees = grow_trees([[5], [6]], [None, None], AFirst(world, 0), ScriptedWorld().step, m=2, l=2, k=2)
    a_turns = len(trees[0].nodes) - 1
    assert order[:a_turns] == [5] * a_turns and set(order[a_turns:]) == {6}
    assert len(trees[0].leaves()) == len(trees[1].leaves()) == 6


def test_a_tree_added_while_others_grow_is_grown_too():
    """TreeGrower.grow yields each tree when it is complete; a tree added then (a dynamic-sampling refill) is grown
    alongside the rest, to its full M + L*K leaves."""
    grower = TreeGrower(ShuffledSampler(ContextWorld(), 0), ScriptedWorld().step, m=2, l=1, k=2)
    first = [grower.add([5], "a"), grower.add([6], "b")]
    done = []
    for tree in grower.grow():
        assert len(tree.leaves()) == 4 and all(tree.nodes[n].reward is not None for n in tree.leaves())
        done.append(tree.task)
        if tree.task == "a":
            grower.add([7], "c")
    assert sorted(done) == ["a", "b", "c"] and done.index("c") > done.index("a")
    assert all(len(t.leaves()) == 4 for t in first + [grower.trees[2]]) and not grower.running


def test_a_sampler_that_loses_or_invents_turns_is_an_error():
    world = ScriptedWorld()

    class Empty(ShuffledSampler):
        def wait(self):
            return []

    class Invented(ShuffledSampler):
        def wait(self):
            return [("no such request", [ANSWER], [-0.5])]

    with pytest.raises(ValueError, match="no turn"):
        grow_trees([[1]], [None], Empty(world, 0), world.step, m=1, l=0)
    with pytest.raises(ValueError, match="not given or gave twice"):
        grow_trees([[1]], [None], Invented(world, 0), world.step, m=1, l=0)
