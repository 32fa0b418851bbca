"""Every flag of train.py checked before anything is loaded: one line per problem, all problems at once."""

import math
from pathlib import Path

from checkpoint import last_checkpoint
from envs import HttpRetriever, RetrievalError
from warm_start import gold_transcripts


def check_args(args) -> None:
    """Raise SystemExit with one line naming every problem found in `args` (train.Args)."""
    problems = []
    for name in ("prompts_per_step", "m", "k", "micro_batch", "num_minibatches", "max_turns", "topk", "max_draws",
                 "demo_batch"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("l", "threads", "total_steps"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
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
    files += [args.sft_demos] if args.wants_sft() or args.demo_coef > 0 else []
    problems += [f"no such file: {f}" for f in files if not Path(f).exists()]
    if args.demo_coef > 0 and Path(args.sft_demos).exists():
        counts = list(map(len, gold_transcripts(args.sft_demos, args.demo_source)))
        if not counts or min(counts) < math.ceil(args.demo_batch / len(counts)):
            problems.append(f"--demo-coef: --demo-batch {args.demo_batch} split evenly over the sources needs more gold "
                            f"transcripts of source {args.demo_source!r} in {args.sft_demos} than {counts}")
    if args.model != "default" and not Path(args.model).exists():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(args.model, "config.json"), str):
            problems.append(f"--model {args.model}: not a local folder nor in the Hugging Face cache (atpo never downloads)")
    if args.resume and last_checkpoint(args.output_dir) is None:
        problems.append(f"--resume: no checkpoint in {args.output_dir}/checkpoint")
    if args.retrieval_url and not problems:
        try:
            HttpRetriever(args.retrieval_url, timeout=10, retries=1).search(["test"], 1)
        except RetrievalError as err:
            problems.append(str(err))
    if problems:
        raise SystemExit("error: " + "; ".join(problems))
