"""Tree JSON written by checkpoint.py: round trip, drawing trees of 1 to 30 leaves, clear errors for malformed files."""

import json
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from atpo_credit import backup
from atpo_tree import Tree
from checkpoint import tree_record, write_trees
from envs import Task
from tree_picture import layout, load_trees, node_label, render


def random_tree(tokenizer, leaves: int, seed: int) -> Tree:
    """A tree with exactly `leaves` leaves: chains of 1-3 turns branching off random earlier nodes."""
    rng = random.Random(seed)
    tree = Tree(prompt_ids=tokenizer.encode("Question: who?"), task=Task(question="Where is Bus Lovun's employer?", answers=["Razil"]))
    for _ in range(leaves):
        inner = [i for i, n in enumerate(tree.nodes) if not n.done]
        node = rng.choice(inner)
        for depth in range(rng.randint(1, 3)):
            last = depth == 2 or rng.random() < 0.4
            text = "<answer> Razil </answer>" if last else f"<search> query {rng.randint(0, 99)} </search>"
            node = tree.add(node, tokenizer.encode(text), [-rng.random() for _ in tokenizer.encode(text)])
            n = tree.nodes[node]
            n.info = {"action": "answer" if last else "search", "content": text.split(">")[1].split("<")[0].strip(),
                      "end": "answer" if last else None}
            n.picked_in = [1] * rng.randint(0, 1)
            if last:
                n.done, n.reward = True, float(rng.random() < 0.5)
                break
        else:  # three searches: end it with an answer so every chain finishes
            node = tree.add(node, tokenizer.encode("<answer> x </answer>"), [-0.5] * len(tokenizer.encode("<answer> x </answer>")))
            tree.nodes[node].info = {"action": "answer", "content": "x", "end": "max_turns"}
            tree.nodes[node].done, tree.nodes[node].reward = True, 0.0
    assert len(tree.leaves()) == leaves
    return tree


SETTINGS = SimpleNamespace(m=3, l=2, k=2, alpha=0.05, expansion="entropy", value_mode="child_softmax", adv_mode="node_value")


def records_of(tokenizer, trees: list[Tree]) -> list[dict]:
    out = []
    for tree in trees:
        rewards = {leaf: tree.nodes[leaf].reward for leaf in tree.leaves()}
        values, advantages = backup(tree.parents, tree.entropies, rewards)
        out.append(tree_record(tree, values, advantages, tokenizer, SETTINGS))
    return out


def test_round_trip_keeps_structure_and_numbers(tokenizer, tmp_path):
    trees = [random_tree(tokenizer, 5, seed=1), random_tree(tokenizer, 9, seed=2)]
    records = records_of(tokenizer, trees)
    write_trees(tmp_path / "trees" / "step_000010.json", records)
    loaded = load_trees(tmp_path / "trees" / "step_000010.json")
    assert loaded == records  # the same numbers exactly, not approximately
    for tree, record in zip(trees, loaded):
        assert [n["parent"] for n in record["nodes"]] == tree.parents
        assert [n["entropy"] for n in record["nodes"]] == tree.entropies
        assert [n["picked_in"] for n in record["nodes"]] == [n.picked_in for n in tree.nodes]
        assert [n["reward"] for n in record["nodes"]] == [n.reward for n in tree.nodes]
        assert record["nodes"][3]["text"] == tokenizer.decode(tree.nodes[3].token_ids)


@pytest.mark.parametrize("leaves", [1, 2, 7, 30])
def test_renders_trees_of_1_to_30_leaves(tokenizer, tmp_path, leaves):
    record = records_of(tokenizer, [random_tree(tokenizer, leaves, seed=leaves)])[0]
    render(record, tmp_path / "tree.png")
    render(record, tmp_path / "tree.svg")
    assert (tmp_path / "tree.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "tree.svg").read_text()
    assert svg.count("<g id=\"text_") == len(record["nodes"]) + 1  # one label per node and the key


def test_layout_by_hand():
    # 0 -> 1 -> {3, 4}, 0 -> 2: leaves 3, 4, 2 at x 0, 1, 2 (depth-first); 1 over its children, 0 over 1 and 2
    assert layout([-1, 0, 0, 1, 1]) == [(1.25, 0), (0.5, 1), (2.0, 1), (0.0, 2), (1.0, 2)]
    assert layout([-1, 0]) == [(0.0, 0), (0.0, 1)]


def test_node_label():
    node = {"action": "search", "content": "Bus Lovun works for Brelta Holdings in", "entropy": 0.349, "picked_in": [1, 2],
            "value": 0.5, "advantage": -0.25, "end": None, "reward": None}
    assert node_label(node) == "search: Bus Lovun works for B…\nH 0.35  picked ×2\nV 0.50  A -0.25"
    leaf = {"action": "answer", "content": "Razil", "entropy": 0.1, "picked_in": [], "value": 1.0, "advantage": 0.5,
            "end": "answer", "reward": 1.0}
    assert node_label(leaf) == "answer: Razil\nH 0.10\nV 1.00  A +0.50\nreward 1.00 (answer)"


GOOD_NODE = {"parent": 0, "entropy": 0.1, "value": 0.0, "advantage": 0.0, "end": "answer", "reward": 1.0}
ROOT = {"parent": -1, "entropy": 0.0, "value": 0.0, "advantage": 0.0}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"nodes": []}', "expected a list of trees"),
    ("[{}]", "tree 0: expected an object with a non-empty 'nodes' list"),
    (json.dumps([{"nodes": [{**ROOT, "parent": 0}]}]), "root's parent must be -1"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "parent": 1}]}]), "node 1: parent must be an earlier node"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "entropy": float("nan")}]}]), "node 1: 'entropy' must be a finite number"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "value": "high"}]}]), "'value' must be a finite number"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "reward": None}]}]), "a leaf needs a finite 'reward'"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "reward": float("nan")}]}]), "a leaf needs a finite 'reward'"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "parent": True}]}]), "node 1: parent must be an earlier node"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "action": ["search"]}]}]), "node 1: 'action' must be text"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "content": {"q": 1}}]}]), "node 1: 'content' must be text"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "picked_in": 2}]}]), "node 1: 'picked_in' must be a list of expansion rounds"),
    (json.dumps([{"nodes": [ROOT, {**GOOD_NODE, "picked_in": [0]}]}]), "node 1: 'picked_in' must be a list of expansion rounds"),
    (json.dumps([{"nodes": [ROOT, GOOD_NODE]}, {"nodes": [ROOT, "x"]}]), "tree 1 node 1: expected an object"),
])
def test_malformed_files_give_clear_errors(tmp_path, content, message):
    path = tmp_path / "trees.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_trees(path)
    assert str(path) in str(err.value)


def test_a_well_formed_minimal_file_loads(tmp_path):
    path = tmp_path / "trees.json"
    path.write_text(json.dumps([{"nodes": [ROOT, GOOD_NODE]}]))
    assert load_trees(path)[0]["nodes"][1]["reward"] == 1.0


@pytest.mark.parametrize("content", [None, "{not json", "[]", "a folder"])
def test_the_tool_refuses_a_missing_or_malformed_file_with_one_line(tmp_path, content):
    trees = tmp_path / "step_000010.json"
    if content == "a folder":
        trees.mkdir()
    elif content is not None:
        trees.write_text(content)
    proc = subprocess.run([sys.executable, "tree_picture.py", str(trees), "--out", str(tmp_path / "t.png")],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    [line] = proc.stderr.strip().splitlines()
    expected = {None: "no such file", "{not json": "not valid JSON", "[]": "holds 0 trees", "a folder": "is a directory"}[content]
    assert proc.returncode != 0 and line.startswith("error: ") and expected in line and not (tmp_path / "t.png").exists()
