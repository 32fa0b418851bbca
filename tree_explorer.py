"""Explore the rollout trees train.py saved (`<output-dir>/trees/step_XXXXXX.json`) in a browser: one HTML page that
opens from disk, offline (no network, nothing fetched).

    .venv/bin/python tree_explorer.py runs/atpo/trees/step_000010.json --out trees.html

Every tree of the file, one under another. Click a node to read its turn (the model's tokens) and the observation
after it, its entropy H (§1.2), its expansion score in each round and whether it was picked (§1.3), how its value V
came from its children or, at a leaf, from its reward (§2.1-2.2), and its advantage A (§2.3); a leaf also shows the
answer and the gold answers. The slider replays the growth: the M chains, then each expansion round's picks and
branches. Every number is the one train.py computed and saved (checkpoint.tree_record); the page computes none.
A node's link (the address after a click, e.g. trees.html#tree-0-node-7) opens the page on that node.
"""

import argparse
import html
import json
import math
from pathlib import Path

from tree_picture import layout, load_trees

SETTINGS = ("m", "l", "k", "alpha", "expansion", "value_mode", "adv_mode")


def check_explorable(trees: list[dict], path: str | Path) -> None:
    """What the page reads beyond what load_trees checks: a ValueError naming the file, tree and field at fault (a file
    saved by an older train.py lacks them all)."""
    for t, tree in enumerate(trees):
        where = f"{path}: tree {t}"
        if not all(key in tree for key in ("settings", "rounds", "reward_mean", "reward_std")):
            raise ValueError(f"{where} has no 'settings', 'rounds' or reward statistics (saved by an older train.py? "
                             "tree_picture.py draws it)")
        if not isinstance(tree["settings"], dict) or any(key not in tree["settings"] for key in SETTINGS):
            raise ValueError(f"{where}: 'settings' must hold {', '.join(SETTINGS)}")
        if not all(isinstance(tree[key], (int, float)) and math.isfinite(tree[key]) for key in ("reward_mean", "reward_std")):
            raise ValueError(f"{where}: 'reward_mean' and 'reward_std' must be finite numbers")
        size = len(tree["nodes"])
        for r in tree["rounds"] if isinstance(tree["rounds"], list) else [None]:
            if not (isinstance(r, dict) and isinstance(r.get("round"), int) and isinstance(r.get("nodes_before"), int)
                    and is_node_list(r.get("picks"), size) and isinstance(r.get("ranked"), list)
                    and all(isinstance(c, dict) and is_node_list([c.get("node")], size) and all(is_number(c.get(key))
                            for key in ("entropy", "children_of_parent", "score")) for c in r["ranked"])):
                raise ValueError(f"{where}: 'rounds' must be a list of rounds (round, nodes_before, picks, ranked scores)")
        for i, node in enumerate(tree["nodes"]):
            if not (isinstance(node.get("observation"), str) and isinstance(node.get("round"), int)
                    and isinstance(node.get("picked_in"), list) and isinstance(node.get("value_from"), list)
                    and all(isinstance(pair, list) and len(pair) == 2 and is_node_list(pair[:1], size) and is_number(pair[1])
                            for pair in node["value_from"])):
                raise ValueError(f"{where} node {i}: needs an 'observation' text, a 'round', a 'picked_in' list and "
                                 "'value_from' pairs [node, weight]")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_node_list(value, size: int) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < size for n in value)


def page(trees: list[dict], title: str) -> str:
    """The self-contained HTML page: the trees (and each node's place in the drawing) as JSON, read by the script."""
    for tree in trees:
        tree["layout"] = layout([n["parent"] for n in tree["nodes"]])
    data = json.dumps(trees).replace("</", "<\\/")  # no "</script>" inside the script element
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)


PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>AT²PO trees: __TITLE__</title>
<script>window.onerror = (message, source, line) => { const s = document.getElementById("status");
  if (s) { s.textContent = "error: " + message + " (line " + line + ")"; s.className = "error"; } };</script>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.2em 2em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin: 0 0 .3em; }
.tree { border-top: 2px solid #ccd; padding: 1em 0 1.5em; }
.cols { display: flex; gap: 1.5em; align-items: flex-start; }
.drawing { overflow-x: auto; max-width: 60%; border: 1px solid #e3e3e8; background: #fbfbfd; }
.detail { flex: 1; min-width: 26em; }
.turn { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12.5px; background: #eef4ff;
  border-left: 4px solid #3b6fd8; padding: .4em .6em; margin: .2em 0 .6em; }
.observation { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12.5px; background: #f1f1f1;
  border-left: 4px solid #999; padding: .4em .6em; margin: .2em 0 .6em; color: #444; max-height: 16em; overflow-y: auto; }
.label { font-size: 12px; color: #666; text-transform: uppercase; letter-spacing: .04em; }
table.numbers { border-collapse: collapse; margin: .2em 0 .7em; } table.numbers td { padding: .1em .7em .1em 0; }
.picked { color: #d26a00; font-weight: 600; } .error { color: #b00; font-weight: 700; } .muted { color: #777; }
svg text { font: 10px system-ui, sans-serif; pointer-events: none; }
svg .node { cursor: pointer; } svg .selected circle { stroke: #000; stroke-width: 3; }
.growth { margin: .4em 0; } .growth button { margin-right: .3em; }
</style></head><body>
<h1>AT²PO rollout trees: __TITLE__</h1>
<p id="settings" class="muted"></p>
<p class="muted">Circles are turns (node 0 is the question). Leaf colour: reward 0 (red) to 1 (green); orange ring: picked
for expansion (the ring appears when the slider reaches that round); click a node for its numbers.</p>
<ol id="contents"></ol>
<div id="trees"></div>
<p id="status">loading</p>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const trees = JSON.parse(document.getElementById("data").textContent);
const fmt = (x, digits = 3) => (x === null || x === undefined) ? "-" : Number(x).toFixed(digits);
const el = (tag, attrs = {}, text = "") => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text) node.textContent = text;
  return node;
};
const svgEl = (tag, attrs = {}) => {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
};
const rewardColour = r => `hsl(${Math.round(120 * Math.min(Math.max(r, 0), 1))}, 65%, 55%)`;
const s = trees[0].settings;
document.getElementById("settings").textContent = `M = ${s.m} chains, L = ${s.l} rounds of K = ${s.k} branches, ` +
  `alpha = ${s.alpha}, expansion ${s.expansion}, values ${s.value_mode}, advantages ${s.adv_mode}; ${trees.length} trees`;

function roundName(r) { return r === 0 ? "the M chains" : `expansion round ${r}`; }

function drawTree(t, tree, section) {
  const nodes = tree.nodes, pos = tree.layout, dx = 72, dy = 70;
  const width = Math.max(...pos.map(p => p[0])) * dx + 80, height = Math.max(...pos.map(p => p[1])) * dy + 60;
  const svg = svgEl("svg", {width, height});
  const xy = i => [40 + pos[i][0] * dx, 30 + pos[i][1] * dy];
  const shapes = [];
  nodes.forEach((node, i) => {
    if (i === 0) return;
    const [x0, y0] = xy(node.parent), [x1, y1] = xy(i);
    const line = svgEl("line", {x1: x0, y1: y0, x2: x1, y2: y1, stroke: "#999"});
    svg.appendChild(line);
    shapes[i] = {line};
  });
  const hasChildren = new Set(nodes.map(n => n.parent));
  nodes.forEach((node, i) => {
    const [x, y] = xy(i);
    const g = svgEl("g", {class: "node", "data-tree": t, "data-node": i});
    const fill = i === 0 ? "#9cc0ef" : hasChildren.has(i) ? "#ddd" : rewardColour(node.reward);
    const circle = svgEl("circle", {cx: x, cy: y, r: 13, fill, stroke: "#555", "stroke-width": 1});
    const ring = svgEl("circle", {cx: x, cy: y, r: 17, fill: "none", stroke: "#f08a00", "stroke-width": 3, visibility: "hidden"});
    const id = svgEl("text", {x, y: y + 3.5, "text-anchor": "middle"}); id.textContent = i;
    const label = svgEl("text", {x, y: y + 28, "text-anchor": "middle", fill: "#555"});
    label.textContent = i === 0 ? "question" : (node.action || "?");
    g.append(ring, circle, id, label);
    g.addEventListener("click", () => { show(t, i); history.replaceState(null, "", `#tree-${t}-node-${i}`); });
    svg.appendChild(g);
    shapes[i] = {...shapes[i], g, ring};
  });
  section.drawing.appendChild(svg);
  section.shapes = shapes;
}

function grow(t, upTo) {  // show the nodes sampled up to index upTo, and the picks made by then
  const tree = trees[t], section = sections[t];
  tree.nodes.forEach((node, i) => {
    const shown = i <= upTo;
    section.shapes[i].g.style.display = shown ? "" : "none";
    if (i > 0) section.shapes[i].line.style.display = shown ? "" : "none";
    const pickedBy = node.picked_in.filter(r => tree.rounds.some(d => d.round === r && d.nodes_before <= upTo + 1));
    section.shapes[i].ring.setAttribute("visibility", pickedBy.length && shown ? "visible" : "hidden");
  });
  const round = tree.nodes[upTo].round;
  section.growthText.textContent = `${upTo + 1} of ${tree.nodes.length} nodes: up to node ${upTo}, sampled in ${roundName(round)}`;
}

function addRow(table, name, value) {
  const tr = el("tr"); tr.append(el("td", {}, name), el("td", {}, value)); table.appendChild(tr);
}

function show(t, i) {
  const tree = trees[t], node = tree.nodes[i], section = sections[t], out = section.detail, set = tree.settings;
  section.shapes.forEach(s => s.g.classList.remove("selected"));
  section.shapes[i].g.classList.add("selected");
  out.replaceChildren();
  if (i === 0) {
    out.append(el("h2", {}, "Node 0: the question (root)"), el("div", {class: "turn"}, tree.question),
               el("p", {}, `gold answers: ${tree.answers.join(" | ")}`));
  } else {
    const leaf = !tree.nodes.some(n => n.parent === i);
    out.append(el("h2", {}, `Node ${i}: ${leaf ? "a leaf" : "a turn"} (parent ${node.parent}), sampled in ${roundName(node.round)}`));
    out.append(el("div", {class: "label"}, "turn: the model's tokens (trained on)"), el("div", {class: "turn"}, node.text));
    if (node.observation) out.append(el("div", {class: "label"}, "observation: the environment's answer (not trained on)"),
                                     el("div", {class: "observation"}, node.observation));
    const facts = el("table", {class: "numbers"});
    addRow(facts, "entropy H (§1.2)", fmt(node.entropy, 4) + "  (mean -log-prob of its tokens)");
    if (node.action) addRow(facts, "action", node.action + (node.content ? `: ${node.content}` : ""));
    if (leaf) {
      addRow(facts, "ended by", node.end || "-");
      addRow(facts, "reward R", fmt(node.reward, 3));
      if (node.action === "answer") addRow(facts, "answer", node.content || "");
      addRow(facts, "gold answers", tree.answers.join(" | "));
    }
    out.append(facts);
  }
  // §1.3: the node's score in every round it was a candidate, and the picks
  const expansion = el("div");
  for (const round of tree.rounds) {
    const rank = round.ranked.findIndex(c => c.node === i);
    const times = node.picked_in.filter(r => r === round.round).length;
    const picked = times ? ` picked${times > 1 ? " ×" + times : ""}: a new sibling re-sampled from node ${Math.max(node.parent, 0)}'s state` : " not picked";
    if (rank >= 0) {
      const c = round.ranked[rank];
      const p = el("p", {}, `round ${round.round}: score = H - alpha·(c - 1) = ${fmt(c.entropy, 4)} - ${set.alpha}·(${c.children_of_parent} - 1)` +
                   ` = ${fmt(c.score, 4)}, rank ${rank + 1} of ${round.ranked.length} (top ${set.k} picked);`);
      p.appendChild(el("span", {class: times ? "picked" : ""}, picked));
      expansion.appendChild(p);
    } else if (times) {
      expansion.appendChild(el("p", {class: "picked"}, `round ${round.round}:${picked} (${set.expansion} expansion: no score)`));
    } else if (i < round.nodes_before && set.expansion === "entropy" && !node.end) {
      expansion.appendChild(el("p", {class: "muted"}, `round ${round.round}: not a candidate`));
    }
  }
  if (expansion.childNodes.length) out.append(el("div", {class: "label"}, "expansion (§1.3)"), expansion);
  // §2: the value and the advantage, with the numbers they came from
  out.append(el("div", {class: "label"}, `value V (§2.1-2.2, ${set.value_mode})`));
  const value = el("table", {class: "numbers"});
  if (node.value_from.length) {
    const what = set.value_mode === "child_softmax" ? "softmax of the children's H" : set.value_mode === "child_mean" ? "mean of the children" : "mean of the leaves under it";
    addRow(value, `V = Σ w·V (${what})`, fmt(node.value, 4));
    for (const [source, weight] of node.value_from) addRow(value, `  node ${source}: w = ${fmt(weight, 4)}`, `V = ${fmt(tree.nodes[source].value, 4)}`);
  } else if (tree.reward_std === 0) {
    addRow(value, "v = 0: every reward of the tree is equal", fmt(node.value, 4));
  } else {
    addRow(value, `v = (R - mean R) / (std R + 1e-6) = (${fmt(node.reward)} - ${fmt(tree.reward_mean, 4)}) / (${fmt(tree.reward_std, 4)} + 1e-6)`, fmt(node.value, 4));
  }
  out.append(value, el("div", {class: "label"}, `advantage A (§2.3, ${set.adv_mode})`));
  const vp = i ? tree.nodes[node.parent].value : null, vr = tree.nodes[0].value;
  const formula = i === 0 ? "A(root) = V(root)" : {
    node_value: `A = V(n) = ${fmt(node.value, 4)}`,
    diff_parent: `A = V(n) - V(parent) = ${fmt(node.value, 4)} - ${fmt(vp, 4)}`,
    diff_global: `A = V(n) - V(root) = ${fmt(node.value, 4)} - ${fmt(vr, 4)}`,
    diff_localglobal: `A = (V(n) - V(parent)) + (V(n) - V(root)) = (${fmt(node.value, 4)} - ${fmt(vp, 4)}) + (${fmt(node.value, 4)} - ${fmt(vr, 4)})`,
  }[set.adv_mode];
  const adv = el("table", {class: "numbers"}); addRow(adv, formula, "= " + fmt(node.advantage, 4));
  out.append(adv, el("p", {class: "muted"}, i ? "every model token of this turn gets A in the loss (§2.4)" : "the root has no tokens"));
}

const sections = [];
trees.forEach((tree, t) => {
  const item = el("li"); const link = el("a", {href: `#tree-${t}`}, tree.question); item.appendChild(link);
  document.getElementById("contents").appendChild(item);
  const section = el("div", {class: "tree", id: `tree-${t}`});
  const leaves = tree.nodes.filter((n, i) => !tree.nodes.some(m => m.parent === i)).length;
  section.append(el("h2", {}, `Tree ${t}: ${tree.question}`),
                 el("p", {class: "muted"}, `gold: ${tree.answers.join(" | ")}; ${tree.nodes.length - 1} turns, ${leaves} leaves; ` +
                    `rewards mean ${fmt(tree.reward_mean)}, std ${fmt(tree.reward_std)}`));
  const growth = el("div", {class: "growth"});
  const slider = el("input", {type: "range", min: 0, max: tree.nodes.length - 1, value: tree.nodes.length - 1});
  const growthText = el("span");
  slider.addEventListener("input", () => grow(t, Number(slider.value)));
  const jump = (name, upTo) => { const b = el("button", {}, name); b.addEventListener("click", () => { slider.value = upTo; grow(t, upTo); }); return b; };
  growth.append(el("span", {class: "label"}, "growth "), slider, " ");
  growth.append(jump("chains", (tree.rounds[0] ? tree.rounds[0].nodes_before : tree.nodes.length) - 1));
  tree.rounds.forEach((round, r) => growth.append(jump(`round ${round.round}`, (tree.rounds[r + 1] ? tree.rounds[r + 1].nodes_before : tree.nodes.length) - 1)));
  growth.append(growthText);
  const cols = el("div", {class: "cols"}), drawing = el("div", {class: "drawing"}), detail = el("div", {class: "detail"});
  cols.append(drawing, detail);
  section.append(growth, cols);
  document.getElementById("trees").appendChild(section);
  sections.push({drawing, detail, growthText});
  drawTree(t, tree, sections[t]);
  grow(t, tree.nodes.length - 1);
  show(t, 0);
});
const linked = location.hash.match(/^#tree-(\d+)-node-(\d+)$/);  // a link to one node: that node shown
if (linked && trees[+linked[1]] && trees[+linked[1]].nodes[+linked[2]]) { show(+linked[1], +linked[2]); document.getElementById(`tree-${linked[1]}`).scrollIntoView(); }
document.getElementById("status").textContent = `showing ${trees.length} trees, ${trees.reduce((n, tree) => n + tree.nodes.length, 0)} nodes`;
</script></body></html>
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", help="a trees/step_XXXXXX.json file written by train.py")
    parser.add_argument("--out", default="trees.html", help="HTML page to write")
    args = parser.parse_args()
    try:
        trees = load_trees(args.trees)
        if not trees:
            raise ValueError(f"{args.trees} holds no tree")
        check_explorable(trees, args.trees)
        Path(args.out).write_text(page(trees, Path(args.trees).name), encoding="utf-8")
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.out} (open it in a browser; it needs no network)")


if __name__ == "__main__":
    main()
