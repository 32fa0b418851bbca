"""Hand-built trees, episodes and gold transcripts that several test files share."""

import random

import torch

from atpo_tree import Tree


def make_tree(tokenizer, prompt: str, nodes: list[tuple[int, str, str]], seed: int = 0) -> Tree:
    """nodes: (parent, turn text, observation text); a node without children is a leaf with a random reward."""
    rng = random.Random(seed)
    tree = Tree(tokenizer.encode(prompt))
    for parent, turn, obs in nodes:
        ids = tokenizer.encode(turn, add_special_tokens=False)
        node = tree.add(parent, ids, [-rng.uniform(0.1, 2.0) for _ in ids])
        tree.nodes[node].obs_ids = tokenizer.encode(obs, add_special_tokens=False) if obs else []
    for i in range(1, len(tree.nodes)):
        if i not in tree.parents[1:]:
            tree.nodes[i].done, tree.nodes[i].reward, tree.nodes[i].obs_ids = True, float(rng.random() < 0.5), []
    return tree

OBS = "\n\n<information>Doc 1 (Title: Mobin Pigubor) Mobin Pigubor (born 1952) is a librarian.</information>\n\n"

PROMPT = "<|im_start|>user\nIn which town was Mobin Pigubor born?<|im_end|>\n<|im_start|>assistant\n"

SHAPES = {
    "one_leaf": [(0, "<think> look </think>\n<search> Mobin Pigubor </search>", OBS), (1, "<answer> Sirun </answer>", "")],
    "siblings_differ_at_first_token": [
        (0, "<search> Mobin Pigubor </search>", OBS),
        (1, "<answer> Sirun </answer>", ""),
        (1, "Sirun is the town. <answer> Sirun </answer>", ""),
        (1, "<think> hm </think><answer> 1952 </answer>", ""),
        (0, "<answer> Paris </answer>", ""),
    ],
    "deep_chain": [(i, f"<search> query number {i} </search>", OBS) for i in range(6)] + [(6, "<answer> x </answer>", "")],
    "mixed": [
        (0, "<search> Mobin </search>", OBS), (0, "<search> Pigubor </search>", OBS), (1, "<search> Sirun </search>", OBS),
        (1, "<answer> Sirun </answer>", ""), (2, "<answer> Damal </answer>", ""), (3, "<answer> Sirun </answer>", ""),
        (3, "<search> again </search>", OBS), (7, "<answer> no </answer>", ""), (2, "<answer> 1952 </answer>", ""),
    ],
}

def episode_tree(task, outcomes: list[tuple[list[str], float]]) -> Tree:
    """A tree of independent chains: one per (actions of its turns, reward); each turn has one token."""
    tree = Tree([1], task)
    for actions, reward in outcomes:
        parent = 0
        for depth, action in enumerate(actions, start=1):
            parent = tree.add(parent, [5], [-0.1 * depth])
            tree.nodes[parent].info = {"action": action, "em": reward, "end": "answer" if action == "answer" else None}
        tree.nodes[parent].done, tree.nodes[parent].reward = True, reward
    return tree

DEMOS = [
    {"question": "In which town was Mobin Pigubor born?", "segments": [
        ["model", "<search> Mobin Pigubor </search>"], ["env", OBS], ["model", "<answer> Sirun </answer>"]]},
    {"question": "Who is Mobin Pigubor?", "segments": [["model", "<answer> a librarian </answer>"]]},
]

def demo_nll_by_hand(model, rows: list[dict]) -> torch.Tensor:
    """The plain forward's cross-entropy on every model token (labels shifted by one), one transcript at a time,
    averaged over the model tokens of all `rows`."""
    import torch.nn.functional as F

    total = 0.0
    for r in rows:
        ids = torch.tensor(r["ids"])
        ce = F.cross_entropy(model(input_ids=ids[None]).logits[0, :-1].float(), ids[1:], reduction="none")
        total = total + (ce * torch.tensor(r["loss_mask"][1:])).sum()
    return total / sum(sum(r["loss_mask"][1:]) for r in rows)


class GradientRecorder:
    """An optimizer for train.update that keeps the gradient it is asked to step with (and steps nothing)."""

    def __init__(self, model):
        self.model = model

    def zero_grad(self):
        self.model.zero_grad()

    def step(self):
        self.grads = torch.cat([p.grad.flatten().clone() for p in self.model.parameters()])


def env_without_vllm(folder, base: dict) -> dict:
    """`base` with a sitecustomize on PYTHONPATH that hides vLLM from the child process: `import vllm` raises
    ImportError and importlib finds no spec for it, as on a machine where it has no wheel."""
    from pathlib import Path

    (Path(folder) / "sitecustomize.py").write_text('import sys\nsys.modules["vllm"] = None  # vLLM hidden\n')
    return {**base, "PYTHONPATH": str(folder)}
