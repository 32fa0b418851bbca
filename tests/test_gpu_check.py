"""benchmarks/gpu_check.py: where there is no GPU it says so and exits 0; its trainer check runs as written on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check itself runs")
def test_without_a_gpu_it_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().startswith("no GPU") and proc.stderr.strip() == ""


def test_the_packed_vs_path_check_passes_on_the_cpu(capsys, monkeypatch):
    import random

    from benchmarks import gpu_check

    tree = gpu_check.random_tree(2048, 6, random.Random(0), gpu_check.TURNS, gpu_check.OBSERVATION, gpu_check.PROMPT)
    lengths = [len(tree.prompt_ids) + len(r.response_ids) for r in tree.trajectories()]
    assert len(tree.leaves()) == 6 and any(n % 128 == 64 for n in lengths)  # the lengths the check is about
    assert {tree.nodes[leaf].reward for leaf in tree.leaves()} == {0.0, 1.0}
    # the check itself, as written, on shorter nodes (the GPU's lengths take minutes on a CPU)
    monkeypatch.setattr(gpu_check, "PROMPT", 16)
    monkeypatch.setattr(gpu_check, "TURNS", [16, 32, 48])
    monkeypatch.setattr(gpu_check, "OBSERVATION", 16)
    assert gpu_check.packed_equals_path(torch.device("cpu"))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["PASS  packed = path-by-path, float32", "PASS  packed = path-by-path, bfloat16"]


def test_the_transformers_engine_check_runs_train_py_as_written_on_the_cpu(capsys):
    """Check 3 as written: a Qwen3-shaped model and a BPE tokenizer made on the spot, two train.py steps with
    --engine transformers against a loopback retrieval server (here on the CPU; on the GPU where one is lent)."""
    from benchmarks import gpu_check

    assert gpu_check.transformers_train_steps(torch.device("cpu"))
    assert capsys.readouterr().out.startswith("PASS  train.py --engine transformers, 2 steps on the CPU (Qwen3-shaped, adamw): exit 0, 2 steps")
