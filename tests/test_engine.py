"""engine.py with the real default model and vLLM on this CPU: the weight sync, eager or compiled, memory.

vLLM runs in child processes: it binds threads and seeds global RNGs for the whole process, and its start-up fails
once bm25s (numba/llvmlite) is imported, which other test modules do.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

CHILD_ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}


def run_child(code: str, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def sync_check(enforce_eager: bool) -> None:
    """In a child process: vLLM's log-probs of a fixed text follow the trainer's weights only after a sync."""
    import engine  # sets the in-process environment before torch loads
    import train
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from learner import token_log_probs
    from default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = train.Args(dtype="float32", max_length=256, enforce_eager=enforce_eager)
    rollout_engine = engine.VllmEngine(path, args)
    llm = rollout_engine.llm
    ids = tokenizer.encode("<think> I need to look up Mobin Pigubor. </think>\n<search> Mobin Pigubor </search>")

    def vllm_log_probs() -> torch.Tensor:
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        return torch.tensor([lp[t].logprob for t, lp in zip(ids[1:], out.prompt_logprobs[1:])])

    def trainer_log_probs() -> torch.Tensor:
        x = torch.tensor([ids])
        with torch.no_grad():
            return token_log_probs(model, x, torch.ones_like(x), torch.ones_like(x), 1.0)[0]

    start = (vllm_log_probs() - trainer_log_probs()).abs().max().item()
    with torch.no_grad():  # a trainer update: perturb a few layers and the embeddings (tied to the output layer)
        for name, p in model.named_parameters():
            if "layers.3." in name or "layers.17." in name or "embed_tokens" in name:
                p.add_(torch.randn_like(p) * 0.02)
    stale = (vllm_log_probs() - trainer_log_probs()).abs().max().item()
    rollout_engine.push_weights(model)
    synced = (vllm_log_probs() - trainer_log_probs()).abs().max().item()
    print(json.dumps({"start": start, "stale": stale, "synced": synced}))


def test_weight_sync_makes_vllm_match_the_trainer():
    """On the compiled engine (the default): its graph must read the reloaded weights, not a copy. The eager engine's
    sync is checked by the tiny run of test_train.py (its vllm_logprob_abs_diff after a step)."""
    from engine import runs_eager
    from train import Args

    eager = runs_eager(Args())  # without a C++ compiler vLLM runs eager on a CPU: then that is what is checked
    result = json.loads(run_child(f"from tests.test_engine import sync_check; sync_check({eager})").strip().splitlines()[-1])
    # same float32 weights: the same log-probs up to kernel rounding (3e-5 on an AMX CPU, 2e-3 on a CI machine)
    assert result["start"] < 1e-2
    assert result["stale"] > 0.5  # the trainer moved, the engine did not (4.2 measured)
    assert result["synced"] < 1e-2  # after the sync they agree again


def test_the_engine_runs_eager_on_request_or_without_a_cpu_compiler(monkeypatch, capsys):
    from engine import runs_eager
    from train import Args

    monkeypatch.delenv("CXX", raising=False)
    assert runs_eager(Args(enforce_eager=True))
    assert runs_eager(Args()) is (not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("clang++") is None)
    capsys.readouterr()
    monkeypatch.setenv("PATH", "")  # no compiler to be found
    assert runs_eager(Args()) is not torch.cuda.is_available()
    assert "no C++ compiler" in capsys.readouterr().out or torch.cuda.is_available()
    monkeypatch.setenv("CXX", sys.executable)  # any executable named by $CXX counts
    assert not runs_eager(Args())


def test_release_freed_memory_hands_back_freed_heap_pages():
    # 300 blocks of 100 KiB (under glibc's mmap threshold: heap memory), all freed but the last, which keeps the
    # heap's top in use so that free() alone cannot shrink it: ~29 MiB stay resident until malloc_trim.
    code = """
import ctypes, memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
blocks = [libc.malloc(100 * 1024) for _ in range(300)]
for b in blocks:
    ctypes.memset(b, 1, 100 * 1024)
for b in blocks[:-1]:
    libc.free(ctypes.c_void_p(b))
before = memory.resident_gib()
memory.release_freed_memory()
print(before - memory.resident_gib())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert float(out.stdout.split()[-1]) * 1024 > 25  # MiB handed back
