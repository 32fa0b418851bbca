"""Tree packing vs path by path: tokens, forward+backward wall time and peak memory, side by side in one run.

    python -m benchmarks.bench_packing          (from the repository root)

Two workloads: real rollout trees of the default task (grown by vLLM with train.py's defaults and the cached
warm start, if there is one), and a synthetic tree of the paper's shape (M=10, L=2, K=6: 22 leaves; 300-token
prompt, turns of 60-120 tokens, 150-token observations). Each measurement runs in a fresh child process (so peak
memory is its own), alternating packed and path-by-path, with train.py's dtype (`--dtype auto`) and gradient
checkpointing on (as the numbers in the README were measured). Path by path uses micro-batches of about as many tokens as the packed row.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import argparse
import math
import multiprocessing
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(method: str, trees: list, micro_batch_paths: int, model_path: str) -> tuple[float, float]:
    """In a child process: seconds of forward+backward over all trajectories, and peak RSS growth in MiB."""
    import psutil
    import torch
    import engine
    import train
    from atpo_loss import policy_loss
    from learner import load_policy, pad, padded, response_log_probs

    model = load_policy(model_path, torch.device("cpu")).train()
    args = train.Args(packing=method, dtype=engine.resolve_dtype("auto"), gradient_checkpointing="on")
    rows, _ = train.training_rows(trees, args)
    units = [rows] if method == "tree" else [rows[i : i + micro_batch_paths] for i in range(0, len(rows), micro_batch_paths)]
    baseline = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to now: loading peaked higher
    start = time.perf_counter()
    for unit in units:
        log_probs = response_log_probs(model, unit, trees, args, pad_id=2)
        mask = pad([r.traj.response_mask for r in unit], 0, torch.long)
        advantages = padded([r.advantages for r in unit])
        loss, _ = policy_loss(log_probs, log_probs.detach(), advantages, mask)
        loss.backward()
    seconds = time.perf_counter() - start
    peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return seconds, (peak_kib * 1024 - baseline) / 2**20


def synthetic_tree(seed: int):
    """The paper's shape with random token ids; episodes of 1-4 turns."""
    from atpo_tree import BatchSampler, StepResult, grow_trees

    rng = random.Random(seed)

    def generate(contexts):
        out = []
        for _ in contexts:
            ids = [rng.randrange(100, 40000) for _ in range(rng.randint(60, 120))]
            out.append((ids, [-rng.uniform(0.05, 2.0) for _ in ids]))
        return out

    def step(requests):
        return [StepResult([rng.randrange(100, 40000) for _ in range(150)], False, None, {})
                if r.turn_number < 4 and rng.random() < 0.6 else StepResult([], True, float(rng.random() < 0.4), {})
                for r in requests]

    prompt = [rng.randrange(100, 40000) for _ in range(300)]
    return grow_trees([prompt], [None], BatchSampler(generate), step, m=10, l=2, k=6, rng=rng)


def real_trees(count: int):
    """Rollout trees of the default task from vLLM, with train.py's default tree shape."""
    import engine
    import train
    from atpo_tree import grow_trees
    from default_model import default_model_path
    from envs import DEFAULT_TASK_DIR, BM25Retriever, SearchEnv, build_prompt, load_tasks
    from warm_start import warm_start_dir

    args = train.Args(dtype=engine.resolve_dtype("auto"))
    warm = warm_start_dir(args)
    path = str(warm) if (warm / "report.json").exists() else default_model_path()
    rollout_engine = engine.VllmEngine(path, args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    env = SearchEnv(tokenizer, BM25Retriever(DEFAULT_TASK_DIR / "corpus.jsonl"), max_turns=args.max_turns, max_length=args.max_length)
    tasks = random.Random(0).sample(load_tasks(DEFAULT_TASK_DIR / "train.jsonl"), count)
    rng = random.Random(0)
    trees = grow_trees([build_prompt(tokenizer, t.question) for t in tasks], tasks,
                       rollout_engine.sampler(rng, args.temperature), env.step, m=args.m, l=args.l, k=args.k, rng=rng)
    for tree in trees:
        tree.task = None  # picklable for the children
    return trees, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-trees", type=int, default=2, help="real trees (train.py packs one tree per forward); 0: none, no vLLM")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import engine
    from atpo_packing import pack_trees
    from default_model import default_model_path

    trees, model_path = real_trees(args.real_trees) if args.real_trees else ([], default_model_path())
    workloads = {"default task, one real tree": [trees[0]]} if trees else {}
    workloads["synthetic 22-leaf tree"] = synthetic_tree(0)
    if len(trees) > 1:
        workloads["default task, second real tree"] = [trees[1]]
    context = multiprocessing.get_context("spawn")
    print(f"model {model_path}; forward+backward, {engine.resolve_dtype('auto')}, gradient checkpointing, 1 thread; median of {args.repeats}")
    for name, work in workloads.items():
        unique = sum(len(t.prompt_ids) + sum(len(n.token_ids) + len(n.obs_ids) for n in t.nodes[1:]) for t in work)
        per_path = sum(len(t.prompt_ids) + len(r.response_ids) for t in work for r in t.trajectories())
        paths = sum(len(t.leaves()) for t in work)
        micro = max(1, math.ceil(paths * unique / per_path))  # about as many tokens per micro-batch as the packed row
        assert len(pack_trees(work).input_ids) == unique
        results = {"tree": [], "path": []}
        for _ in range(args.repeats):
            for method in ("tree", "path"):
                with context.Pool(1) as pool:
                    results[method].append(pool.apply(measure, (method, work, micro, model_path)))
        t_tree, t_path = (statistics.median(s for s, _ in results[m]) for m in ("tree", "path"))
        m_tree, m_path = (statistics.median(mem for _, mem in results[m]) for m in ("tree", "path"))
        token_ratio = unique / per_path
        print(f"{name}: {paths} paths, {unique} unique tokens vs {per_path} path by path (micro-batch {micro} paths)")
        print(f"  unique / per-path tokens   {token_ratio:.2f}")
        print(f"  packed / path wall time    {t_tree / t_path:.2f}   ({t_tree:.1f} s vs {t_path:.1f} s; goal <= {1.3 * token_ratio:.2f})")
        print(f"  packed / path peak memory  {m_tree / m_path:.2f}   ({m_tree:.0f} MiB vs {m_path:.0f} MiB above the loaded model; goal <= 1.3)")


if __name__ == "__main__":
    main()
