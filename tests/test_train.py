"""train.py end to end with the real default model and vLLM on this CPU; its update by hand.

vLLM runs in child processes: it binds threads and seeds global RNGs for the whole process, and vLLM 0.32's
start-up fails once bm25s (numba/llvmlite) is imported, which other test modules do.
"""

import contextlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import warm_start
from tests.handmade import DEMOS, PROMPT, SHAPES, GradientRecorder, demo_nll_by_hand, make_tree

ROOT = Path(__file__).resolve().parent.parent

CHILD_ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}


def test_demo_coef_defaults_to_on_only_where_the_warm_start_runs():
    """--demo-coef None (the default): 1.0 where the warm start runs (its gold transcripts are the task's), 0 for a
    user's model without one; a value given is kept, also through tyro's parser."""
    import tyro

    from train import Args

    assert Args().demo_coef == 1.0  # the default model: --sft auto runs the warm start
    assert Args(sft="off").demo_coef == 0.0
    assert Args(model="/my/model").demo_coef == 0.0  # --sft auto: no warm start for a user's model
    assert Args(model="/my/model", sft="on").demo_coef == 1.0
    assert Args(sft="off", demo_coef=0.3).demo_coef == 0.3
    assert Args(demo_coef=0.0).demo_coef == 0.0
    assert tyro.cli(Args, args=[]).demo_coef == 1.0
    assert tyro.cli(Args, args=["--sft", "off"]).demo_coef == 0.0
    assert tyro.cli(Args, args=["--demo-coef", "0"]).demo_coef == 0.0
    assert tyro.cli(Args, args=["--sft", "off", "--demo-coef", "0.5"]).demo_coef == 0.5


def test_the_memory_levers_default_to_the_readme_plan_on_a_gpu_and_stay_off_on_a_cpu(monkeypatch):
    """--optimizer, --micro-batch-tokens and --log-kl-to-start "auto": on a CPU what the default run has always used
    (AdamW, micro-batches by tree count, the KL to the start policy logged); where CUDA is there, the README's GPU plan
    (8-bit AdamW, 2 x --max-length tokens a micro-batch, no start policy). A value given is kept on either."""
    import tyro

    from train import Args

    cpu = Args()
    assert (cpu.optimizer, cpu.micro_batch_tokens, cpu.log_kl_to_start, cpu.sft) == ("adamw", 0, "on", "on")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = tyro.cli(Args, args=["--max-length", "8192", "--model", "/my/model"])
    assert (gpu.optimizer, gpu.micro_batch_tokens, gpu.log_kl_to_start, gpu.sft) == ("adamw8bit", 16384, "off", "off")
    given = tyro.cli(Args, args=["--optimizer", "adamw", "--micro-batch-tokens", "0", "--log-kl-to-start", "on"])
    assert (given.optimizer, given.micro_batch_tokens, given.log_kl_to_start) == ("adamw", 0, "on")


def test_policy_coef_zero_trains_the_transcripts_term_alone(model, tokenizer):
    """--policy-coef 0: the update's gradient is exactly the gold transcripts' cross-entropy (worked out here by a
    plain forward per transcript); with the default 1 the ATPO loss adds to it."""
    import train

    tree = make_tree(tokenizer, PROMPT, SHAPES["mixed"], seed=3)

    def update_gradient(policy_coef: float) -> torch.Tensor:
        args = train.Args(dtype="float32", gradient_checkpointing="off", policy_coef=policy_coef, demo_coef=1.0,
                          demo_batch=2, max_grad_norm=1e9)
        rows, _ = train.training_rows([tree], args)
        assert any(r.advantages.any() for r in rows)  # the tree has something for the ATPO loss to push
        optimizer = GradientRecorder(model)
        train.update(model, model, optimizer, rows, [tree], [[DEMOS[0]], [DEMOS[1]]], tokenizer, 2, random.Random(0), args)
        return optimizer.grads

    model.zero_grad()
    demo_nll_by_hand(model, [warm_start.demo_row(tokenizer, d) for d in DEMOS]).backward()
    by_hand = torch.cat([p.grad.flatten().clone() for p in model.parameters()])
    alone, with_rl = update_gradient(0.0), update_gradient(1.0)
    assert ((alone - by_hand).norm() / by_hand.norm()).item() <= 1e-4
    assert ((with_rl - by_hand).norm() / by_hand.norm()).item() >= 1e-2


def test_without_the_start_policy_the_update_is_the_same_and_logs_no_kl(model, tokenizer):
    """--log-kl-to-start off (and --kl-coef 0): no start policy is kept, the gradient is the one the update with it
    takes, and losses/kl_to_start is left out rather than logged as 0."""
    import copy

    import train

    tree = make_tree(tokenizer, PROMPT, SHAPES["mixed"], seed=3)
    start = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # the start policy differs from the policy, so the KL it logs is not 0
        for p in start.parameters():
            p.add_(torch.randn_like(p) * 1e-3)

    def update(reference, log_kl_to_start: str):
        args = train.Args(dtype="float32", gradient_checkpointing="off", demo_coef=0.0, max_grad_norm=1e9,
                          log_kl_to_start=log_kl_to_start)
        rows, _ = train.training_rows([tree], args)
        optimizer = GradientRecorder(model)
        losses = train.update(model, reference, optimizer, rows, [tree], [], tokenizer, 2, random.Random(0), args)
        return losses, optimizer.grads

    with_start, grads_with = update(start, "on")
    without, grads_without = update(None, "off")
    assert with_start["losses/kl_to_start"] > 0 and "losses/kl_to_start" not in without
    assert torch.equal(grads_with, grads_without)
    assert {k: v for k, v in with_start.items() if k not in ("losses/kl_to_start", "time/old_log_prob")} == {
        k: v for k, v in without.items() if k != "time/old_log_prob"}


def test_pi_old_is_kept_for_the_later_optimizer_steps_alone_and_the_clip_acts_there(model, tokenizer):
    """--num-minibatches 2: the first optimizer step takes pi_old as the current policy (ratio exactly 1: with one
    minibatch the clip fraction is 0); the second minibatch's pi_old is its log-probs under the weights before the
    first step (worked out here on a copy), and after a large first step its clip acts."""
    import copy

    import train
    from learner import response_log_probs

    trees = [make_tree(tokenizer, PROMPT, SHAPES["mixed"], seed=seed) for seed in (3, 4)]
    before = copy.deepcopy(model).eval()

    def update(num_minibatches: int, trees=trees):
        policy = copy.deepcopy(model)
        args = train.Args(dtype="float32", gradient_checkpointing="off", demo_coef=0.0, kl_coef=0.0, log_kl_to_start="on",
                          num_minibatches=num_minibatches, max_grad_norm=1e9)
        rows, _ = train.training_rows(trees, args)
        losses = train.update(policy, before, torch.optim.AdamW(policy.parameters(), lr=1e-3), rows, trees, [], tokenizer, 2,
                              random.Random(0), args)
        return rows, losses, args

    rows, losses, _ = update(1)
    assert all(r.old_log_probs is None for r in rows) and losses["losses/clip_frac"] == 0.0
    assert losses["losses/kl_to_start"] == 0.0  # one optimizer step: the policy is still the start policy throughout
    # one tree and 2 minibatches: one optimizer step, the same as with 1 (no empty second step)
    assert update(2, trees[:1])[1] == {**update(1, trees[:1])[1], "time/old_log_prob": pytest.approx(0.0, abs=1e-3)}
    rows, losses, args = update(2)
    assert losses["losses/kl_to_start"] > 0  # the second step's policy has moved from the start
    kept = [r for r in rows if r.old_log_probs is not None]
    assert len({r.tree for r in kept}) == 1 and len({r.tree for r in rows if r.old_log_probs is None}) == 1
    with torch.no_grad():
        expected = response_log_probs(before, kept, trees, args, 2)
    for row, old in zip(kept, expected):
        torch.testing.assert_close(row.old_log_probs, old[: len(row.traj.response_ids)], atol=1e-5, rtol=0)
    assert losses["losses/clip_frac"] > 0  # the second step's ratios left [1 - clip_low, 1 + clip_high]


# ----------------------------------------------------------------------------------------------------------------
# End to end: warm start, RL steps, resume


TINY = ["--prompts-per-step", "2", "--m", "2", "--l", "1", "--k", "2", "--max-turns", "3", "--max-turn-tokens", "48",
        "--sft-steps", "4", "--sft-eval-questions", "2", "--eval-questions", "2", "--save-every", "1",
        "--save-trees-every", "1", "--lr", "3e-5", "--format-penalty", "1.0", "--max-draws", "2", "--kl-coef", "0.1",
        "--demo-coef", "0.1", "--seed", "3", "--enforce-eager",  # each restart would compile the engine again
        "--num-minibatches", "1"]  # one optimizer step a batch, for CI's time; test_transformers_engine's run takes 2

TINY_ENV = {**CHILD_ENV, "ATPO_CACHE": os.environ.get("ATPO_CACHE", str(Path.home() / ".cache" / "atpo"))}


def tiny_run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *TINY, "--output-dir", str(out), *extra], cwd=ROOT, env=TINY_ENV,
                          capture_output=True, text=True, timeout=900)


def run_values(out: Path) -> list[dict]:
    """What a run measured: every row of metrics.jsonl, wall-clock times and resident memory left out."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/")) and k != "charts/tokens_per_s"}
            for r in rows]


THREE_STEPS = ["--total-steps", "3", "--eval-every", "2"]  # evaluations at steps 0, 2 and 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """One tiny run of 3 steps never interrupted, shared by the end-to-end tests: `--total-steps 0` first (it builds
    or finds the warm start and stops), then the run. Returns its output folder, console, metrics and final weights,
    read before any test touches the folder."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    alone = tiny_run(out.parent / "warm_start_only", "--total-steps", "0", "--eval-questions", "0")
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-5000:]
    assert "summary: 0 RL steps logged" in alone.stdout
    warm_start_dir = Path(re.search(r"cached in (\S+?)\)", alone.stdout).group(1))
    built_at = (warm_start_dir / "report.json").stat().st_mtime_ns
    proc = tiny_run(out, *THREE_STEPS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"out": out, "stdout": proc.stdout, "stderr": proc.stderr, "warm_start_dir": warm_start_dir,
            "built_at": built_at, "values": run_values(out), "weights": load_file(out / "checkpoint" / "model.safetensors")}


def test_a_tiny_run_end_to_end(uninterrupted, tmp_path):
    from safetensors.torch import load_file

    out, stdout, warm_start_dir = uninterrupted["out"], uninterrupted["stdout"], uninterrupted["warm_start_dir"]
    # the console holds our own lines: no third-party warning (they are hidden unless --verbose)
    warned = [line for line in (stdout + uninterrupted["stderr"]).splitlines() if re.search(r"warn", line, re.IGNORECASE)]
    assert not warned, warned
    assert "summary: 3 RL steps logged" in stdout and (out / "curves.png").stat().st_size > 10_000
    # the run started from the cache the --total-steps 0 run built (or found) without building it again
    assert f"cached in {warm_start_dir})" in stdout
    assert (warm_start_dir / "report.json").stat().st_mtime_ns == uninterrupted["built_at"]
    rows = uninterrupted["values"]
    assert [(r["step"], "losses/policy" in r) for r in rows] == [(0, False), (1, True), (2, True), (2, False), (3, True), (3, False)]
    steps = [r for r in rows if "losses/policy" in r]
    for r in steps:
        assert all(torch.isfinite(torch.tensor([r["losses/policy"], r["charts/reward"], r["losses/grad_norm"]])))
    assert any(r["losses/grad_norm"] > 0 for r in steps)  # rewards differed inside a tree: the policy got a gradient
    # the engine generated step 2 with the weights of step 1: its log-probs agree with the trainer's (bf16 noise)
    assert steps[1]["losses/vllm_logprob_abs_diff"] < 0.1
    assert (out / "checkpoint" / "model.safetensors").exists() and (out / "checkpoint" / "state.pt").exists()
    trees = json.loads((out / "trees" / "step_000002.json").read_text())  # the trees trained on
    assert len(trees) == steps[1]["charts/trees_trained"] <= steps[1]["charts/trees_drawn"]
    assert all(sum(n["end"] is not None for n in t["nodes"]) == 4 for t in trees)
    # step 1 trains the start policy itself: KL 0 exactly; the next step that trains a tree has moved away from it
    assert steps[0]["losses/kl_to_start"] == 0.0
    later = [r for r in steps[1:] if r["charts/trees_trained"] > 0]
    assert steps[0]["charts/trees_trained"] == 0 or not later or later[0]["losses/kl_to_start"] > 0
    # --demo-coef: every update also trained on gold transcripts (a step without a kept tree takes no update)
    assert "plus 2 gold transcripts (x 0.1) in every update" in next(l for l in stdout.splitlines() if l.startswith("atpo: "))
    assert all((r["losses/demo_nll"] > 0) == (r["charts/trees_trained"] > 0) for r in steps)
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    initial = load_file(warm_start_dir / "model.safetensors")
    assert any(not torch.equal(initial[k], uninterrupted["weights"][k]) for k in initial)  # the policy weights changed

    # resumed with one more step, from a retrieval server that answers the start-up probe, then only 500s: the run
    # stops at step 4 with one line naming the server and the --resume command; checkpoint and metrics stay step 3's
    resumed = tmp_path / "run"
    shutil.copytree(out, resumed)
    tiny = [*TINY, "--output-dir", str(resumed)]
    with failing_retrieval_server(good_answers=1) as url:
        proc = tiny_run(resumed, "--total-steps", "4", "--eval-every", "2", "--resume", "--retrieval-url", url)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: retrieval server {url}") and "nothing of the failed step was trained" in last_line
    assert last_line.endswith(f"resume with: python train.py {' '.join(tiny)} --total-steps 4 --eval-every 2 "
                              f"--retrieval-url {url} --resume")
    assert torch.load(resumed / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    assert run_values(resumed) == rows


def test_sigkill_at_any_moment_then_resume_ends_with_the_uninterrupted_metrics(uninterrupted, tmp_path):
    """SIGKILL a real train.py three times in one run (during a checkpoint write, right after an evaluation row, at a
    random moment), resuming after each: its metrics.jsonl ends as that of a run never killed and its final weights
    equal that run's, both to float rounding."""
    from safetensors.torch import load_file

    from checkpoint import last_checkpoint

    def start(out: Path) -> subprocess.Popen:
        # no checkpoint yet: start over (a kill before the first checkpoint leaves metrics.jsonl alone)
        resume = ["--resume"] if last_checkpoint(out) is not None else ["--overwrite-output-dir"]
        return subprocess.Popen([sys.executable, "train.py", *TINY, *THREE_STEPS, "--output-dir", str(out), *resume],
                                cwd=ROOT, env=TINY_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def writing_a_checkpoint(out: Path) -> bool:  # step 2's, written aside while step 1's is in place
        return (out / "checkpoint.tmp").exists() and (out / "checkpoint").exists()

    def evaluated_step_2(out: Path) -> bool:  # the evaluation after step 2's checkpoint is in metrics.jsonl
        path = out / "metrics.jsonl"
        return path.exists() and '"step": 2, "eval/' in path.read_text()

    # one run killed at each moment in turn, resumed after each kill
    out, life = tmp_path / "killed", 0.0
    for name, moment in [("during a checkpoint write", writing_a_checkpoint), ("after the step-2 evaluation", evaluated_step_2),
                         ("at a random moment", None)]:
        started = time.time()
        if moment is None:  # this life resumes from step 2 as the last one did from step 1: a moment within its length
            deadline = started + random.Random(0).uniform(0.1, 0.7) * life
            moment = lambda out: time.time() > deadline  # noqa: E731
        proc = start(out)
        while proc.poll() is None and not moment(out):
            time.sleep(0.005)
        assert proc.poll() is None, f"{name}: the run ended before the moment came"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        life = time.time() - started
    proc = start(out)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-5000:]
    # equal to float rounding: on an AVX2 CPU in float32 a step after a resume has differed in the 7th digit of its
    # floats (float32 kernels of the resumed process rounding differently); every count, reward and sampled token
    # stayed the same, and a step lost or applied twice changes far more
    killed, expected = run_values(out), uninterrupted["values"]
    assert len(killed) == len(expected)
    for got, want in zip(killed, expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    resumed = load_file(out / "checkpoint" / "model.safetensors")
    # a step applied twice or lost would move weights by about the learning rate, 1e-4
    difference = max((uninterrupted["weights"][k] - resumed[k]).abs().max().item() for k in resumed)
    assert difference <= 1e-6, difference


def start_tiny_run(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "train.py", *TINY, *THREE_STEPS, "--output-dir", str(out), *extra], cwd=ROOT,
                            env=TINY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)


def as_from_a_terminal():
    """Ctrl-C's default action, as a terminal gives it: a shell starts a background job (a suite run with `&`) with
    SIGINT ignored, and the child would inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_run_holds_its_folder_and_a_start_over_that_cannot_start_deletes_nothing(uninterrupted, tmp_path, unloadable_model):
    """Two real train.py in one folder: the second (--overwrite-output-dir) is refused in one line naming the first,
    which runs on to its end; then a start over whose model cannot load leaves that run's files as they were."""
    out = tmp_path / "run"
    first = start_tiny_run(out, "--total-steps", "1")  # the last value of a flag given twice is the one taken
    while first.poll() is None and f"pid {first.pid}," not in ((out / "run.lock").read_text() if (out / "run.lock").exists() else ""):
        time.sleep(0.05)
    second = tiny_run(out, *THREE_STEPS, "--overwrite-output-dir")
    assert second.returncode == 2 and second.stdout == "", second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --output-dir {out} is in use by another run (pid {first.pid}, started ")
    stdout, stderr = first.communicate(timeout=900)
    assert first.returncode == 0 and "summary: 1 RL steps logged" in stdout, stderr[-3000:]
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    broken = tiny_run(out, "--overwrite-output-dir", "--model", str(unloadable_model))
    assert broken.returncode == 1 and "ignore_mismatched_sizes" in broken.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "run.lock"} == files


def test_ctrl_c_or_sigterm_stops_in_one_line_with_a_whole_checkpoint_kept(uninterrupted, tmp_path):
    """SIGINT while a checkpoint is being written, then SIGTERM in the resumed run: each time one line (no traceback)
    naming the checkpoint kept and the --resume command; no partial checkpoint is left; the run then resumes."""
    from checkpoint import last_checkpoint

    def writing_a_checkpoint(proc) -> bool:  # step 2's, written aside while step 1's is in place
        return (out / "checkpoint.tmp").exists() and (out / "checkpoint").exists()

    def loading_the_model(proc) -> bool:  # past the checks: the run holds the folder
        return (out / "run.lock").exists() and f"pid {proc.pid}," in (out / "run.lock").read_text()

    out = tmp_path / "run"
    for sig, moment in [(signal.SIGINT, writing_a_checkpoint), (signal.SIGTERM, loading_the_model)]:
        proc = start_tiny_run(out, "--total-steps", "2", *(["--resume"] if last_checkpoint(out) else []))
        while proc.poll() is None and not moment(proc):
            time.sleep(0.005)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
        last = stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert last.startswith("stopped (Ctrl-C or SIGTERM); the last checkpoint is ") and last.endswith(" --resume"), last
        assert not (out / "checkpoint.tmp").exists()
        assert torch.load(last_checkpoint(out) / "state.pt", weights_only=False)["step"] >= 1
    proc = start_tiny_run(out, "--total-steps", "2", "--resume")
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0 and "summary: 2 RL steps logged" in stdout, stderr[-3000:]


def test_a_checkpoint_that_cannot_be_written_stops_in_one_line_and_leaves_no_partial_files(uninterrupted, tmp_path):
    """Files past 100 MiB refused by the kernel (RLIMIT_FSIZE: the write fails as on a full disk): the first
    checkpoint (540 MB of weights) fails, the run stops with one line naming the folder, its free space and what a
    checkpoint takes, and leaves no checkpoint.tmp."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 2**20, 100 * 2**20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write returns EFBIG instead of the signal killing the process

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", *TINY, "--total-steps", "1", "--eval-questions", "0", "--output-dir",
                           str(out)], cwd=ROOT, env=TINY_ENV, capture_output=True, text=True, timeout=900, preexec_fn=small_files)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith(f"error: the checkpoint of step 1 could not be written in {out} ("), last
    assert "GiB free on its disk, a checkpoint takes about 1.5 GiB" in last and "no checkpoint was saved yet" in last
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint").exists()


def test_a_checkpoint_takes_what_checkpoint_gib_says(uninterrupted):
    """The estimate behind the disk note, against the size of a checkpoint the tiny run wrote (weights and AdamW)."""
    from checkpoint import checkpoint_gib
    from learner import load_policy

    checkpoint = uninterrupted["out"] / "checkpoint"
    on_disk = sum(p.stat().st_size for p in checkpoint.iterdir()) / 2**30
    estimate = checkpoint_gib(load_policy(str(checkpoint), torch.device("cpu")), "adamw", save_optimizer=True)
    assert estimate == pytest.approx(on_disk, rel=0.05)


@contextlib.contextmanager
def failing_retrieval_server(good_answers: int):
    """A /retrieve server on loopback that answers its first `good_answers` requests with one passage per query,
    then 500 to everything."""
    answered = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            queries = json.loads(self.rfile.read(int(self.headers["content-length"])))["queries"]
            if len(answered) < good_answers:
                answered.append(queries)
                hit = {"document": {"id": "0", "contents": "Title\ntext"}, "score": 1.0}  # Search-R1's format
                body = json.dumps({"result": [[hit] for _ in queries]}).encode()
                self.send_response(200)
            else:
                body = b"internal error"
                self.send_response(500)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    finally:
        server.shutdown()
