"""Where an RL step's time goes, and what a turn-level tree saves over independent chains.

    python -m benchmarks.bench_step            (from the repository root; reuses the cached warm start)

1. Runs `train.py` for a few steps with its default settings and prints the time split that train.py records
   (rollout, of which environment + retrieval; credit; old log-probs; update; weight sync) and generated tokens
   per second of rollout.
2. On the same questions, with the warmed-up policy in vLLM: a tree rollout (M + L*K leaves, entropy expansion)
   against M + L*K independent chains (GRPO sampling), side by side and interleaved over repeats: generated
   tokens and wall time, as ratios (goal: the tree needs <= 0.6x of the chains' tokens).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="train.py steps to time")
    parser.add_argument("--questions", type=int, default=16, help="questions for the tree-vs-chains comparison")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--m", type=int, default=3)
    parser.add_argument("--l", type=int, default=1)
    parser.add_argument("--k", type=int, default=3)
    args = parser.parse_args()

    # ---- 1. the time split of real training steps
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run(
            [sys.executable, "train.py", "--total-steps", str(args.steps), "--eval-questions", "0", "--output-dir", out,
             "--save-every", "1000", "--save-trees-every", "0"],
            cwd=ROOT, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    policy = re.search(r"cached in (\S+?)\)", proc.stdout)
    policy_path = policy.group(1) if policy else None
    keys = ["time/rollout", "time/env", "time/credit", "time/old_log_prob", "time/train", "time/sync"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    total = mean["time/rollout"] + mean["time/credit"] + mean["time/old_log_prob"] + mean["time/train"] + mean["time/sync"]
    tokens = sum(r["generated_tokens"] for r in rows) / len(rows)
    print(f"train.py defaults, mean of {len(rows)} steps: {total:.1f} s per step")
    for k in keys:
        label = k.split("/")[1] + (" (inside rollout)" if k == "time/env" else "")
        print(f"  {label:24s} {mean[k]:7.2f} s  {100 * mean[k] / total:5.1f} %")
    print(f"  generated tokens per step {tokens:.0f}, {tokens / mean['time/rollout']:.0f} tok/s of rollout")

    # ---- 2. tree vs chains on the same questions and the same leaf budget
    import torch  # noqa: F401  (after the thread settings)

    from transformers import AutoTokenizer

    import train
    from atpo_tree import grow_trees
    from default_model import default_model_path
    from envs import DEFAULT_TASK_DIR, BM25Retriever, SearchEnv, build_prompt, load_tasks

    path = policy_path or default_model_path()
    settings = train.Args(dtype=train.resolve_dtype("auto"))
    llm = train.start_engine(path, settings)  # before bm25s is imported (see train.py)
    tokenizer = AutoTokenizer.from_pretrained(path)
    env = SearchEnv(tokenizer, BM25Retriever(DEFAULT_TASK_DIR / "corpus.jsonl"), max_turns=settings.max_turns,
                    max_length=settings.max_length)
    tasks = random.Random(0).sample(load_tasks(DEFAULT_TASK_DIR / "train.jsonl"), args.questions)
    prompts = [build_prompt(tokenizer, t.question) for t in tasks]
    leaves = args.m + args.l * args.k
    results = {"tree": [], "chains": []}
    for repeat in range(args.repeats):
        for mode in ("entropy", "chains"):
            rng = random.Random(repeat)
            start = time.perf_counter()
            trees = grow_trees(prompts, tasks, train.make_generate(llm, settings, rng, 1.0), env.step,
                               m=args.m, l=args.l, k=args.k, mode=mode, rng=rng)
            seconds = time.perf_counter() - start
            generated = sum(len(n.token_ids) for t in trees for n in t.nodes)
            assert all(len(t.leaves()) == leaves for t in trees)
            results["tree" if mode == "entropy" else "chains"].append((generated, seconds))
    tree_tokens = sum(g for g, _ in results["tree"])
    chain_tokens = sum(g for g, _ in results["chains"])
    tree_time = sum(s for _, s in results["tree"])
    chain_time = sum(s for _, s in results["chains"])
    print(f"tree (M={args.m}, L={args.l}, K={args.k}) vs {leaves} chains, {args.questions} questions x {args.repeats} repeats, policy {path}")
    print(f"  generated tokens: tree {tree_tokens / args.repeats:.0f}, chains {chain_tokens / args.repeats:.0f} per repeat")
    print(f"  tree / chains tokens: {tree_tokens / chain_tokens:.2f}x (goal <= 0.6x)")
    print(f"  tree / chains wall time: {tree_time / chain_time:.2f}x")


if __name__ == "__main__":
    main()
