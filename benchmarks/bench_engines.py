"""The rollout engines side by side: vLLM against transformers (the policy sampling its own turns, no vLLM).

    python -m benchmarks.bench_engines            (from the repository root; builds the warm start of --seed if not cached)

1. Rollout speed: train.py's default trees for a default step's training questions (--questions), grown by each
   engine from the same warm-started weights, the same seed and settings (each engine in a process of its own, the two
   interleaved over --repeats): generated tokens per second. The engines sample different tokens, so the trees
   differ; tokens/s is the rate that compares (vLLM gains more from more trees at once: try --questions 16).
2. A default step: train.py step 1 with --engine vllm and with --engine transformers (same seed, same questions),
   interleaved: its time and the split train.py records.
The ratio lines come last (goal: transformers / vLLM rollout tokens/s >= 0.5 on a CPU); the rate inside step 1 too.
"""

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_step import PARTS, run, step_seconds, train_step  # noqa: E402


def grow(engine_name: str, policy: str, questions: int) -> dict:
    """In this process: the default trees for `questions` training questions by one engine; tokens and seconds."""
    import engine
    import torch
    from transformers import AutoTokenizer

    import train
    from atpo_tree import grow_trees
    from learner import DEVICE, load_policy

    settings = train.Args(engine=engine_name, dtype=engine.resolve_dtype("auto"))
    engine.set_threads(settings.threads)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = load_policy(policy, DEVICE) if engine_name == "transformers" else None
    rollout_engine = engine.start_engine(policy, model, tokenizer, settings)  # before bm25s is imported (see train.py)
    from envs import DEFAULT_TASK_DIR, BM25Retriever, SearchEnv, build_prompt, load_tasks

    env = SearchEnv(tokenizer, BM25Retriever(DEFAULT_TASK_DIR / "corpus.jsonl"), max_turns=settings.max_turns,
                    max_length=settings.max_length)
    tasks = random.Random(0).sample(load_tasks(DEFAULT_TASK_DIR / "train.jsonl"), questions)
    prompts = [build_prompt(tokenizer, t.question) for t in tasks]
    start = time.perf_counter()
    trees = grow_trees(prompts, tasks, rollout_engine.sampler(random.Random(0), settings.temperature), env.step,
                       m=settings.m, l=settings.l, k=settings.k, mode="entropy", rng=random.Random(0))
    seconds = time.perf_counter() - start
    return {"tokens": sum(len(n.token_ids) for t in trees for n in t.nodes), "seconds": seconds,
            "turns": sum(len(t.nodes) - 1 for t in trees), "threads": torch.get_num_threads()}


def main() -> None:
    import train  # before torch: train imports engine first, which sets the environment vLLM and MKL read

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per engine")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--questions", type=int, default=train.Args.prompts_per_step,
                        help="questions for the rollout part (default: train.py's --prompts-per-step)")
    parser.add_argument("--child", nargs=2, metavar=("ENGINE", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(grow(*args.child, args.questions)))
        return

    import tempfile

    with tempfile.TemporaryDirectory() as out:  # the warm start, built or read, in a process of its own
        _, stdout = run("train.py", out, ["--seed", str(args.seed), "--total-steps", "0", "--eval-questions", "0"])
    policy = stdout.split("cached in ")[1].split(")")[0]
    engines = ("vllm", "transformers")

    # ---- 1. rollout speed, each engine in its own process
    rollouts = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name in engines:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_engines", "--questions", str(args.questions),
                                   "--child", name, policy], cwd=ROOT, capture_output=True, text=True, check=True)
            rollouts[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    speed = {}
    for name, results in rollouts.items():
        tokens, seconds = sum(r["tokens"] for r in results), sum(r["seconds"] for r in results)
        speed[name] = tokens / seconds
        print(f"rollout by {name}, {args.questions} default trees x {len(results)} ({results[0]['threads']} threads): "
              f"{tokens / len(results):.0f} tokens, {sum(r['turns'] for r in results) / len(results):.0f} turns, "
              f"{seconds / len(results):.1f} s per rollout, {speed[name]:.0f} tok/s")

    # ---- 2. a default step with each engine
    steps = {name: [] for name in engines}
    for _ in range(args.repeats):
        for name in engines:
            row, rss, _ = train_step(["--engine", name], args.seed)
            steps[name].append((row, rss))
    for name, results in steps.items():
        total = sum(step_seconds(r) for r, _ in results) / len(results)
        split = ", ".join(f"{k.split('/')[1]} {sum(r[k] for r, _ in results) / len(results):.1f}" for k in PARTS if k != "time/env")
        print(f"train.py step 1 with --engine {name} x {len(results)}: {total:.1f} s ({split}), "
              f"{sum(r['charts/generated_tokens'] for r, _ in results) / len(results):.0f} tokens, "
              f"peak RSS {max(rss for _, rss in results):.2f} GiB")
    step_ratio = sum(step_seconds(r) for r, _ in steps["transformers"]) / sum(step_seconds(r) for r, _ in steps["vllm"])
    in_step = {name: sum(r["charts/generated_tokens"] for r, _ in results) / sum(r["time/rollout"] for r, _ in results)
               for name, results in steps.items()}

    print(f"rollout tokens/s, transformers / vLLM: {speed['transformers'] / speed['vllm']:.2f}x (goal >= 0.5x)")
    print(f"rollout tokens/s inside step 1 (fewer rows at once; each engine's own samples), transformers / vLLM: "
          f"{in_step['transformers'] / in_step['vllm']:.2f}x")
    print(f"default step time, transformers / vLLM: {step_ratio:.2f}x")


if __name__ == "__main__":
    main()
