"""Turn-level rollout trees and entropy-guided expansion (AT²PO, arXiv 2601.04767; docs/method.md §1).

One tree per prompt. Node 0 is the root (the prompt); every other node is one model turn y_k plus the
environment's observation o_k that followed it. A node whose turn ended the episode is a leaf, and every
root -> leaf path is one trajectory.

    1. start M chains per prompt, each run turn by turn to the end of its episode;
    2. L times: score every non-leaf node, score(n) = H(n) - alpha * (children(parent(n)) - 1),
       take the top K, and give each a new sibling re-sampled from its parent's state, run to the end;
    3. each tree ends with M + L*K leaves.

The procedure talks to the world through a sampler and a callable, so it does not depend on an inference engine:
    sampler.submit(context: list[int]) -> key           start sampling one turn after `context`
    sampler.wait() -> list[(key, token_ids, logprobs)]  block until one or more submitted turns are done
    step(requests: list[StepRequest]) -> list[StepResult]  the environment's answer to each turn
Nothing waits for a whole turn depth: a branch's next turn is submitted as soon as its observation is back; a
tree's expansion round starts as soon as that tree's previous round has ended; trees can be added while others
grow (`TreeGrower`; dynamic sampling replaces a dropped tree at once). `BatchSampler` turns a batch
`generate(contexts) -> [(token_ids, logprobs)]` (HF generate, a test's script) into a sampler.
"""

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

MODES = ("entropy", "random", "chains")


@dataclass
class Node:
    parent: int  # -1 for the root
    token_ids: list[int]  # the turn's sampled tokens y_k (empty for the root)
    logprobs: list[float]  # the sampler's log-prob of each sampled token
    obs_ids: list[int] = field(default_factory=list)  # observation o_k appended after the turn (empty at a leaf)
    done: bool = False  # the turn ended the episode
    reward: float | None = None  # outcome reward, set at leaves
    info: dict = field(default_factory=dict)  # what the environment reports about the turn (action, end reason)
    round: int = 0  # when it was sampled: 0 in the M chains, r in expansion round r
    picked_in: list[int] = field(default_factory=list)  # the expansion rounds that picked it (each pick: one new sibling)

    @property
    def entropy(self) -> float:
        """Node entropy (§1.2): H(n) = -(1/|y_k|) sum_t log pi(y_t | context); 0 for the root."""
        return -sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


class StepRequest(NamedTuple):
    task: Any  # what the environment knows about the prompt (question, gold answers, ...)
    context_ids: list[int]  # prompt + every earlier turn and observation: what the turn was sampled from
    turn_ids: list[int]  # the sampled turn
    turn_number: int  # 1 for the first turn of the episode


class StepResult(NamedTuple):
    obs_ids: list[int]  # observation tokens to append (ignored when done)
    done: bool
    reward: float | None  # the outcome reward, required when done
    info: dict


@dataclass
class Trajectory:
    """One root -> leaf path as a training row (the prompt is the tree's `prompt_ids`, not repeated here)."""

    leaf: int
    reward: float
    response_ids: list[int]  # turns and observations along the path
    response_mask: list[int]  # 1 on model tokens, 0 on observation tokens
    token_nodes: list[int]  # the node each token belongs to
    sampler_logprobs: list[float]  # the sampler's log-prob of each model token, 0 on observation tokens


@dataclass
class Tree:
    prompt_ids: list[int]
    task: Any = None
    nodes: list[Node] = field(default_factory=lambda: [Node(parent=-1, token_ids=[], logprobs=[])])

    @property
    def parents(self) -> list[int]:
        return [n.parent for n in self.nodes]

    @property
    def entropies(self) -> list[float]:
        return [n.entropy for n in self.nodes]

    @property
    def is_leaf(self) -> list[bool]:
        return [n.done for n in self.nodes]

    def leaves(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.done]

    def path(self, node: int) -> list[int]:
        """Turn nodes from the first turn down to `node` (root excluded)."""
        path = []
        while node > 0:
            path.append(node)
            node = self.nodes[node].parent
        return path[::-1]

    def context(self, node: int) -> list[int]:
        """The state after `node`: prompt + every turn and observation on the path to it."""
        ids = list(self.prompt_ids)
        for n in self.path(node):
            ids += self.nodes[n].token_ids + self.nodes[n].obs_ids
        return ids

    def add(self, parent: int, token_ids: list[int], logprobs: list[float], round: int = 0) -> int:
        if len(token_ids) != len(logprobs):
            raise ValueError(f"a turn of {len(token_ids)} tokens came with {len(logprobs)} log-probs")
        self.nodes.append(Node(parent=parent, token_ids=list(token_ids), logprobs=list(logprobs), round=round))
        return len(self.nodes) - 1

    def trajectories(self) -> list[Trajectory]:
        """One training row per leaf, in leaf index order."""
        rows = []
        for leaf in self.leaves():
            ids, mask, owners, logprobs = [], [], [], []
            for n in self.path(leaf):
                node = self.nodes[n]
                ids += node.token_ids + node.obs_ids
                mask += [1] * len(node.token_ids) + [0] * len(node.obs_ids)
                owners += [n] * (len(node.token_ids) + len(node.obs_ids))
                logprobs += node.logprobs + [0.0] * len(node.obs_ids)
            rows.append(Trajectory(leaf, self.nodes[leaf].reward, ids, mask, owners, logprobs))
        return rows


def children_lists(parents: list[int]) -> list[list[int]]:
    """The children of every node, in index order (atpo_credit.children_of checks too: each file is copied alone)."""
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], start=1):
        children[parent].append(node)
    return children


def breadth_first(parents: list[int]) -> list[int]:
    """Node indices in breadth-first order from the root, siblings in index order."""
    children = children_lists(parents)
    order = [0]
    for node in order:  # the list grows while it is walked
        order += children[node]
    return order


def expansion_scores(parents: list[int], entropies: list[float], is_leaf: list[bool], alpha: float) -> dict[int, float]:
    """Expansion score (§1.3) of every non-leaf node, in breadth-first order: score(n) = H(n) - alpha *
    (children(parent(n)) - 1); the root's, -alpha * (children(root) - 1)."""
    num_children = [len(c) for c in children_lists(parents)]
    return {n: -alpha * (num_children[0] - 1) if n == 0 else entropies[n] - alpha * (num_children[parents[n]] - 1)
            for n in breadth_first(parents) if not is_leaf[n]}


def select_expansion(
    parents: list[int],
    entropies: list[float],
    is_leaf: list[bool],
    k: int,
    *,
    alpha: float = 0.05,
    mode: str = "entropy",
    rng: random.Random | None = None,
) -> list[int]:
    """Pick the K nodes to branch from (§1.3); each pick later gets one new re-sampled sibling.

    entropy: the top K by expansion_scores (a stable sort, descending, over the non-leaf nodes in breadth-first
    order), the sorted list repeated if shorter.
    random: uniform over the candidates, with replacement only when there are fewer than K (needs `rng`).
    """
    if mode not in ("entropy", "random"):
        raise ValueError(f"mode must be 'entropy' or 'random', got {mode!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = expansion_scores(parents, entropies, is_leaf, alpha)
    candidates = list(scores)
    if not candidates:
        raise ValueError("no node to expand: every node is a leaf")

    if mode == "random":
        if rng is None:
            raise ValueError("mode='random' needs an rng (random.Random(seed)) for reproducibility")
        return rng.sample(candidates, k) if len(candidates) >= k else rng.choices(candidates, k=k)

    ranked = sorted(candidates, key=scores.get, reverse=True)  # Python's sort is stable, also with reverse=True
    return (ranked * math.ceil(k / len(ranked)))[:k]


class BatchSampler:
    """A sampler from a batch `generate(contexts) -> [(token_ids, logprobs)]`: each `wait` samples, in one call,
    every context submitted since the last one."""

    def __init__(self, generate: Callable[[list[list[int]]], list[tuple[list[int], list[float]]]]):
        self.generate = generate
        self.queued: list[tuple[int, list[int]]] = []  # (key, context)
        self.submitted = 0

    def submit(self, context: list[int]) -> int:
        self.queued.append((self.submitted, context))
        self.submitted += 1
        return self.submitted - 1

    def wait(self) -> list[tuple[int, list[int], list[float]]]:
        queued, self.queued = self.queued, []
        samples = self.generate([context for _, context in queued])
        if len(samples) != len(queued):
            raise ValueError(f"generate returned {len(samples)} turns for {len(queued)} contexts")
        return [(key, ids, logprobs) for (key, _), (ids, logprobs) in zip(queued, samples)]


class TreeGrower:
    """Grows turn-level trees (§1.1-1.4) on one sampler: M chains, then L rounds of K branches; M + L*K leaves per tree.

    mode: "entropy" (AT²PO), "random" (Tree-GRPO-style uniform picks, needs `rng`), or "chains"
    (M + L*K independent chains, i.e. GRPO sampling on the same budget). `sampler` and `step`: see the module
    docstring. `add` starts a tree, also while others grow; `grow` runs until every tree added is complete.
    """

    def __init__(
        self,
        sampler,
        step: Callable[[list[StepRequest]], list[StepResult]],
        *,
        m: int = 10,
        l: int = 2,  # noqa: E741 (the paper's name)
        k: int = 6,
        alpha: float = 0.05,
        mode: str = "entropy",
        rng: random.Random | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if m < 1 or l < 0 or (l > 0 and k < 1):
            raise ValueError(f"need m >= 1, l >= 0 and k >= 1, got m={m}, l={l}, k={k}")
        if mode == "chains":
            m, l = m + l * k, 0  # noqa: E741
        self.sampler, self.step, self.m, self.l, self.k, self.alpha, self.mode, self.rng = sampler, step, m, l, k, alpha, mode, rng
        self.trees: list[Tree] = []
        self.running: dict[Any, tuple[int, int, list[int]]] = {}  # sampler key -> (tree, node the turn follows, its context)
        self.branches_left: list[int] = []  # how many branches of each tree's current round are still running
        self.rounds_left: list[int] = []

    def add(self, prompt_ids: list[int], task: Any = None) -> Tree:
        """A new tree for this prompt; its M chains are submitted at once."""
        self.trees.append(Tree(list(prompt_ids), task))
        self.branches_left.append(self.m)
        self.rounds_left.append(self.l)
        for _ in range(self.m):
            self._start(len(self.trees) - 1, 0)
        return self.trees[-1]

    def grow(self) -> Iterator[Tree]:
        """Samples until every tree added is complete (also those added meanwhile); yields each tree the moment its
        last leaf is done."""
        while self.running:
            finished = self.sampler.wait()
            if not finished:
                raise ValueError("the sampler's wait returned no turn while turns were running")
            grown, requests = [], []
            for key, ids, logprobs in finished:
                if key not in self.running:
                    raise ValueError(f"the sampler returned a turn it was not given or gave twice (key {key!r})")
                t, parent, context = self.running.pop(key)
                tree = self.trees[t]
                c = tree.add(parent, ids, logprobs, round=self.l - self.rounds_left[t])
                grown.append((t, c))
                requests.append(StepRequest(tree.task, context, tree.nodes[c].token_ids, len(tree.path(c))))
            results = self.step(requests)
            if len(results) != len(requests):
                raise ValueError(f"step returned {len(results)} results for {len(requests)} turns")
            for (t, c), result in zip(grown, results):
                if result.done and result.reward is None:
                    raise ValueError(f"tree {t} node {c}: the environment ended the episode without a reward")
                node = self.trees[t].nodes[c]
                node.obs_ids = [] if result.done else list(result.obs_ids)
                node.done, node.reward, node.info = result.done, result.reward, result.info
            for t, c in grown:
                if not self.trees[t].nodes[c].done:
                    self._start(t, c)  # the branch goes on
                    continue
                self.branches_left[t] -= 1
                if self.branches_left[t] == 0 and self.rounds_left[t] > 0:
                    self._expand(t)
                elif self.branches_left[t] == 0:
                    yield self.trees[t]

    def _start(self, t: int, node: int) -> None:
        """Submit the next turn after `node` of tree t."""
        context = self.trees[t].context(node)
        self.running[self.sampler.submit(context)] = (t, node, context)

    def _expand(self, t: int) -> None:
        """One expansion round of tree t (§1.3): K picks from the tree as its previous round left it; a picked
        node gets a new sibling, i.e. a branch from its parent (a picked root starts a fresh chain from the prompt)."""
        tree = self.trees[t]
        picks = select_expansion(tree.parents, tree.entropies, tree.is_leaf, self.k, alpha=self.alpha, mode=self.mode, rng=self.rng)
        for n in picks:
            tree.nodes[n].picked_in.append(self.l - self.rounds_left[t] + 1)
            self._start(t, max(tree.nodes[n].parent, 0))
        self.branches_left[t], self.rounds_left[t] = self.k, self.rounds_left[t] - 1


def grow_trees(prompts: list[list[int]], tasks: list[Any], sampler, step: Callable[[list[StepRequest]], list[StepResult]],
               **shape) -> list[Tree]:
    """One tree per prompt, grown together (TreeGrower; `shape`: its m, l, k, alpha, mode, rng)."""
    if len(prompts) != len(tasks):
        raise ValueError(f"{len(prompts)} prompts but {len(tasks)} tasks")
    grower = TreeGrower(sampler, step, **shape)
    trees = [grower.add(p, task) for p, task in zip(prompts, tasks)]
    for _ in grower.grow():
        pass
    return trees
