"""Draw a rollout tree that train.py saved (`<output-dir>/trees/step_XXXXXX.json`, every `--save-trees-every` steps).

    .venv/bin/python tree_picture.py runs/atpo/trees/step_000010.json --tree 0 --out tree.png   (or .svg)

One box per turn: its action (search query or answer, shortened), the node entropy H, how often the expansion
picked it (orange frame; each pick gave it one re-sampled sibling), its value V and turn advantage A. Leaves are
coloured by their reward (red 0 -> green 1); the root box is the question.
"""

import argparse
import json
import math
from pathlib import Path

NUMBERS = ("entropy", "value", "advantage")


def load_trees(path: str | Path) -> list[dict]:
    """The trees of one JSON file, checked: a ValueError names the file, tree, node and field at fault."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: is a directory, not a trees file" if path.is_dir() else f"{path}: no such file")
    try:
        trees = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(trees, list):
        raise ValueError(f"{path}: expected a list of trees, got {type(trees).__name__}")
    for t, tree in enumerate(trees):
        where = f"{path}: tree {t}"
        if not isinstance(tree, dict) or not isinstance(tree.get("nodes"), list) or not tree["nodes"]:
            raise ValueError(f"{where}: expected an object with a non-empty 'nodes' list")
        for i, node in enumerate(tree["nodes"]):
            if not isinstance(node, dict):
                raise ValueError(f"{where} node {i}: expected an object")
            parent = node.get("parent")
            if i == 0 and parent != -1:
                raise ValueError(f"{where} node 0: the root's parent must be -1, got {parent!r}")
            if i > 0 and not (isinstance(parent, int) and not isinstance(parent, bool) and 0 <= parent < i):
                raise ValueError(f"{where} node {i}: parent must be an earlier node, got {parent!r}")
            for key in NUMBERS:
                if not isinstance(node.get(key), (int, float)) or not math.isfinite(node[key]):
                    raise ValueError(f"{where} node {i}: '{key}' must be a finite number, got {node.get(key)!r}")
            if i > 0 and node.get("end") and not (isinstance(node.get("reward"), (int, float)) and math.isfinite(node["reward"])):
                raise ValueError(f"{where} node {i}: a leaf needs a finite 'reward', got {node.get('reward')!r}")
            for key in ("action", "content", "end", "text"):
                if node.get(key) is not None and not isinstance(node[key], str):
                    raise ValueError(f"{where} node {i}: '{key}' must be text, got {node[key]!r:.80}")
            picked_in = node.get("picked_in", [])
            if not (isinstance(picked_in, list) and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in picked_in)):
                raise ValueError(f"{where} node {i}: 'picked_in' must be a list of expansion rounds, got {picked_in!r:.80}")
    return trees


def layout(parents: list[int]) -> list[tuple[float, int]]:
    """(x, depth) per node: leaves one unit apart in depth-first order, a parent centred over its children."""
    children: list[list[int]] = [[] for _ in parents]
    for node, parent in enumerate(parents[1:], 1):
        children[parent].append(node)
    x, depth = [0.0] * len(parents), [0] * len(parents)
    next_leaf = 0.0

    def place(node: int) -> None:
        nonlocal next_leaf
        for child in children[node]:
            depth[child] = depth[node] + 1
            place(child)
        if children[node]:
            x[node] = (x[children[node][0]] + x[children[node][-1]]) / 2
        else:
            x[node], next_leaf = next_leaf, next_leaf + 1

    place(0)
    return list(zip(x, depth))


def shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def node_label(node: dict) -> str:
    action = node.get("action") or "?"
    lines = [f"{action}: {shorten(node.get('content') or '', 22)}" if action in ("search", "answer") else shorten(action, 24)]
    lines.append(f"H {node['entropy']:.2f}" + (f"  picked ×{len(node['picked_in'])}" if node.get("picked_in") else ""))
    lines.append(f"V {node['value']:.2f}  A {node['advantage']:+.2f}")
    if node.get("end"):
        lines.append(f"reward {node['reward']:.2f} ({node['end']})")
    return "\n".join(lines)


def render(tree: dict, out: str | Path) -> None:
    """Draw one tree (as load_trees returns it) to `out`; the suffix picks the format (.png, .svg, .pdf)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = tree["nodes"]
    positions = layout([n["parent"] for n in nodes])
    has_children = {n["parent"] for n in nodes}
    leaves = len(nodes) - len(has_children - {-1})
    levels = max(d for _, d in positions) + 1
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * leaves), 1.2 + 1.25 * levels))
    for i, node in enumerate(nodes[1:], 1):
        (x0, d0), (x1, d1) = positions[node["parent"]], positions[i]
        ax.plot([x0, x1], [-d0, -d1], color="0.6", linewidth=1, zorder=1)
    cmap = plt.get_cmap("RdYlGn")
    for i, node in enumerate(nodes):
        x, d = positions[i]
        if i == 0:
            text = "Q: " + shorten(tree.get("question", ""), 60) + "\ngold: " + shorten(", ".join(tree.get("answers", [])), 40)
            face, edge, width = "#dce9f7", "0.3", 1.0
        else:
            text = node_label(node)
            reward = min(max(node.get("reward") or 0.0, 0.0), 1.0)
            face = "0.93" if i in has_children else tuple(0.45 + 0.55 * c for c in cmap(reward)[:3])  # lightened
            edge, width = ("#ff8c00", 2.5) if node.get("picked_in") else ("0.3", 1.0)
        ax.text(x, -d, text, ha="center", va="center", fontsize=6.5, zorder=2,
                bbox={"boxstyle": "round,pad=0.35", "facecolor": face, "edgecolor": edge, "linewidth": width})
    ax.set_xlim(-0.7, max(leaves - 0.3, 0.7))
    ax.set_ylim(-levels + 0.4, 0.6)
    ax.axis("off")
    fig.text(0.01, 0.01, "H node entropy, V value, A turn advantage; orange frame: picked for expansion; "
             "leaf colour: reward 0 (red) to 1 (green)", fontsize=6.5, color="0.35")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", help="a trees/step_XXXXXX.json file written by train.py")
    parser.add_argument("--tree", type=int, default=0, help="which tree of the file")
    parser.add_argument("--out", default="tree.png", help="image to write (.png, .svg or .pdf)")
    args = parser.parse_args()
    try:
        trees = load_trees(args.trees)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if not 0 <= args.tree < len(trees):
        raise SystemExit(f"error: {args.trees} holds {len(trees)} trees; --tree {args.tree} is out of range")
    render(trees[args.tree], args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
