"""What the policy does: greedy episodes on held-out questions (EM overall and per data source, how it acts), and
the diagnostics of one step's rollout trees.
"""

import random

from atpo_tree import Tree, grow_trees
from batches import is_uniform
from console import progress_bar
from envs import SearchEnv, Task, build_prompt


def mean(values: list[float]) -> float:
    """The mean, 0.0 for no values (a step that trained on nothing)."""
    return sum(values) / len(values) if values else 0.0


def held_out(tasks: list[Task], count: int, each: bool = False) -> list[Task]:
    """`count` questions taken from each data source in turn (`each`: `count` of every source, source by source)."""
    by_source: dict[str, list[Task]] = {}
    for task in tasks:
        by_source.setdefault(task.source, []).append(task)
    if each:
        return [t for ts in by_source.values() for t in ts[:count]]
    return [ts[i] for i in range(count) for ts in by_source.values() if i < len(ts)][:count]


def episode_record(task: Task, turns: list) -> dict[str, float]:
    """One evaluation episode (its turns, root to leaf): EM, EM of its data source, the share of well-formed turns,
    searches, turns, and for a default-task question of two or three hops whether it searched that often."""
    searches = sum(n.info["action"] == "search" for n in turns)
    em = turns[-1].info["em"]
    record = {
        "em": em,
        **({f"em/{task.source}": em} if task.source else {}),  # a task without a source counts in "em" only
        "well_formed": sum(n.info["action"] != "invalid" for n in turns) / len(turns),
        "searches": searches,
        "turns": len(turns),
    }
    if task.source == "default-2hop":
        record["two_hop_second_search"] = float(searches >= 2)
    if task.source == "default-3hop":
        record["three_hop_third_search"] = float(searches >= 3)
    return record


def evaluate(rollout_engine, env: SearchEnv, tokenizer, tasks: list[Task], temperature: float, seed: int,
             desc: str = "evaluation") -> dict[str, float]:
    """One episode per question (greedy when temperature is 0); the mean of each episode_record entry."""
    prompts = [build_prompt(tokenizer, t.question) for t in tasks]
    sampler = rollout_engine.sampler(random.Random(seed), temperature)
    with progress_bar(total=len(tasks), desc=desc, unit="question", leave=False) as bar:
        def step(requests):
            results = env.step(requests)
            bar.update(sum(r.done for r in results))
            return results

        trees = grow_trees(prompts, tasks, sampler, step, m=1, l=0, mode="chains")
    metrics: dict[str, list[float]] = {}
    for task, tree in zip(tasks, trees):
        for key, value in episode_record(task, [tree.nodes[n] for n in tree.path(tree.leaves()[0])]).items():
            metrics.setdefault(key, []).append(value)
    return {key: sum(v) / len(v) for key, v in sorted(metrics.items())}


def rollout_stats(trees: list[Tree]) -> dict[str, float]:
    """What the policy did in one step's trees, per episode (leaf): reward, EM, answers, turns, and per data source
    the reward, the share of episodes that searched at least twice and the generated tokens per leaf (a tree's
    shared prefixes counted once); per tree: the share of uniform trees; per turn depth d: the mean entropy."""
    episodes: dict[str, list[dict]] = {}
    entropies: dict[int, list[float]] = {}
    tokens: dict[str, int] = {}  # generated tokens per data source
    for tree in trees:
        tokens[tree.task.source] = tokens.get(tree.task.source, 0) + sum(len(n.token_ids) for n in tree.nodes)
        for leaf in tree.leaves():
            path = [tree.nodes[n] for n in tree.path(leaf)]
            episodes.setdefault(tree.task.source, []).append({
                "reward": path[-1].reward, "em": path[-1].info["em"], "answered": path[-1].info["end"] == "answer",
                "turns": len(path), "second_search": sum(n.info["action"] == "search" for n in path) >= 2,
            })
        for n in range(1, len(tree.nodes)):
            entropies.setdefault(len(tree.path(n)), []).append(tree.nodes[n].entropy)
    every = [e for es in episodes.values() for e in es]
    stats = {
        "charts/reward": mean([e["reward"] for e in every]),
        "charts/em": mean([e["em"] for e in every]),
        "charts/answered": mean([e["answered"] for e in every]),
        "charts/turns": mean([e["turns"] for e in every]),
        "charts/trees_drawn": len(trees),
        "charts/uniform_trees": mean([is_uniform(t) for t in trees]),
        "charts/nodes_per_tree": mean([len(t.nodes) - 1 for t in trees]),
        "charts/generated_tokens": sum(tokens.values()),
        "charts/passages_cut": sum(n.info.get("passages_cut", 0) for t in trees for n in t.nodes),  # beyond --topk or --passage-chars
    }
    for source, es in sorted(episodes.items()):
        if source:
            stats[f"charts/reward/{source}"] = mean([e["reward"] for e in es])
            stats[f"charts/second_search/{source}"] = mean([e["second_search"] for e in es])
            stats[f"charts/tokens_per_leaf/{source}"] = tokens[source] / len(es)
    stats.update({f"charts/entropy/turn{d}": mean(h) for d, h in sorted(entropies.items())})
    return stats
