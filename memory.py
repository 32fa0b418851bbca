"""What a run keeps in accelerator memory, part by part: a model's size and config and train.py's flags in, bytes
out (and this process's own memory: read, and freed memory handed back). The README's GPU table is this file's output:

    .venv/bin/python memory.py        # Qwen2.5-3B-Instruct and Qwen3-4B with the README's GPU recipe

Two moments matter: the rollout (the trainer's weights and optimizer state stay, the engine generates) and the
update in its steady state (the engine asleep with --sleep-engine; the optimizer state there since the first step;
the gradients of the micro-batches before, autocast's bfloat16 copies of the weights that a forward caches, its
activations and one chunk of logits on top). vLLM's CUDA-graph pool stays while the engine sleeps: an allowance of
GRAPH_POOL_GIB (vLLM logs its real size at start). Not counted: the CUDA context and the allocator's fragmentation;
the margin is for them.
"""

import ctypes

import psutil

from learner import ACTIVATION_BYTES, OPTIMIZER_BYTES

GIB = 2**30
GRAPH_POOL_GIB = 1.0  # an allowance for vLLM's CUDA-graph pool, not a measurement
# the configs of the two models the README's recipe names (their config.json; parameters counted from it)
MODELS = {
    "Qwen2.5-3B-Instruct": {"parameters": 3_085_938_688, "layers": 36, "hidden": 2048, "vocab": 151_936},
    "Qwen3-4B": {"parameters": 4_022_468_096, "layers": 36, "hidden": 2560, "vocab": 151_936},
}
RECIPE = {"dtype": "bfloat16", "optimizer": "adamw8bit", "micro_batch_tokens": 16384, "checkpointing": True,
          "logprob_chunk": 1024, "kv_cache_gb": 16.0, "start_policy": False, "sleep_engine": True}


def training_memory(parameters: int, layers: int, hidden: int, vocab: int, *, dtype: str, optimizer: str,
                    micro_batch_tokens: int, checkpointing: bool, logprob_chunk: int, kv_cache_gb: float,
                    start_policy: bool, sleep_engine: bool) -> dict[str, dict[str, int]]:
    """Bytes of each part at the rollout and at the update."""
    tokens = micro_batch_tokens
    if checkpointing:  # each layer's float32 input kept, one layer's activations at a time in its recompute
        activations = 4 * hidden * tokens * layers + ACTIVATION_BYTES[dtype] * hidden * tokens
    else:
        activations = ACTIVATION_BYTES[dtype] * hidden * tokens * layers
    engine = {"vLLM weights (bfloat16)": 2 * parameters, "vLLM KV cache (--kv-cache-gb)": int(kv_cache_gb * GIB)}
    kept = {"policy weights (float32)": 4 * parameters, f"optimizer state ({optimizer})": OPTIMIZER_BYTES[optimizer] * parameters,
            "start policy (float32, --log-kl-to-start)": 4 * parameters if start_policy else 0,
            "vLLM CUDA-graph pool (an allowance; kept asleep)": int(GRAPH_POOL_GIB * GIB)}
    return {
        "rollout": {**kept, **engine},
        "update": {**kept, **({k: 0 for k in engine} if sleep_engine else engine),
                   "gradients (float32, from the micro-batches before)": 4 * parameters,
                   "autocast's weight copies (bfloat16, during a forward)": 2 * parameters if dtype == "bfloat16" else 0,
                   "activations kept for the backward (--micro-batch-tokens)": activations,
                   # the chunk's logits in the compute dtype, then float32 logits, log-softmax and their gradient
                   "log-prob logits, one chunk (--logprob-chunk)": logprob_chunk * vocab * (2 + 4 + 4 + 4)},
    }


def table(gpu_gib: float = 79.0) -> str:
    """The README's table: every part for each model, each moment's total and its margin on one `gpu_gib` GPU (an
    80 GB GPU has about 79 GiB)."""
    plans = {name: training_memory(**config, **RECIPE) for name, config in MODELS.items()}
    names = list(plans)
    lines = ["| part (GiB) | " + " | ".join(f"{n}, rollout | {n}, update" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    parts = list(dict.fromkeys(p for plan in plans.values() for moment in plan.values() for p in moment))
    for part in parts:
        cells = [f"{plans[n][m].get(part, 0) / GIB:.1f}" for n in names for m in ("rollout", "update")]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    totals = [sum(plans[n][m].values()) / GIB for n in names for m in ("rollout", "update")]
    lines.append("| **total** | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")
    lines.append(f"| margin on {gpu_gib:g} GiB | " + " | ".join(f"{gpu_gib - t:.1f}" for t in totals) + " |")
    return "\n".join(lines)


def release_freed_memory() -> None:
    """Hand back to the OS what glibc keeps of the step's freed tensors (else resident memory grows step by step)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def resident_gib() -> float:
    """This process's resident memory now, in GiB."""
    return psutil.Process().memory_info().rss / 2**30


if __name__ == "__main__":
    print(table())
