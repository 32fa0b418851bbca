"""Where an RL step's time goes, how fast it is against the previous defaults and against plain vLLM, and what a
turn-level tree saves over independent chains.

    python -m benchmarks.bench_step            (from the repository root; builds the warm start of --seed if not cached)

1. Step time, side by side: `train.py` step 1 (same seed: the same questions) with the current defaults
   and with the previous ones (generation and the update on 1 thread, gradient checkpointing on, vLLM's eager engine; the
   compiled one samples with other kernels, so its trees may differ), interleaved over
   repeats; the time split train.py records and the peak resident memory of each process (the warm start is built
   or read first, in a process of its own, so that no step's peak is the warm start's).
2. Rollout speed: the trees of train.py's defaults for some training questions (each turn sent to the engine as
   soon as its context is known), every context recorded; the same trees grown with turn depths in lockstep (every
   live branch advances one turn per batch: the previous rollout); then every recorded context again in one plain
   vLLM batch (same sampling settings): generated tokens/s.
3. The update's achieved FLOP/s (forward + backward of one micro-batch of those trees, ~6 x parameters x tokens)
   beside a plain matmul's in the same dtype on the same threads.
4. Tree vs chains on the same questions and leaf budget: generated tokens and wall time (goal: tree <= 0.6x).
The two ratio lines of 1 and 2 are printed last.
"""

import os

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
PARTS = ["time/rollout", "time/env", "time/credit", "time/old_log_prob", "time/train", "time/sync"]
PREVIOUS = ["--threads", "1", "--gradient-checkpointing", "on", "--enforce-eager"]


def run(script: str, out: str, flags: list[str]) -> tuple[float, str]:
    """`script` with `flags` in a child process writing to `out`: the child's own peak RSS in GiB, its stdout."""
    with open(Path(out) / "log", "w+") as log:
        proc = subprocess.Popen([sys.executable, script, "--output-dir", out, *flags], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: KiB on Linux
        log.seek(0)
        stdout = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(stdout[-4000:])
    return usage.ru_maxrss / 2**20, stdout


def train_step(extra: list[str], seed: int) -> tuple[dict, float, str]:
    """One train.py step (no evaluation, nothing saved): its metrics row, the process's peak RSS in GiB, stdout."""
    with tempfile.TemporaryDirectory() as out:
        rss, stdout = run("train.py", out, ["--total-steps", "1", "--eval-questions", "0", "--save-every", "1000",
                                            "--save-trees-every", "0", "--seed", str(seed), *extra])
        row = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"losses/policy"' in line][0]
    return row, rss, stdout


def step_seconds(row: dict) -> float:
    return sum(row[k] for k in PARTS if k != "time/env")  # env time is inside the rollout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved step-1 runs per setting")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--questions", type=int, default=16, help="questions for the rollout and tree-vs-chains parts")
    args = parser.parse_args()

    # ---- 1. a default step against a step with the previous defaults, interleaved, after the warm start is cached
    with tempfile.TemporaryDirectory() as out:  # in its own process, so that no step's peak RSS is the warm start's
        start = time.perf_counter()
        rss, _ = run("train.py", out, ["--seed", str(args.seed), "--total-steps", "0", "--eval-questions", "0"])
        print(f"warm start of seed {args.seed} (built or read from the cache): {time.perf_counter() - start:.0f} s, peak RSS {rss:.2f} GiB")
    runs = {"defaults": [], "previous": []}
    for _ in range(args.repeats):
        for name, extra in (("defaults", []), ("previous", PREVIOUS)):
            row, rss, stdout = train_step(extra, args.seed)
            runs[name].append((row, rss))
    policy = re.search(r"cached in (\S+?)\)", stdout)
    policy_path = policy.group(1) if policy else None
    for name, results in runs.items():
        total = sum(step_seconds(r) for r, _ in results) / len(results)
        print(f"train.py {name}{' (' + ' '.join(PREVIOUS) + ')' if name == 'previous' else ''}, step 1 x {len(results)}: "
              f"{total:.1f} s per step, peak RSS {max(rss for _, rss in results):.2f} GiB")
        for k in PARTS:
            seconds = sum(r[k] for r, _ in results) / len(results)
            label = k.split("/")[1] + (" (inside rollout)" if k == "time/env" else "")
            print(f"  {label:24s} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    losses = {name: [r["losses/policy"] for r, _ in results] for name, results in runs.items()}
    print(f"  loss (the same where both engines sampled the same trees): defaults {losses['defaults']}, previous {losses['previous']}")
    step_ratio = (sum(step_seconds(r) for r, _ in runs["defaults"]) / sum(step_seconds(r) for r, _ in runs["previous"]))

    # ---- 2. the rollout of train.py's defaults, then the same contexts in one plain vLLM call
    import torch

    from transformers import AutoTokenizer

    import engine  # first: it sets the environment vLLM reads
    import train
    from atpo_packing import pack_trees
    from learner import load_policy, response_log_probs
    from atpo_tree import BatchSampler, grow_trees
    from default_model import default_model_path
    from envs import DEFAULT_TASK_DIR, BM25Retriever, SearchEnv, build_prompt, load_tasks

    path = policy_path or default_model_path()
    settings = train.Args(dtype=engine.resolve_dtype("auto"))
    engine.set_threads(settings.threads)
    rollout_engine = engine.VllmEngine(path, settings)  # before bm25s is imported (see train.py)
    llm = rollout_engine.llm
    tokenizer = AutoTokenizer.from_pretrained(path)
    env = SearchEnv(tokenizer, BM25Retriever(DEFAULT_TASK_DIR / "corpus.jsonl"), max_turns=settings.max_turns,
                    max_length=settings.max_length)
    tasks = random.Random(0).sample(load_tasks(DEFAULT_TASK_DIR / "train.jsonl"), args.questions)
    prompts = [build_prompt(tokenizer, t.question) for t in tasks]

    def sample_all(sampler, contexts):
        """Every context in one batch: submitted together, returned when the last is done."""
        keys = [sampler.submit(c) for c in contexts]
        done = {}
        while len(done) < len(keys):
            done.update((key, (ids, logprobs)) for key, ids, logprobs in sampler.wait())
        return [done[key] for key in keys]

    def rollout(sampler):
        """train.py's default trees for the benchmark's questions: (trees, seconds, generated tokens)."""
        llm.reset_prefix_cache()
        start = time.perf_counter()
        trees = grow_trees(prompts, tasks, sampler, env.step, m=settings.m, l=settings.l, k=settings.k,
                           mode="entropy", rng=random.Random(0))
        return trees, time.perf_counter() - start, sum(len(n.token_ids) for t in trees for n in t.nodes)

    class Recording(engine.VllmSampler):
        def submit(self, context):
            contexts.append(context)
            return super().submit(context)

    contexts = []  # every turn's context, in the order the rollout submitted them
    trees, rollout_seconds, rollout_tokens = rollout(Recording(llm, settings, random.Random(0), settings.temperature))
    # the previous rollout: every live branch of every tree advances one turn per batch (turn depths in lockstep)
    one_by_one, batches = engine.VllmSampler(llm, settings, random.Random(0), settings.temperature), []

    def lockstep_batch(batch):
        batches.append(len(batch))
        return sample_all(one_by_one, batch)

    _, lockstep_seconds, lockstep_tokens = rollout(BatchSampler(lockstep_batch))
    llm.reset_prefix_cache()
    start = time.perf_counter()
    plain_tokens = sum(len(ids) for ids, _ in sample_all(engine.VllmSampler(llm, settings, random.Random(0), settings.temperature), contexts))
    plain_seconds = time.perf_counter() - start
    rollout_speed, plain_speed = rollout_tokens / rollout_seconds, plain_tokens / plain_seconds
    print(f"rollout, {args.questions} trees of train.py's defaults: {rollout_tokens} tokens in {rollout_seconds:.1f} s, "
          f"{rollout_speed:.0f} tok/s over {len(contexts)} turns (each sent as soon as its context was known); with "
          f"turn depths in lockstep (the previous rollout, batches of {' '.join(map(str, batches))}): {lockstep_tokens} tokens in "
          f"{lockstep_seconds:.1f} s, {lockstep_tokens / lockstep_seconds:.0f} tok/s; plain vLLM, the rollout's contexts "
          f"in one batch: {plain_tokens} tokens in {plain_seconds:.1f} s, {plain_speed:.0f} tok/s")

    # ---- 3. the update's FLOP/s beside a plain matmul's, on train.py's threads
    model = load_policy(path, torch.device("cpu")).train()
    model.config.use_cache = False
    rows, _ = train.training_rows(trees[: settings.micro_batch], settings)
    tokens = len(pack_trees(trees[: settings.micro_batch]).input_ids)
    body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)  # the per-token matmuls
    threads = torch.get_num_threads()
    response_log_probs(model, rows, trees, settings, 2).sum().backward()  # warm-up
    start = time.perf_counter()
    response_log_probs(model, rows, trees, settings, 2).sum().backward()
    update_seconds = time.perf_counter() - start
    checkpointing = model.is_gradient_checkpointing  # as train.py's "auto" set it for these tokens
    a = torch.randn(2048, 2048, dtype=engine.TORCH_DTYPES[settings.dtype])  # the update's matmul dtype
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    matmul_flops = 5 * 2 * 2048**3 / (time.perf_counter() - start)
    answer_tokens = sum(sum(r.traj.response_mask) for r in rows)
    update_flops = (6 * body * tokens + 6 * model.config.vocab_size * model.config.hidden_size * answer_tokens) / update_seconds
    print(f"update, forward+backward of {settings.micro_batch} packed trees ({tokens} tokens, {threads} threads, "
          f"{settings.dtype}, gradient checkpointing {'on: its second forward not counted' if checkpointing else 'off'}): "
          f"{update_seconds:.1f} s, {update_flops / 1e9:.1f} GFLOP/s; plain 2048x2048 {settings.dtype} matmul "
          f"{matmul_flops / 1e9:.1f} GFLOP/s; update / matmul {update_flops / matmul_flops:.2f}")

    # ---- 4. tree vs chains on the same questions and the same leaf budget
    leaves = settings.m + settings.l * settings.k
    results = {"entropy": [], "chains": []}
    for repeat in range(args.repeats):
        for mode in results:
            rng = random.Random(repeat)
            start = time.perf_counter()
            grown = grow_trees(prompts, tasks, engine.VllmSampler(llm, settings, rng, 1.0), env.step,
                               m=settings.m, l=settings.l, k=settings.k, mode=mode, rng=rng)
            seconds = time.perf_counter() - start
            assert all(len(t.leaves()) == leaves for t in grown)
            results[mode].append((sum(len(n.token_ids) for t in grown for n in t.nodes), seconds))
    tree_tokens, chain_tokens = (sum(g for g, _ in results[m]) for m in results)
    tree_time, chain_time = (sum(s for _, s in results[m]) for m in results)
    print(f"tree (M={settings.m}, L={settings.l}, K={settings.k}) vs {leaves} chains, {args.questions} questions x "
          f"{args.repeats} repeats: generated tokens per repeat tree {tree_tokens / args.repeats:.0f}, chains "
          f"{chain_tokens / args.repeats:.0f}; tree / chains tokens {tree_tokens / chain_tokens:.2f}x (goal <= 0.6x), "
          f"wall time {tree_time / chain_time:.2f}x")

    print(f"peak resident memory of a default step: {max(rss for _, rss in runs['defaults']):.2f} GiB (goal < 8 GiB)")
    print(f"step time, defaults / previous defaults (1 update thread, gradient checkpointing): {step_ratio:.2f}x (goal <= 0.5x)")
    print(f"rollout tokens/s / plain vLLM tokens/s on the same prompts: {rollout_speed / plain_speed:.2f}x (goal >= 0.8x)")


if __name__ == "__main__":
    main()
