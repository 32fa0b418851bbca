"""What a run keeps on disk: its checkpoint (for --resume), metrics.jsonl (and wandb with --track), its saved trees.

A checkpoint is written aside, flushed to disk and swapped in by two renames, so that at every instant one complete
checkpoint exists: `checkpoint/`, or between the renames `checkpoint.old/`.
"""

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from atpo_credit import reward_mean_std, value_sources
from atpo_tree import children_lists, expansion_scores
from curves import load_metrics


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointError(Exception):
    """A checkpoint could not be written (a full disk, a folder gone): the previous one is kept."""


def checkpoint_gib(model, optimizer_name: str, save_optimizer: bool) -> float:
    """About what one checkpoint takes on disk: the weights as held, and AdamW's two moments (8-bit: a byte each)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    moments = (2 * weights if optimizer_name == "adamw" else weights // 2) if save_optimizer else 0
    return (weights + moments) / 2**30


def disk_room(output_dir: Path, model, args) -> tuple[float, float]:
    """(GiB free on --output-dir's disk, GiB one checkpoint takes)."""
    return shutil.disk_usage(output_dir).free / 2**30, checkpoint_gib(model, args.optimizer, args.save_optimizer)


def say_if_disk_is_short(output_dir: Path, model, args) -> None:
    """Print one line where --output-dir's disk has less free than one checkpoint takes."""
    free, need = disk_room(output_dir, model, args)
    if free < need:
        print(f"note: {free:.1f} GiB free on the disk of {output_dir}, a checkpoint takes about {need:.1f} GiB: saving will fail")


def save_checkpoint(args, step: int, model, tokenizer, optimizer) -> None:
    """The policy as a HF folder, plus the step, the flags and (unless --no-save-optimizer) the optimizer state in
    state.pt. A write that fails or is interrupted leaves no partial files and the previous checkpoint in place."""
    output_dir = Path(args.output_dir)
    final, tmp, old = output_dir / "checkpoint", output_dir / "checkpoint.tmp", output_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        optimizer_state = {"optimizer": optimizer.state_dict()} if args.save_optimizer else {}
        torch.save({"step": step, **optimizer_state, "args": dataclasses.asdict(args)}, tmp / "state.pt")
        for path in [*tmp.iterdir(), tmp]:
            fsync(path)
    except BaseException as err:  # a full disk (torch.save says RuntimeError, safetensors its own error), Ctrl-C
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception):
            raise
        free, need = disk_room(output_dir, model, args)
        raise CheckpointError(f"the checkpoint of step {step} could not be written in {output_dir} ({str(err)[:200]}; "
                              f"{free:.1f} GiB free on its disk, a checkpoint takes about {need:.1f} GiB)") from err
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fsync(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def hold_output_dir(output_dir: Path):
    """Lock `output_dir` for as long as this process lives (the OS lets go when it ends, a SIGKILL included): the
    open lock file, to keep; or None and the line naming the run that holds it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = open(output_dir / "run.lock", "a+")
    handle.seek(0)  # Windows locks bytes from here
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "a run"
        handle.close()
        return None, holder
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: python train.py {shlex.join(sys.argv[1:])}\n")
    handle.flush()
    return handle, None


def start_over(output_dir: Path) -> None:
    """--overwrite-output-dir: the earlier run's metrics, checkpoint, trees and curves go."""
    for name in ("metrics.jsonl", "curves.png"):
        (output_dir / name).unlink(missing_ok=True)
    for name in ("checkpoint", "checkpoint.old", "checkpoint.tmp", "trees"):
        shutil.rmtree(output_dir / name, ignore_errors=True)


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The run's complete checkpoint: `checkpoint/`, or `checkpoint.old/` when a kill came mid-swap; None if none."""
    for path in [Path(output_dir) / "checkpoint", Path(output_dir) / "checkpoint.old"]:
        if (path / "state.pt").exists():
            return path
    return None


class RunLog:
    """metrics.jsonl, and wandb with --track: one record per RL step or evaluation, under the same names.

    A fresh run starts the file afresh; a resumed one keeps the rows before its checkpoint's step (a torn last line
    goes), less an evaluation of that step that it is about to redo: redone, not skipped, so that the engine's
    prefix cache holds what an uninterrupted run's does (a cache hit changes bf16 log-probs)."""

    def __init__(self, args, start_step: int):
        self.path, self.track = Path(args.output_dir) / "metrics.jsonl", args.track
        kept = []
        if args.resume and self.path.exists():
            redone = start_step % args.eval_every == 0 or start_step == args.total_steps
            kept = [r for r in load_metrics(self.path) if r["step"] < start_step
                    or (r["step"] == start_step and not (redone and "eval/em" in r))]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if self.track:
            import wandb

            wandb.init(project=args.wandb_project, config=dataclasses.asdict(args), dir=args.output_dir,
                       name=f"{args.expansion}-{args.loss_level}-s{args.seed}", resume="allow")

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.track:
            import wandb

            wandb.log(record, step=record["step"])

    def finish(self) -> list[dict]:
        """Close wandb; every row of the run."""
        if self.track:
            import wandb

            wandb.finish()
        return load_metrics(self.path)


def tree_record(tree, values: torch.Tensor, advantages: torch.Tensor, tokenizer, args) -> dict:
    """A rollout tree as JSON, with every number tree_explorer.py shows (it computes none): per node its turn, the
    observation after it, entropy, the round that sampled it and those that picked it, value, what the value is the
    weighted mean of (§2.2, normalised weights), advantage, leaf reward; per expansion round each candidate's score
    (§1.3), ranked; the tree's reward mean and std (§2.1); the run's tree and credit settings."""
    sources = value_sources(tree.parents, tree.entropies, args.value_mode)
    nodes = []
    for i, node in enumerate(tree.nodes):
        total = sum(sources[i].values())
        nodes.append({
            "parent": node.parent, "text": tokenizer.decode(node.token_ids), "observation": tokenizer.decode(node.obs_ids),
            "entropy": node.entropy, "action": node.info.get("action"), "content": node.info.get("content"),
            "end": node.info.get("end"), "round": node.round, "picked_in": node.picked_in, "reward": node.reward,
            "value": float(values[i]), "advantage": float(advantages[i]), "value_from": [[s, w / total] for s, w in sources[i].items()],
        })
    rounds = []
    for r in sorted({n.round for n in tree.nodes[1:]} - {0}):
        before = tree.nodes[: next(i for i, n in enumerate(tree.nodes) if n.round == r)]  # the tree as round r found it
        parents = [n.parent for n in before]
        scores = expansion_scores(parents, [n.entropy for n in before], [n.done for n in before], args.alpha)
        children = [len(c) for c in children_lists(parents)]
        ranked = sorted(scores, key=scores.get, reverse=True) if args.expansion == "entropy" else []  # random picks: no scores
        rounds.append({
            "round": r, "nodes_before": len(before), "picks": [i for i, n in enumerate(tree.nodes) for p in n.picked_in if p == r],
            "ranked": [{"node": n, "entropy": before[n].entropy, "children_of_parent": children[parents[n]] if n else children[0],
                        "score": scores[n]} for n in ranked],
        })
    mean, std = reward_mean_std([tree.nodes[leaf].reward for leaf in tree.leaves()])
    settings = {key: getattr(args, key) for key in ("m", "l", "k", "alpha", "expansion", "value_mode", "adv_mode")}
    return {"question": tree.task.question, "answers": tree.task.answers, "settings": settings, "reward_mean": mean,
            "reward_std": std, "rounds": rounds, "nodes": nodes}


def write_trees(path: Path, records: list[dict]) -> None:
    """One step's trees as a JSON list (tree_picture.py loads and draws them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1))


def resume_hint(reason: str, output_dir: str, argv: list[str]) -> str:
    """The one line a run ends with when it stops mid-run (retrieval down, a checkpoint not written, Ctrl-C): why,
    what was kept, the command to go on."""
    last = last_checkpoint(output_dir)
    if last is None:
        return f"{reason}; no checkpoint was saved yet; start again with: python train.py {shlex.join(argv)}"
    again = shlex.join([a for a in argv if a != "--resume"] + ["--resume"])
    return f"{reason}; the last checkpoint is {last}; resume with: python train.py {again}"


def restore(optimizer, state: dict, policy_path: str) -> int:
    """--resume: the optimizer state from the checkpoint's state.pt (where it was saved); the step it was at."""
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    else:
        print("note: the checkpoint has no optimizer state (--no-save-optimizer): AdamW starts afresh")
    print(f"resumed from {policy_path} at step {state['step']}")
    return state["step"]
