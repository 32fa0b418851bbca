"""tree_explorer.py: the page's data equals what the project's functions give for the same trees (checked against
numbers worked out here), a real headless Chromium opens it with no JavaScript error and shows every tree and node,
and malformed or older files are refused in one line."""

import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from atpo_credit import backup
from atpo_tree import BatchSampler, grow_trees, select_expansion
from checkpoint import tree_record, write_trees
from envs import Task
from tests.test_tree import ScriptedWorld

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = SimpleNamespace(m=3, l=2, k=2, alpha=0.05, expansion="entropy", value_mode="child_softmax", adv_mode="diff_parent")
TASKS = [Task(question="Where is Bus Lovun's employer based? <b>bold</b> </script>", answers=["Razil"]),
         Task(question="Who founded Brelta Holdings?", answers=["Ana Mol", "A. Mol"])]


def saved_trees(tokenizer, tmp_path) -> tuple[list, Path]:
    """Two trees grown by TreeGrower (m=3, l=2, k=2) on a scripted world, saved as train.py saves them."""
    world = ScriptedWorld(seed=11)
    trees = grow_trees([[5], [6]], TASKS, BatchSampler(world.generate), world.step, m=3, l=2, k=2, alpha=SETTINGS.alpha)
    records = []
    for tree in trees:
        rewards = {leaf: tree.nodes[leaf].reward for leaf in tree.leaves()}
        values, advantages = backup(tree.parents, tree.entropies, rewards, value_mode=SETTINGS.value_mode, adv_mode=SETTINGS.adv_mode)
        records.append(tree_record(tree, values, advantages, tokenizer, SETTINGS))
    path = tmp_path / "trees" / "step_000001.json"
    write_trees(path, records)
    return trees, path


def explore(trees_file: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tree_explorer.py", str(trees_file), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def embedded(page: str) -> list[dict]:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))


def test_the_page_holds_the_projects_numbers(tokenizer, tmp_path):
    trees, path = saved_trees(tokenizer, tmp_path)
    proc = explore(path, tmp_path / "trees.html")
    assert proc.returncode == 0, proc.stderr
    data = embedded((tmp_path / "trees.html").read_text())
    assert len(data) == 2
    for tree, shown, task in zip(trees, data, TASKS):
        assert shown["question"] == task.question and shown["answers"] == task.answers
        nodes = shown["nodes"]
        assert [n["text"] for n in nodes] == [tokenizer.decode(n.token_ids) for n in tree.nodes]
        assert [n["observation"] for n in nodes] == [tokenizer.decode(n.obs_ids) for n in tree.nodes]
        assert any(n["observation"] for n in nodes) and [n["round"] for n in nodes] == [n.round for n in tree.nodes]
        # §2.1 by hand: leaf values are the z-scores of the tree's rewards (population std)
        leaves = tree.leaves()
        rewards = [tree.nodes[leaf].reward for leaf in leaves]
        mean, std = statistics.mean(rewards), statistics.pstdev(rewards)
        assert std > 0 and shown["reward_mean"] == pytest.approx(mean, abs=1e-12) and shown["reward_std"] == pytest.approx(std, abs=1e-12)
        for leaf, reward in zip(leaves, rewards):
            assert nodes[leaf]["value"] == pytest.approx((reward - mean) / (std + 1e-6), abs=1e-12)
            assert nodes[leaf]["value_from"] == []
        # §2.2 by hand: an inner node's value is the softmax-over-children-entropies mean of its children's values
        for i, node in enumerate(nodes):
            children = [c for c in range(len(nodes)) if nodes[c]["parent"] == i]
            if not children:
                continue
            exps = [math.exp(tree.nodes[c].entropy) for c in children]
            assert [c for c, _ in node["value_from"]] == children
            assert [w for _, w in node["value_from"]] == pytest.approx([e / sum(exps) for e in exps], abs=1e-12)
            assert node["value"] == pytest.approx(sum(w * nodes[c]["value"] for c, w in node["value_from"]), abs=1e-12)
        # §2.3 (diff_parent) by hand
        for i in range(1, len(nodes)):
            assert nodes[i]["advantage"] == pytest.approx(nodes[i]["value"] - nodes[nodes[i]["parent"]]["value"], abs=1e-12)
        # §1.3 by hand: each round's scores on the tree as the earlier rounds left it, the top K picked
        assert [r["round"] for r in shown["rounds"]] == [1, 2]
        for r in shown["rounds"]:
            before = tree.nodes[: r["nodes_before"]]
            assert all(n.round < r["round"] for n in before) and tree.nodes[r["nodes_before"]].round == r["round"]
            parents = [n.parent for n in before]
            kids = [parents.count(i) for i in range(len(before))]
            expected = {i: (before[i].entropy - 0.05 * (kids[parents[i]] - 1) if i else -0.05 * (kids[0] - 1))
                        for i in range(len(before)) if not before[i].done}
            assert {c["node"]: c["score"] for c in r["ranked"]} == pytest.approx(expected, abs=1e-12)
            assert [c["score"] for c in r["ranked"]] == sorted(expected.values(), reverse=True)
            picks = select_expansion(parents, [n.entropy for n in before], [n.done for n in before], 2, alpha=0.05)
            assert sorted(r["picks"]) == sorted(picks) == sorted(c["node"] for c in r["ranked"][:2])


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium here (.ci/run installs it)")


CLICK_EVERYTHING = """<script>
let clicked = 0;
for (const g of document.querySelectorAll("g.node")) { g.dispatchEvent(new MouseEvent("click")); clicked++; }
for (const slider of document.querySelectorAll("input[type=range]")) {
  for (let v = 0; v <= Number(slider.max); v++) { slider.value = v; slider.dispatchEvent(new Event("input")); } }
for (const b of document.querySelectorAll(".growth button")) b.click();
document.body.appendChild(Object.assign(document.createElement("p"), {id: "clicked", textContent: "clicked " + clicked}));
</script></body>"""


def test_a_real_browser_shows_every_tree_and_node_without_errors(tokenizer, tmp_path):
    browser = chromium()
    trees, path = saved_trees(tokenizer, tmp_path)
    assert explore(path, tmp_path / "trees.html").returncode == 0
    page = (tmp_path / "trees.html").read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page  # nothing fetched
    # the test's copy also clicks every node, moves every slider through every position and presses every button
    (tmp_path / "clicked.html").write_text(page.replace("</body>", CLICK_EVERYTHING))
    total = sum(len(t.nodes) for t in trees)
    def dom_of(uri: str) -> str:
        return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", uri],
                              capture_output=True, text=True, timeout=120).stdout

    linked = dom_of((tmp_path / "trees.html").as_uri() + "#tree-1-node-3")  # a node's link opens the page on it
    assert "<h2>Node 3: " in linked.split('id="tree-1"')[1] and "<h2>Node 3: " not in linked.split('id="tree-1"')[0]
    for name in ("trees.html", "clicked.html"):
        dom = dom_of((tmp_path / name).as_uri())
        status = re.search(r'<p id="status"[^>]*>(.*?)</p>', dom).group(1)
        assert status == f"showing 2 trees, {total} nodes", status  # window.onerror would have written "error: ..."
        assert len(re.findall(r'<g class="node[^"]*" data-tree="\d" data-node="\d+"', dom)) == total
        for task in TASKS:  # each question as text (escaped), in the contents and its tree's heading
            question = task.question.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            assert dom.count(question) >= 2
    assert f'<p id="clicked">clicked {total}</p>' in dom
    assert "answer" in dom and "reward R" in dom and "score = H - alpha" in dom  # the last click showed a leaf's numbers


def test_older_and_malformed_files_are_refused_in_one_line(tokenizer, tmp_path):
    _, path = saved_trees(tokenizer, tmp_path)
    good = json.loads(path.read_text())
    old = [{k: v for k, v in tree.items() if k not in ("settings", "rounds")} for tree in good]
    bad_round = [{**good[0], "rounds": [{"round": 1, "nodes_before": 3, "picks": [999], "ranked": []}]}]
    bad_node = [{**good[0], "nodes": [n if i != 1 else {**n, "value_from": [[0, "heavy"]]} for i, n in enumerate(good[0]["nodes"])]}]
    cases = {"old": (old, "saved by an older train.py"), "round": (bad_round, "'rounds' must be a list of rounds"),
             "node": (bad_node, "node 1: needs an 'observation' text"), "empty": ([], "holds no tree")}
    for name, (content, message) in cases.items():
        file = tmp_path / f"{name}.json"
        file.write_text(json.dumps(content))
        proc = explore(file, tmp_path / f"{name}.html")
        [line] = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and line.startswith(f"error: {file}") and message in line, line
        assert not (tmp_path / f"{name}.html").exists()
