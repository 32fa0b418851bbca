"""The supervised warm start: gold transcripts -> training rows -> supervised steps -> a before/after report, cached.

The default model (SmolLM2-135M) almost never follows the tool format when sampled zero-shot, so RL would see
nothing but zero rewards. A short supervised fine-tune on gold transcripts (`build_default_task.py` writes them to
`data/default/demos.jsonl`) teaches the format first: the loss is the token-mean cross-entropy of the model's turns,
not of the prompt or of the retrieved passages. `train.py` runs it once per setting (`--sft auto`: for the default
model) and caches the result under `~/.cache/atpo/warm_start/`; a second run starts from the cache
(`train.py --total-steps 0 --eval-questions 0` builds it and stops). The same transcripts give the RL update its
supervised term (`--demo-coef`, docs/method.md §5.3): `gold_transcripts` and `draw_demos`.
"""

import hashlib
import json
import random
import time
from pathlib import Path

import torch

from console import progress_bar
from default_model import cache_dir, default_model_path
from envs import build_prompt, read_jsonl
from learner import fit_checkpointing, pad, token_log_probs

ONE_HOP = "default-1hop"  # the data source of the default task's single-hop questions


def load_demos(path: str | Path) -> list[dict]:
    """Gold transcripts (JSONL: question, data_source, segments [[role, text], ...] with the role "model" on the
    model's turns), checked: a ValueError names the file and line of the first one that is not a transcript."""
    demos = []
    for number, demo in read_jsonl(Path(path)):
        segments = demo.get("segments") if isinstance(demo, dict) else None
        well_formed = (isinstance(segments, list) and all(isinstance(s, list) and len(s) == 2 and all(isinstance(x, str) for x in s)
                                                         for s in segments)
                       and any(role == "model" for role, _ in segments) and isinstance(demo.get("question"), str)
                       and demo["question"].strip() and isinstance(demo.get("data_source"), str))
        if not well_formed:
            raise ValueError(f"{path}: line {number} is not a gold transcript (a question, a data_source and segments "
                             f"[[role, text], ...] with a \"model\" one), got {demo!r:.80}")
        demos.append(demo)
    return demos


def gold_transcripts(demos: list[dict], source: str = "") -> list[list[dict]]:
    """The gold transcripts of the --demo-coef term (`source`'s, or all), one pool per data source, sorted by source."""
    by_source: dict[str, list[dict]] = {}
    for demo in demos:
        if source in ("", demo["data_source"]):
            by_source.setdefault(demo["data_source"], []).append(demo)
    return [by_source[s] for s in sorted(by_source)]


def draw_demos(pools: list[list[dict]], count: int, rng: random.Random) -> list[dict]:
    """`count` gold transcripts spread evenly over the pools (the first pools get one more when count does not
    divide), drawn without replacement within a pool."""
    shares = [count // len(pools) + (i < count % len(pools)) for i in range(len(pools))]
    return [demo for pool, share in zip(pools, shares) for demo in rng.sample(pool, share)]


def demo_row(tokenizer, demo: dict) -> dict:
    """A gold transcript as a training row: loss on the model's segments, not on the prompt or observations."""
    ids = build_prompt(tokenizer, demo["question"])
    loss_mask = [0] * len(ids)
    for role, text in demo["segments"]:
        segment = tokenizer.encode(text, add_special_tokens=False)
        ids += segment
        loss_mask += [int(role == "model")] * len(segment)
    return {"ids": ids, "loss_mask": loss_mask}


def demo_nll(model, rows: list[dict], tokens: int, args, device: torch.device, pad_id: int) -> torch.Tensor:
    """The transcripts' term (docs/method.md §5.3): cross-entropy of gold transcripts (demo_row), summed over the model's tokens of `rows`, divided by `tokens`
    (the token count of the whole batch, so that micro-batches add up to its token mean)."""
    ids = pad([r["ids"] for r in rows], pad_id, torch.long).to(device)
    attention_mask = pad([[1] * len(r["ids"]) for r in rows], 0, torch.long).to(device)
    loss_mask = pad([r["loss_mask"] for r in rows], 0, torch.long).to(device)
    fit_checkpointing(model, ids.numel(), args.gradient_checkpointing, args.dtype)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        log_probs = token_log_probs(model, ids, attention_mask, loss_mask, 1.0, args.logprob_chunk)
    return -log_probs.sum() / tokens


def demo_backward(model, rows: list[dict], scale: float, args, device: torch.device, pad_id: int) -> list[float]:
    """scale x the cross-entropy of these transcripts (demo_row) over all their model tokens, backpropagated
    --micro-batch rows at a time. Returns each micro-batch's share of the NLL."""
    tokens = sum(sum(r["loss_mask"][1:]) for r in rows)
    nlls = []
    for start in range(0, len(rows), args.micro_batch):
        nll = demo_nll(model, rows[start : start + args.micro_batch], tokens, args, device, pad_id)
        (scale * nll).backward()
        nlls.append(nll.item())
    return nlls


def transcripts_backward(model, tokenizer, pools: list[list[dict]], rng: random.Random, args, device: torch.device,
                         pad_id: int) -> list[float]:
    """The transcripts' term in an update (§5.3): --demo-batch gold transcripts drawn from `pools`, demo_coef x their
    cross-entropy backpropagated. Returns each micro-batch's NLL."""
    batch = [demo_row(tokenizer, d) for d in draw_demos(pools, args.demo_batch, rng)]
    return demo_backward(model, batch, args.demo_coef, args, device, pad_id)


def supervised_steps(model, tokenizer, demos: list[dict], args, device: torch.device, pad_id: int) -> list[float]:
    """--sft-steps AdamW steps of --sft-batch transcripts (a --sft-two-hop-frac share of two- or three-hop ones);
    returns the losses."""
    model.train()
    rng = random.Random(args.seed)
    multi_hop = [d for d in demos if d["data_source"] != ONE_HOP]
    one_hop = [d for d in demos if d["data_source"] == ONE_HOP] or multi_hop
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.sft_lr)
    losses = []
    bar = progress_bar(iterable=range(args.sft_steps), desc="warm start", unit="step")
    for _ in bar:
        batch = [rng.choice(multi_hop if multi_hop and rng.random() < args.sft_two_hop_frac else one_hop) for _ in range(args.sft_batch)]
        optimizer.zero_grad()
        total = sum(demo_backward(model, [demo_row(tokenizer, d) for d in batch], 1.0, args, device, pad_id))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}", refresh=False)  # drawn with the next update
    return losses


def warm_start_dir(args) -> Path:
    """Where the warm-started policy of these settings is cached (it exists once `report.json` is there)."""
    base_path = default_model_path() if args.model == "default" else args.model
    key = json.dumps([base_path, hashlib.sha256(Path(args.sft_demos).read_bytes()).hexdigest(), args.sft_steps,
                      args.sft_batch, args.sft_lr, args.sft_two_hop_frac, args.seed, args.dtype, args.micro_batch])
    return cache_dir() / "warm_start" / hashlib.sha256(key.encode()).hexdigest()[:16]


def build(path: Path, model, tokenizer, demos: list[dict], args, device: torch.device, pad_id: int, measure, sync) -> None:
    """Warm-start `model` (the base model, whose weights the engine also holds) and cache it in `path` (warm_start_dir
    of these args): scores before (`measure()`: the engine's evaluation), the supervised steps, the new weights into
    the engine (`sync()`), scores after, then the model, tokenizer and report."""
    before = measure()
    start = time.time()
    losses = supervised_steps(model, tokenizer, demos, args, device, pad_id)
    minutes = (time.time() - start) / 60
    sync()
    after = measure()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    report = {"before": before, "after": after, "minutes": minutes, "losses": losses}
    (path / "report.json").write_text(json.dumps(report, indent=1))  # written last: the cache is complete


def report_lines(path: Path, temperature: float) -> str:
    """The report of the warm start cached in `path`, as train.py prints it (scores at the RL `temperature`)."""
    report = json.loads((path / "report.json").read_text())
    lines = [f"warm start ({report['minutes']:.1f} min, cached in {path}); at temperature {temperature}:"]
    for name in ("before", "after"):
        lines.append(f"  {name:6s} " + "  ".join(f"{k} {v:.3f}" for k, v in report[name].items()))
    return "\n".join(lines)
