"""Budget-matched comparison on the embedded default task: AT²PO vs Tree-GRPO-style trees vs GRPO chains (with and
without the gold transcripts' term), the transcripts' term without RL (a control), and the loss level (turn = ATPO,
sequence = GSPO, token = PPO), several seeds each.

    .venv/bin/python -m benchmarks.compare                  # runs what is missing (resumes stopped runs), then reports
    .venv/bin/python -m benchmarks.compare --settings entropy-no-demo chains-no-demo --seeds 14 15
    .venv/bin/python -m benchmarks.compare --report-only    # re-reads every kept result and rewrites the report

Every run is `python train.py --seed N` (the default recipe: its own warm start, 20 RL steps, 300 held-out questions)
plus the setting's own flags, `--eval-every` and `--enforce-eager` (the engine of every kept run): the same leaves
per question (M + L*K), questions per step, steps and evaluation for every setting. The settings of one seed start
from the same warm start (built first, alone, by `train.py --seed N --total-steps 0`, cached), so the report also gives each
setting's difference from its group's AT²PO run seed by seed, where the warm start's luck cancels. Runs go to
`--out-dir/<setting>/seed<N>/`, `--parallel` processes at a time; each checkpoints at its evaluations, so a stopped
comparison resumes where it stopped (a finished run's checkpoints are deleted, ~3 GiB each). A finished run's metrics
are kept in `--results-dir/compare/<setting>/seed<N>_<numerics>.jsonl` (committed: the comparison grows over machines
and sessions; the numerics, the dtype `--dtype auto` picks and the CPU's kernels for it, such as `bfloat16-avx512` or
`bfloat16-amx`, are in the name, and only runs of the same seed and numerics are paired). The report, always from
every kept run of every setting: the tables, between the `compare:begin`/`compare:end` markers of the results page
(`--page`, docs/results.md), and the plots `em_vs_step.png`, `em_vs_tokens.png`, `em_vs_step_no_demo.png`,
`loss_level.png` in `--results-dir`.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (label, train.py flags); "sampling" compares how the 6 leaves are drawn, "no-demo" the same without the
# gold transcripts' cross-entropy (--demo-coef 0: the default recipe's one term outside the paper's method),
# "control" the AT²PO run against the same updates without the RL gradient (--policy-coef 0: what the transcripts'
# term learns alone), "loss" the loss level. The loss levels differ only where the ratio leaves 1, i.e. off-policy:
# with one optimizer step per batch all three would give the same gradient; train.py's default takes two, and the
# loss runs say so.
SETTINGS = {
    "entropy": ("AT²PO: entropy-guided tree, turn loss", ["--expansion", "entropy"]),
    "random": ("Tree-GRPO-style: random tree, turn loss", ["--expansion", "random"]),
    "chains": ("GRPO: independent chains, turn loss", ["--expansion", "chains"]),
    "entropy-no-demo": ("AT²PO, no transcripts' term", ["--expansion", "entropy", "--demo-coef", "0"]),
    "random-no-demo": ("Tree-GRPO-style, no transcripts' term", ["--expansion", "random", "--demo-coef", "0"]),
    "chains-no-demo": ("GRPO chains, no transcripts' term", ["--expansion", "chains", "--demo-coef", "0"]),
    "transcripts-only": ("Transcripts' term alone, no RL gradient", ["--expansion", "entropy", "--policy-coef", "0"]),
    "loss-turn": ("2 updates/batch, turn loss (ATPO)", ["--expansion", "entropy", "--loss-level", "turn", "--num-minibatches", "2"]),
    "loss-sequence": ("2 updates/batch, sequence loss (GSPO)", ["--expansion", "entropy", "--loss-level", "sequence", "--num-minibatches", "2"]),
    "loss-token": ("2 updates/batch, token loss (PPO)", ["--expansion", "entropy", "--loss-level", "token", "--num-minibatches", "2"]),
}
# the three-hop variant of the default task (docs/results.md): longer episodes, where a tree's branches can share more turns
THREE_HOP_TASK = ["--train-data", "data/default/train_3hop.jsonl", "--test-data", "data/default/test_3hop.jsonl",
                  "--sft-demos", "data/default/demos_3hop.jsonl", "--demo-batch", "3"]
SETTINGS.update({f"{name}-3hop": (f"{SETTINGS[name][0].split(':')[0]}, three-hop task", SETTINGS[name][1] + THREE_HOP_TASK)
                 for name in ("entropy", "random", "chains")})
GROUPS = {"sampling": ["entropy", "random", "chains"], "no-demo": ["entropy-no-demo", "random-no-demo", "chains-no-demo"],
          "control": ["entropy", "transcripts-only"], "loss": ["loss-turn", "loss-sequence", "loss-token"],
          "three-hop": ["entropy-3hop", "random-3hop", "chains-3hop"]}  # the first of a group is its baseline in the pairing


# ----------------------------------------------------------------------------------------------------------------
# Reading runs (pure: metric rows in, numbers out)


def read_metrics(path: Path) -> list[dict]:
    """train.py's metrics.jsonl; a step's row repeated (runs resumed by a train.py that kept the resume step's
    evaluation and then evaluated that step again): the later row wins."""
    rows: dict[tuple[int, bool], dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            key = (int(row["step"]), "eval/em" in row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{number}: not a metrics row ({err})") from None
        rows[key] = row
    return [rows[k] for k in sorted(rows)]


def leaves_grown(steps: list[dict]) -> float:
    """Leaves of every tree the steps grew: trees drawn x leaves per tree (trained leaves / trained trees) where the
    run logged its draws (dynamic sampling drops trees), else the trained leaves."""
    per_tree = next((r["charts/leaves"] / r["charts/trees_trained"] for r in steps if r.get("charts/trees_trained")), None)
    return sum(r["charts/trees_drawn"] * per_tree if per_tree and "charts/trees_drawn" in r else r["charts/leaves"] for r in steps)


def logged_mean(steps: list[dict], key: str) -> float:
    """The mean of `key` over the steps that logged it (nan if none did: a metric newer than the run)."""
    values = [r[key] for r in steps if key in r]
    return sum(values) / len(values) if values else math.nan


def run_curve(rows: list[dict]) -> dict:
    """One run: evaluation steps, every evaluation metric there, generated tokens up to there; means over its steps
    (generated tokens per leaf of every tree grown, dropped ones included, and of each data source's trees where
    the run logged it: what shared prefixes save)."""
    evals = [r for r in rows if "eval/em" in r]
    steps = [r for r in rows if "losses/policy" in r]
    tokens = {0: 0}
    for r in sorted(steps, key=lambda r: r["step"]):
        tokens[r["step"]] = tokens[r["step"] - 1] + r["charts/generated_tokens"] if r["step"] - 1 in tokens else math.nan
    seconds = [r["time/step"] for r in steps]
    return {
        "eval_steps": [r["step"] for r in evals],
        "evals": {k: [r.get(k, math.nan) for r in evals] for k in sorted({k for r in evals for k in r} - {"step"})},
        "tokens": [tokens.get(r["step"], math.nan) for r in evals],  # generated tokens before that evaluation
        "tokens_per_leaf": sum(r["charts/generated_tokens"] for r in steps) / max(leaves_grown(steps), 1),
        "tokens_per_leaf_by_source": {k.removeprefix("charts/tokens_per_leaf/"): logged_mean(steps, k)
                                      for k in sorted({k for r in steps for k in r if k.startswith("charts/tokens_per_leaf/")})},
        "seconds_per_step": sum(seconds) / max(len(seconds), 1),
        "reward": sum(r["charts/reward"] for r in steps) / max(len(steps), 1),
        "uniform_trees": logged_mean(steps, "charts/uniform_trees"),
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(curves: list[dict]) -> dict:
    """Several seeds of one setting: mean and spread at every evaluation step all seeds reached."""
    steps = sorted(set.intersection(*(set(c["eval_steps"]) for c in curves)))

    def at(c: dict, values: list[float], step: int) -> float:
        return values[c["eval_steps"].index(step)]

    keys = sorted(set.intersection(*(set(c["evals"]) for c in curves)))
    by_source: dict[str, list[float]] = {}  # source -> tokens per leaf of the runs that logged it
    for c in curves:
        for source, tokens in c["tokens_per_leaf_by_source"].items():
            by_source.setdefault(source, []).append(tokens)
    return {
        "seeds": len(curves),
        "steps": steps,
        "evals": {k: [mean_std([at(c, c["evals"][k], s) for c in curves]) for s in steps] for k in keys},  # (mean, std)
        "tokens": [mean_std([at(c, c["tokens"], s) for c in curves])[0] for s in steps],
        "tokens_per_leaf": mean_std([c["tokens_per_leaf"] for c in curves]),
        "tokens_per_leaf_by_source": {k: (*mean_std(v), len(v)) for k, v in sorted(by_source.items())},  # (mean, std, runs)
        "seconds_per_step": mean_std([c["seconds_per_step"] for c in curves]),
        "reward": mean_std([c["reward"] for c in curves]),
        "uniform_trees": mean_std([c["uniform_trees"] for c in curves]),
    }


HOPS = {"default-1hop": "single-hop", "default-2hop": "two-hop", "default-3hop": "three-hop"}  # data source -> column
SEARCHED = {"eval/two_hop_second_search": "2nd search (two-hop)", "eval/three_hop_third_search": "3rd search (three-hop)"}


def columns(hops: int) -> tuple[list[str], list[str]]:
    """The data sources and the searched-often-enough metrics a table of `hops`-hop questions shows (2: the default
    task, 3: its three-hop variant)."""
    return list(HOPS)[:hops], list(SEARCHED)[: hops - 1]


def results_table(summaries: dict[str, dict], hops: int = 2) -> str:
    """The markdown table of the report, one row per setting."""
    sources, searched = columns(hops)
    lines = [
        "| setting | runs | EM at step 0 | final EM | " + " | ".join(HOPS[k] for k in sources) + " | "
        + " | ".join(SEARCHED[m] for m in searched) + " | train reward | uniform trees (dropped) | "
        + " | ".join(f"tokens / leaf, {HOPS[k]}" for k in sources) + " | tokens / leaf, all trees | s / step |",
        "|---" * (9 + 2 * len(sources) + len(searched) - 1) + "|",
    ]

    def pm(pair: tuple[float, float], digits: int = 3) -> str:
        return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"

    for name, s in summaries.items():
        f = {k: v[-1] for k, v in s["evals"].items()}
        by_source = [s["tokens_per_leaf_by_source"].get(k) for k in sources]
        tokens = [f"{pm(t[:2], 1)}" + (f" ({t[2]} of {s['seeds']} runs)" if t[2] < s["seeds"] else "") if t else "not logged" for t in by_source]
        lines.append(
            f"| {SETTINGS[name][0] if name in SETTINGS else name} | {s['seeds']} | {pm(s['evals']['eval/em'][0])} | "
            f"{pm(f['eval/em'])} (step {s['steps'][-1]}) | "
            + " | ".join(pm(f.get(m, (math.nan, 0))) for m in [f"eval/em/{k}" for k in sources] + searched) + " | "
            f"{pm(s['reward'])} | {pm(s['uniform_trees'], 2)} | " + " | ".join(tokens) + " | "
            f"{pm(s['tokens_per_leaf'], 1)} | {pm(s['seconds_per_step'], 1)} |"
        )
    return "\n".join(lines)


def paired_differences(curves: dict[str, dict[str, dict]], baseline: str = "entropy") -> dict[str, dict]:
    """Each setting's final evaluation minus the baseline's on the same run key (seed and numerics: the same warm
    start), for every key both finished: per metric, the mean and sample std of the differences, and how many
    were above zero. `curves`: setting -> run key -> run_curve."""
    out = {}
    for name, runs in curves.items():
        keys = sorted(set(runs) & set(curves.get(baseline, {})))
        if name == baseline or not keys:
            continue
        out[name] = {"keys": keys}
        for metric in ["eval/em"] + [f"eval/em/{k}" for k in HOPS] + list(SEARCHED):
            diffs = [runs[k]["evals"][metric][-1] - curves[baseline][k]["evals"][metric][-1] for k in keys
                     if metric in runs[k]["evals"] and metric in curves[baseline][k]["evals"]]
            if diffs:
                out[name][metric] = (*mean_std(diffs), sum(d > 0 for d in diffs))
    return out


def paired_table(differences: dict[str, dict], baseline: str = "entropy", hops: int = 2) -> str:
    """The markdown table of `paired_differences`."""
    sources, searched = columns(hops)
    lines = [f"| final evaluation minus {SETTINGS[baseline][0]}, same seed | runs (seed_numerics) | EM | "
             + " | ".join([HOPS[k] for k in sources] + [SEARCHED[m] for m in searched]) + " |",
             "|---" * (3 + len(sources) + len(searched)) + "|"]
    for name, d in differences.items():
        cells = []
        for metric in ["eval/em"] + [f"eval/em/{k}" for k in sources] + searched:
            mean, std, above = d.get(metric, (math.nan, math.nan, 0))
            cells.append(f"{mean:+.3f} ± {std:.3f} ({above} of {len(d['keys'])} above 0)")
        lines.append(f"| {SETTINGS[name][0]} | {', '.join(d['keys'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_run_table(curves: dict[str, dict[str, dict]], group: list[str], hops: int = 2) -> str:
    """Every run's final evaluation, EM / single-hop / two-hop (/ three-hop): a row per run key (seed and numerics,
    with the EM of its warm start at step 0), a column per setting of `group` that has runs."""
    names = [n for n in group if n in curves]
    metrics = ["eval/em"] + [f"eval/em/{k}" for k in columns(hops)[0]]
    keys = sorted(set().union(*(curves[n] for n in names)), key=lambda k: (int(k.split("_")[0].removeprefix("seed")), k))
    lines = [f"| run (EM at step 0): final EM / {' / '.join(HOPS[k] for k in columns(hops)[0])} | "
             + " | ".join(SETTINGS[n][0] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        step0 = next(curves[n][key]["evals"]["eval/em"][0] for n in names if key in curves[n])
        cells = [" / ".join(f"{curves[n][key]['evals'][m][-1]:.3f}" for m in metrics) if key in curves[n] else "—" for n in names]
        lines.append(f"| {key} ({step0:.3f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Running


def is_done(metrics_path: Path, total_steps: int) -> bool:
    """A run is finished once its final evaluation (logged at step `total_steps`) is in its metrics.jsonl."""
    return metrics_path.exists() and any(r["step"] == total_steps and "eval/em" in r for r in read_metrics(metrics_path))


def run_dir_of(args, name: str, seed: int) -> Path:
    return Path(args.out_dir) / name / f"seed{seed}"


def kept_path(args, name: str, seed: int, numerics: str) -> Path:
    """Where a finished run's metrics are kept (and committed)."""
    return Path(args.results_dir) / "compare" / name / f"seed{seed}_{numerics}.jsonl"


# The engine every kept run was made with: vLLM eager. The compiled engine (train.py's default since) computes with
# other kernels, so its step-0 evaluation of a seed's warm start would not be the kept runs' one (the pairs would
# no longer start from the same scores).
KEPT_SPEED_SETTINGS = ["--enforce-eager"]


def train_command(args, name: str, seed: int, threads: int) -> list[str]:
    """The default run of `seed` plus the setting's flags (checkpoints and trees saved at every evaluation), with the
    speed settings every kept run was made with (KEPT_SPEED_SETTINGS)."""
    run_dir = run_dir_of(args, name, seed)
    command = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--output-dir", str(run_dir),
               "--total-steps", str(args.total_steps), "--eval-every", str(args.eval_every),
               "--eval-questions", str(args.eval_questions), "--save-every", str(args.eval_every),
               "--save-trees-every", str(args.eval_every), "--threads", str(threads),
               *KEPT_SPEED_SETTINGS] + SETTINGS[name][1]
    if (run_dir / "checkpoint" / "state.pt").exists():
        return command + ["--resume"]
    return command + (["--overwrite-output-dir"] if (run_dir / "metrics.jsonl").exists() else [])  # stopped before a checkpoint


def machine_numerics() -> str:
    """The dtype `--dtype auto` picks here and the kind of kernels that compute it, e.g. `bfloat16-amx` (part of a kept
    run's name): a warm start made with other kernels differs in its last bits and so in its scores (seed 14's
    step-0 EM: 0.517 with AVX512-BF16, 0.540 with AMX), so only runs of the same seed and numerics are paired."""
    import torch

    sys.path.insert(0, str(ROOT))
    from engine import resolve_dtype

    dtype = resolve_dtype("auto")
    if torch.cuda.is_available():
        return f"{dtype}-cuda"
    amx = dtype == "bfloat16" and torch.cpu._is_amx_tile_supported()
    return f"{dtype}-{'amx' if amx else torch.backends.cpu.get_cpu_capability().lower()}"


def task_flags(name: str) -> list[str]:
    """The setting's flags that choose the task (and so the warm start): none for the default task."""
    return THREE_HOP_TASK if name in GROUPS["three-hop"] else []


def ensure_warm_start(args, seed: int, dtype: str, task: list[str]) -> None:
    """The warm start of `seed` on the task `task` chooses (train.py caches it), made by `train.py --total-steps 0`
    when missing, before any run: the seed's runs, two at a time, must not both build it."""
    from train import Args
    from warm_start import warm_start_dir

    demos = dict(zip(task[::2], task[1::2])).get("--sft-demos", Args.sft_demos)
    path = warm_start_dir(Args(seed=seed, dtype=dtype, sft_demos=demos))  # train.py resolves --dtype before the key
    if not (path / "report.json").exists():
        out = Path(args.out_dir) / f"warm_start_seed{seed}{'_3hop' if task else ''}"
        print(f"making the warm start of seed {seed} ({path}), log in {out}.log", flush=True)
        with open(f"{out}.log", "w") as f:
            subprocess.run([sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--total-steps", "0",
                            "--eval-questions", "0", "--output-dir", str(out), "--overwrite-output-dir", *task], stdout=f,
                           stderr=subprocess.STDOUT, check=True, cwd=ROOT)


def keep_finished_run(run_dir: Path, kept: Path) -> None:
    """A finished run's metrics copied to its kept path, then its checkpoints deleted (its last two, about 3 GiB
    for the default model with AdamW's moments: 15 runs filled 45 GB); its log and saved trees stay."""
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text((run_dir / "metrics.jsonl").read_text())
    for checkpoint in run_dir.glob("checkpoint*"):
        shutil.rmtree(checkpoint)


def run_all(args, names: list[str]) -> list[str]:
    """Every (setting, seed) not kept yet, `--parallel` processes at a time (the cores split between them), seed by
    seed; a finished run's metrics are copied to its kept path and its checkpoints deleted. Returns the failures."""
    numerics = machine_numerics()
    dtype = numerics.split("-")[0]
    threads = max(1, len(os.sched_getaffinity(0)) // args.parallel)
    pending = [(n, s) for s in args.seeds for n in names if not kept_path(args, n, s, numerics).exists()]
    for seed, task in dict.fromkeys((s, tuple(task_flags(n))) for n, s in pending):  # alone first: beside a run,
        ensure_warm_start(args, seed, dtype, list(task))  # one took 18 min instead of 3
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failed = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name, seed = pending.pop(0)
            run_dir = run_dir_of(args, name, seed)
            run_dir.mkdir(parents=True, exist_ok=True)
            command = train_command(args, name, seed, threads)
            print(f"start {name} seed {seed}{' (resume)' if '--resume' in command else ''}", flush=True)
            log = (run_dir / "train.log").open("a")
            running.append((name, seed, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), time.time()))
        time.sleep(5)
        for item in list(running):
            name, seed, process, start = item
            if process.poll() is None:
                continue
            running.remove(item)
            minutes = (time.time() - start) / 60
            run_dir = run_dir_of(args, name, seed)
            if process.returncode == 0 and is_done(run_dir / "metrics.jsonl", args.total_steps):
                kept = kept_path(args, name, seed, numerics)
                keep_finished_run(run_dir, kept)
                print(f"done  {name} seed {seed} ({minutes:.1f} min), kept in {kept}", flush=True)
            else:
                failed.append(f"{name} seed {seed}: exit {process.returncode}, see {run_dir / 'train.log'}")
                print(f"FAILED {failed[-1]}", flush=True)
    return failed


# ----------------------------------------------------------------------------------------------------------------
# Report


def plot(summaries: dict[str, dict], curves: dict[str, list[dict]], x: str, path: Path, title: str) -> None:
    """Held-out EM (all, then per data source) against `x` ("step" or "tokens"): every seed thin, the mean thick,
    plus or minus one std shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(set.intersection(*(set(s["evals"]) for s in summaries.values())) & ({"eval/em"} | {
        k for s in summaries.values() for k in s["evals"] if k.startswith("eval/em/")}))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], panels):
        for color, (name, s) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], summaries.items()):
            xs = s["steps"] if x == "step" else s["tokens"]
            mean, std = [m for m, _ in s["evals"][key]], [d for _, d in s["evals"][key]]
            for c in curves[name]:
                ax.plot(c["eval_steps"] if x == "step" else c["tokens"], c["evals"][key], color=color, alpha=0.3, linewidth=0.8)
            ax.plot(xs, mean, color=color, linewidth=2, marker="o", label=f"{SETTINGS[name][0]} ({s['seeds']} runs)")
            ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], color=color, alpha=0.12)
        ax.set_title(("all questions" if key == "eval/em" else key.removeprefix("eval/em/")) + f" — {title}", fontsize=9)
        ax.set_xlabel("RL step" if x == "step" else "generated tokens (all trees, cumulative)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out EM (greedy)")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args) -> str:
    """Reads every kept run (finished: a final evaluation at `--total-steps`) of every setting, writes the plots and
    the block between the markers of the results page (`--page`); returns the tables (all settings; then, for each group with a pair, every run's
    final scores and the differences from the group's first setting)."""
    curves: dict[str, dict[str, dict]] = {}  # setting -> "seed<N>_<numerics>" -> run_curve
    for name in SETTINGS:
        for path in sorted((Path(args.results_dir) / "compare" / name).glob("seed*.jsonl")):
            if is_done(path, args.total_steps):
                curves.setdefault(name, {})[path.stem] = run_curve(read_metrics(path))
    summaries = {n: summarize(list(c.values())) for n, c in curves.items()}
    if not summaries:
        raise SystemExit(f"no finished runs in {Path(args.results_dir) / 'compare'}")
    results = Path(args.results_dir)
    budget = (f"{args.total_steps} RL steps, train.py's default recipe (each seed from its own warm start), greedy EM "
              f"on {args.eval_questions} held-out questions every {args.eval_every} steps; mean ± sample std over runs")
    for group, file, title in [("sampling", "em_vs_step.png", "how the leaves are sampled"), ("sampling", "em_vs_tokens.png", "how the leaves are sampled"),
                               ("no-demo", "em_vs_step_no_demo.png", "without the transcripts' term"),
                               ("loss", "loss_level.png", "loss level (entropy trees, 2 updates per batch)"),
                               ("three-hop", "em_vs_step_3hop.png", "three-hop task")]:
        chosen = {n: summaries[n] for n in GROUPS[group] if n in summaries}
        if chosen:
            plot(chosen, {n: list(c.values()) for n, c in curves.items()}, "tokens" if "tokens" in file else "step", results / file, title)
    three_hop = {n: s for n, s in summaries.items() if n in GROUPS["three-hop"]}
    tables = results_table({n: s for n, s in summaries.items() if n not in three_hop})
    if three_hop:
        tables += "\n\n" + results_table(three_hop, hops=3)
    for name, group in GROUPS.items():
        hops = 3 if name == "three-hop" else 2
        differences = paired_differences({n: curves[n] for n in group if n in curves}, baseline=group[0])
        if differences:
            tables += "\n\n" + per_run_table(curves, group, hops) + "\n\n" + paired_table(differences, group[0], hops)
    page = Path(args.page)
    text = page.read_text()
    begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{page} has no {begin} ... {end} block for the tables")
    head, rest = text.split(begin, 1)
    page.write_text(f"{head}{begin}\n{budget}.\n\n{tables}\n{end}{rest.split(end, 1)[1]}")
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="runs/compare")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--page", default="docs/results.md", help="the results page whose compare:begin/end block gets the tables")
    parser.add_argument("--settings", nargs="+", default=GROUPS["sampling"], choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[12, 13, 14, 15, 16])
    parser.add_argument("--total-steps", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-questions", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (the CPU cores split between them)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    started = time.time()
    failed = [] if args.report_only else run_all(args, args.settings)
    print(report(args))
    if not args.report_only:
        print(f"wall time {(time.time() - started) / 60:.1f} min")
    if failed:
        raise SystemExit("failed runs:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
