"""Which questions a step trains on: the same number from each data source (hop-balanced batches), and dynamic
sampling, which drops a tree whose leaves all got one reward and grows another in its place (docs/method.md §5.1-5.2).
"""

import random

from atpo_tree import Tree, TreeGrower


def question_pools(tasks: list, balance_sources: bool) -> list[list]:
    """One pool of questions per data source (every step draws from each), or one pool of them all."""
    pools: dict[str, list] = {}
    for task in tasks:
        pools.setdefault(task.source if balance_sources else "", []).append(task)
    return list(pools.values())


def step_queues(pools: list[list], prompts_per_step: int, step: int, rng: random.Random) -> tuple[list[list], list[int]]:
    """Hop-balanced batches (docs/method.md §5.2): this step's question order in each pool, and how many trees each pool gives: an even split, the remainder
    going to the pools in turn from step to step."""
    queues = [rng.sample(pool, len(pool)) for pool in pools]
    wanted = [prompts_per_step // len(pools) + ((i - step) % len(pools) < prompts_per_step % len(pools))
              for i in range(len(pools))]
    return queues, wanted


def is_uniform(tree: Tree) -> bool:
    """Every leaf got the same reward: every leaf value is 0, so every advantage in the tree is 0."""
    return len({tree.nodes[leaf].reward for leaf in tree.leaves()}) == 1


def draw_trees(queues: list[list], wanted: list[int], grower: TreeGrower, prompt, rounds: int,
               drop_uniform: bool) -> tuple[list[Tree], list[Tree]]:
    """Dynamic sampling (docs/method.md §5.1): one step's trees, wanted[i] questions popped from queue i, each grown by `grower` from prompt(task). With
    drop_uniform, a uniform tree is dropped and the next question of its queue starts growing the moment the dropped
    tree is complete, each of the wanted trees drawn at most `rounds` times. Returns (every tree grown, the kept),
    in the order they were complete."""
    draws = {}  # id(tree) -> (its queue, how often its place in the batch was drawn)

    def draw(i: int, count: int) -> None:
        task = queues[i].pop()
        draws[id(grower.add(prompt(task), task))] = (i, count)

    for i, (queue, n) in enumerate(zip(queues, wanted)):
        for _ in range(min(n, len(queue))):
            draw(i, 1)
    drawn, kept = [], []
    for tree in grower.grow():
        drawn.append(tree)
        i, count = draws[id(tree)]
        if not (drop_uniform and is_uniform(tree)):
            kept.append(tree)
        elif count < rounds and queues[i]:
            draw(i, count + 1)
    return drawn, kept
