"""Curves of a training run from its `metrics.jsonl`: held-out EM per data source, training reward, and the
learning diagnostics, against the RL step. train.py draws `<output-dir>/curves.png` at the end of a run.

    .venv/bin/python curves.py runs/atpo/metrics.jsonl --out curves.png      (or .svg)
"""

import argparse
import json
from pathlib import Path

PANELS = [  # (title, metric name prefixes): every metric starting with a prefix is one line of the panel
    ("held-out EM (greedy)", ["eval/em", "eval/two_hop_second_search", "eval/three_hop_third_search"]),
    ("training reward", ["charts/reward"]),
    ("episodes with two or more searches", ["charts/second_search/"]),
    ("trees whose leaves all got one reward", ["charts/uniform_trees"]),
    ("mean entropy per turn depth", ["charts/entropy/turn"]),
    ("KL to the start policy (k3)", ["losses/kl_to_start"]),
]


def load_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl: per-step rows (with "losses/policy") and evaluation rows (with "eval/..."). A torn last
    line (a run killed while writing it) is left out; a broken line before it is an error."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: is a directory, not a metrics file" if Path(path).is_dir() else f"{path}: no such file")
    lines = [line for line in Path(path).read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({err}), and it is not the last line") from None
            continue
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise ValueError(f"{path}: line {i + 1} is not a metrics row (an object with an integer 'step'): {line[:80]}")
        rows.append(row)
    return rows


def series(rows: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every metric named `prefix...` as (steps, values), in the order the rows come."""
    found: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name.startswith(prefix) and isinstance(value, (int, float)):
                steps, values = found.setdefault(name, ([], []))
                steps.append(row["step"])
                values.append(value)
    return found


def draw_curves(rows: list[dict], out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (title, prefixes) in zip(axes.flat, PANELS):
        for prefix in prefixes:
            for name, (steps, values) in series(rows, prefix).items():
                ax.plot(steps, values, marker="o" if name.startswith("eval/") else None, markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="a run's metrics.jsonl")
    parser.add_argument("--out", default="curves.png")
    args = parser.parse_args()
    try:
        rows = load_metrics(args.metrics)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if not any(isinstance(r, dict) and "step" in r for r in rows):
        raise SystemExit(f"error: {args.metrics}: no metrics rows to draw")
    draw_curves(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
