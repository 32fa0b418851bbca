"""train.py with the real default model and vLLM on this CPU.

vLLM runs in child processes: it binds threads and seeds global RNGs for the whole process, and vLLM 0.32's
start-up fails once bm25s (numba/llvmlite) is imported, which other test modules do.
"""

import contextlib
import http.server
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from atpo_tree import Tree
from envs import Task

ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}


def run_child(code: str, timeout: int = 900) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


# ----------------------------------------------------------------------------------------------------------------
# Weight sync


def sync_check(enforce_eager: bool) -> None:
    """In a child process: vLLM's log-probs of a fixed text follow the trainer's weights only after a sync."""
    import train  # sets the thread and in-process environment before torch loads
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from atpo_packing import token_log_probs
    from default_model import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    args = train.Args(dtype="float32", max_length=256, enforce_eager=enforce_eager)
    llm = train.start_engine(path, args)
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
    train.push_weights(llm, model, torch.float32)
    synced = (vllm_log_probs() - trainer_log_probs()).abs().max().item()
    print(json.dumps({"start": start, "stale": stale, "synced": synced}))


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "compiled"])
def test_weight_sync_makes_vllm_match_the_trainer(enforce_eager):
    """Also for the compiled engine (the default): its graph must read the reloaded weights, not a copy."""
    from train import Args, runs_eager

    if not enforce_eager and runs_eager(Args()):
        pytest.skip("no C++ compiler here: vLLM cannot compile on this CPU")
    result = json.loads(run_child(f"from tests.test_train import sync_check; sync_check({enforce_eager})").strip().splitlines()[-1])
    assert result["start"] < 1e-3  # same float32 weights: the same log-probs
    assert result["stale"] > 0.05  # the trainer moved, the engine did not
    assert result["synced"] < 1e-3  # after the sync they agree again


# ----------------------------------------------------------------------------------------------------------------
# Bad input fails before any model loads


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


def test_bad_arguments_are_one_line_errors(tmp_path):
    from train import Args, check_args

    with pytest.raises(SystemExit, match="--k must be >= 1"):
        check_args(Args(k=0))
    with pytest.raises(SystemExit, match="--demo-coef must be >= 0"):
        check_args(Args(demo_coef=-1.0))
    with pytest.raises(SystemExit, match=r"--demo-batch 2 split evenly .* source 'no-such-source' .* than \[\]"):
        check_args(Args(demo_coef=1.0, demo_source="no-such-source"))
    demos = tmp_path / "demos.jsonl"  # one two-hop transcript: too few for a batch of 3, enough for 1
    demos.write_text(json.dumps({"question": "q", "data_source": "default-2hop", "segments": []}) + "\n")
    with pytest.raises(SystemExit, match=r"--demo-batch 3 split .* than \[1\]"):
        check_args(Args(demo_coef=1.0, demo_batch=3, sft_demos=str(demos)))
    check_args(Args(demo_coef=1.0, demo_batch=1, sft_demos=str(demos)))
    check_args(Args(demo_coef=1.0, demo_source=""))  # one of each source from the default task's file
    with pytest.raises(SystemExit, match="--threads must be >= 0"):
        check_args(Args(threads=-1))
    with pytest.raises(SystemExit, match="--policy-coef must be >= 0"):
        check_args(Args(policy_coef=-1.0))
    with pytest.raises(SystemExit, match="--policy-coef, --kl-coef and --demo-coef are all 0: no term left to train"):
        check_args(Args(policy_coef=0.0, demo_coef=0.0))
    check_args(Args(policy_coef=0.0))  # the control: the transcripts' term alone
    with pytest.raises(SystemExit, match="no such file: .*missing.jsonl"):
        check_args(Args(train_data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(SystemExit, match="--num-minibatches 99 is more than the 4 trees of a step"):
        check_args(Args(num_minibatches=99))
    with pytest.raises(SystemExit, match="not a local folder nor in the Hugging Face cache"):
        check_args(Args(model="no-such-org/no-such-model"))
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        check_args(Args(resume=True, output_dir=str(tmp_path)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/retrieve"
    with pytest.raises(SystemExit, match=f"retrieval server {url} failed"):
        check_args(Args(retrieval_url=url))
    check_args(Args())  # the defaults are valid


def test_the_engine_runs_eager_on_request_or_without_a_cpu_compiler(monkeypatch, capsys):
    from train import Args, runs_eager

    monkeypatch.delenv("CXX", raising=False)
    assert runs_eager(Args(enforce_eager=True))
    assert runs_eager(Args()) is (not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("clang++") is None)
    capsys.readouterr()
    monkeypatch.setenv("PATH", "")  # no compiler to be found
    assert runs_eager(Args()) is not torch.cuda.is_available()
    assert "no C++ compiler" in capsys.readouterr().out or torch.cuda.is_available()
    monkeypatch.setenv("CXX", sys.executable)  # any executable named by $CXX counts
    assert not runs_eager(Args())


def test_cli_error_is_one_line_and_fast():
    proc = subprocess.run([sys.executable, "train.py", "--m", "0", "--output-dir", "/nonexistent/x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --m must be >= 1, got 0"]


# ----------------------------------------------------------------------------------------------------------------
# End to end: warm start, two RL steps, resume


# a run small enough for a test: 2 trees of 4 leaves a step, 4 warm-start steps, 2 evaluation questions
TINY = ["--prompts-per-step", "2", "--m", "2", "--l", "1", "--k", "2", "--max-turns", "3", "--max-turn-tokens", "48",
        "--sft-steps", "4", "--sft-eval-questions", "2", "--eval-questions", "2", "--save-every", "1",
        "--save-trees-every", "1", "--lr", "3e-5", "--format-penalty", "1.0", "--max-draws", "2", "--kl-coef", "0.1",
        "--demo-coef", "0.1", "--seed", "3", "--enforce-eager"]  # each restart would compile the engine again
# (--lr 1e-4 taught this setting to answer without searching within two steps; the resume test needs searches)
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
    """One tiny run of 3 steps never interrupted, shared by the end-to-end tests: warm_start.py alone first (it builds
    or finds the warm start), then train.py. Returns its output folder, console, metrics and final weights, read
    before any test touches the folder."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    alone = subprocess.run([sys.executable, "warm_start.py", *TINY, "--output-dir", str(out)], cwd=ROOT, env=TINY_ENV,
                           capture_output=True, text=True, timeout=900)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-5000:]
    warm_start_dir = Path(re.search(r"cached in (\S+?)\)", alone.stdout).group(1))
    built_at = (warm_start_dir / "report.json").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "warm_start.py", *TINY, "--output-dir", str(out)], cwd=ROOT, env=TINY_ENV,
                           capture_output=True, text=True, timeout=900)
    report = alone.stdout[alone.stdout.index("warm start ("):].strip()
    assert again.returncode == 0 and again.stdout.strip() == report  # cached: the report alone, no run set up
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
    # train.py started from the cache warm_start.py built (or found) without building it again
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

    import train

    def start(out: Path) -> subprocess.Popen:
        resume = ["--resume"] if train.last_checkpoint(out) is not None else []  # no checkpoint yet: start afresh
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


# ----------------------------------------------------------------------------------------------------------------
# Dynamic sampling and the rollout diagnostics


def episode_tree(task, outcomes: list[tuple[list[str], float]]) -> Tree:
    """A tree of independent chains: one per (actions of its turns, reward); each turn has one token."""
    tree = Tree([1], task)
    for actions, reward in outcomes:
        parent = 0
        for depth, action in enumerate(actions, start=1):
            parent = tree.add(parent, [5], [-0.1 * depth])
            tree.nodes[parent].info = {"action": action, "em": reward, "end": "answer" if action == "answer" else None}
        tree.nodes[parent].done, tree.nodes[parent].reward = True, reward
    return tree


def test_uniform_trees_are_dropped_and_replaced_from_their_own_source():
    import train

    one = [Task(f"q1-{i}", ["a"], "1hop") for i in range(5)]
    two = [Task(f"q2-{i}", ["a"], "2hop") for i in range(5)]
    uniform = {"q1-4", "q2-4", "q2-3"}  # queues pop from the end: the first picks of each source are uniform

    class Grower:
        """Completes the trees in the order they were added; records each add and each completion."""

        def __init__(self):
            self.queue, self.events = [], []

        def add(self, prompt, task):
            assert prompt == [len(task.question)]
            self.events.append(f"add {task.question}")
            self.queue.append(episode_tree(task, [(["answer"], 1.0), (["answer"], 1.0 if task.question in uniform else 0.0)]))
            return self.queue[-1]

        def grown(self):
            while self.queue:
                self.events.append(f"done {self.queue[0].task.question}")
                yield self.queue.pop(0)

    def draw(rounds, drop_uniform):
        grower = Grower()
        drawn, kept = train.draw_trees([list(one), list(two)], [1, 1], grower, lambda t: [len(t.question)], rounds, drop_uniform)
        return grower.events, drawn, [t.task.question for t in kept]

    events, drawn, kept = draw(4, True)
    # each refill comes from the dropped tree's source and starts the moment the dropped tree is complete
    assert events == ["add q1-4", "add q2-4", "done q1-4", "add q1-3", "done q2-4", "add q2-3", "done q1-3",
                      "done q2-3", "add q2-2", "done q2-2"]
    assert kept == ["q1-3", "q2-2"]
    assert len(drawn) == 5 and sum(train.is_uniform(t) for t in drawn) == 3
    # a cap on draws: the step trains on what it has; without dropping, the first draw is the batch
    events, drawn, kept = draw(2, True)
    assert kept == ["q1-3"] and len(drawn) == 4 and events[-1] == "done q2-3"
    events, drawn, kept = draw(1, True)
    assert kept == [] and len(drawn) == 2
    events, drawn, kept = draw(1, False)
    assert kept == ["q1-4", "q2-4"]


def test_gold_transcripts_are_split_evenly_over_the_sources():
    import train

    one_hop = [{"id": f"1-{i}"} for i in range(6)]  # 3:1 as in the default task's demos.jsonl
    two_hop = [{"id": f"2-{i}"} for i in range(2)]
    for seed in range(20):
        ids = [d["id"] for d in train.draw_demos([one_hop, two_hop], 2, random.Random(seed))]
        assert ids[0].startswith("1-") and ids[1].startswith("2-")  # one of each, whatever the pool sizes
        ids = [d["id"] for d in train.draw_demos([one_hop, two_hop], 3, random.Random(seed))]
        assert [i[0] for i in ids] == ["1", "1", "2"] and len(set(ids)) == 3  # the first pool takes the extra one
        ids = [d["id"] for d in train.draw_demos([two_hop, one_hop], 4, random.Random(seed))]
        assert sorted(ids[:2]) == ["2-0", "2-1"] and len(set(ids)) == 4  # without replacement within a pool
    # one source: the same draw as random.sample on it (what --demo-source default-2hop did before the split)
    assert train.draw_demos([one_hop], 2, random.Random(5)) == random.Random(5).sample(one_hop, 2)


def test_episode_record_by_hand():
    import train

    def record(source: str, actions: list[str], em: float) -> dict:
        tree = episode_tree(Task("q", ["a"], source), [(actions, em)])
        return train.episode_record(tree.task, [tree.nodes[n] for n in tree.path(tree.leaves()[0])])

    assert record("default-3hop", ["search", "search", "answer"], 1.0) == {
        "em": 1.0, "em/default-3hop": 1.0, "well_formed": 1.0, "searches": 2, "turns": 3, "three_hop_third_search": 0.0}
    assert record("default-3hop", ["search", "search", "search", "answer"], 0.0)["three_hop_third_search"] == 1.0
    assert record("default-2hop", ["search", "invalid", "answer"], 0.0) == {
        "em": 0.0, "em/default-2hop": 0.0, "well_formed": 2 / 3, "searches": 1, "turns": 3, "two_hop_second_search": 0.0}
    assert record("", ["answer"], 1.0) == {"em": 1.0, "well_formed": 1.0, "searches": 0, "turns": 1}


def test_rollout_stats_by_hand():
    import train

    a = episode_tree(Task("q", ["a"], "2hop"), [(["search", "search", "answer"], 1.0), (["search", "answer"], 0.0)])
    b = episode_tree(Task("r", ["a"], "1hop"), [(["search", "answer"], 1.0), (["search", "answer"], 1.0)])
    stats = train.rollout_stats([a, b])
    assert stats["charts/reward"] == pytest.approx(0.75) and stats["charts/em"] == pytest.approx(0.75)
    assert stats["charts/turns"] == pytest.approx((3 + 2 + 2 + 2) / 4)
    assert stats["charts/uniform_trees"] == 0.5 and stats["charts/trees_drawn"] == 2
    assert stats["charts/reward/2hop"] == 0.5 and stats["charts/reward/1hop"] == 1.0
    assert stats["charts/second_search/2hop"] == 0.5 and stats["charts/second_search/1hop"] == 0.0
    # turn entropies: depth d has log-prob -0.1 d, so entropy 0.1 d at every depth
    assert stats["charts/entropy/turn1"] == pytest.approx(0.1) and stats["charts/entropy/turn3"] == pytest.approx(0.3)
    assert stats["charts/generated_tokens"] == 9
    assert stats["charts/tokens_per_leaf/2hop"] == 2.5 and stats["charts/tokens_per_leaf/1hop"] == 2.0  # 5 and 4 turns
    # a shared first turn is generated once: 3 turns of one token for 2 leaves
    shared = Tree([1], Task("s", ["a"], "2hop"))
    first = shared.add(0, [5], [-0.1])
    for _ in range(2):
        leaf = shared.add(first, [6], [-0.2])
        shared.nodes[leaf].info = {"action": "answer", "em": 0.0, "end": "answer"}
        shared.nodes[leaf].done, shared.nodes[leaf].reward = True, 0.0
    shared.nodes[first].info = {"action": "search", "em": 0.0, "end": None}
    assert train.rollout_stats([shared])["charts/tokens_per_leaf/2hop"] == 1.5


def test_a_non_finite_gradient_takes_no_step():
    from train import clip_and_step

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[1.0, float("nan"), 0.0]])).sum().backward()
    assert math.isnan(clip_and_step(model, optimizer, 1.0))
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # untouched, optimizer state too
    assert optimizer.state == {} or all(not s for s in optimizer.state.values())
    optimizer.zero_grad()
    model(torch.tensor([[1.0, 2.0, 0.0]])).sum().backward()
    norm = clip_and_step(model, optimizer, 1.0)
    assert norm == pytest.approx(math.sqrt(2 * (1 + 4) + 2))  # d/dW of sum(Wx + b): x per output row, 1 per bias
    assert not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_checkpoint_swap_always_leaves_one_complete_checkpoint(tmp_path, monkeypatch):
    from pathlib import Path as P

    import train

    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path: (P(path).mkdir(parents=True), torch.save(model.state_dict(), P(path) / "w.pt"))
    tokenizer = type("Tok", (), {"save_pretrained": lambda self, path: (P(path) / "tok.json").write_text("{}")})()
    optimizer = torch.optim.AdamW(model.parameters())
    args = train.Args(output_dir=str(tmp_path))
    assert train.last_checkpoint(tmp_path) is None
    train.save_checkpoint(args, 1, model, tokenizer, optimizer)
    assert train.last_checkpoint(tmp_path) == tmp_path / "checkpoint"
    # a kill between the two renames of the next save: checkpoint/ is gone, checkpoint.old/ is complete
    real_rename = P.rename

    def killed_after_first_rename(self, target):
        real_rename(self, target)
        if P(target).name == "checkpoint.old":
            raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(P, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(args, 2, model, tokenizer, optimizer)
    monkeypatch.setattr(P, "rename", real_rename)
    last = train.last_checkpoint(tmp_path)
    assert last == tmp_path / "checkpoint.old" and torch.load(last / "state.pt", weights_only=False)["step"] == 1
    train.check_args(train.Args(output_dir=str(tmp_path), resume=True))  # --resume finds it
    train.save_checkpoint(args, 3, model, tokenizer, optimizer)  # the next save keeps step 1 as history
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.step_000001"]
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 3

    # --keep-checkpoints N: the newest N in all, the older ones named by their step
    train.save_checkpoint(args, 4, model, tokenizer, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.step_000003"]
    args.keep_checkpoints = 3
    train.save_checkpoint(args, 5, model, tokenizer, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint.step_000003", "checkpoint.step_000004"]
    assert torch.load(tmp_path / "checkpoint.step_000004" / "state.pt", weights_only=False)["step"] == 4
    shutil.rmtree(tmp_path / "checkpoint")  # lost: the newest kept one is what --resume uses
    assert train.last_checkpoint(tmp_path) == tmp_path / "checkpoint.step_000004"
    args.keep_checkpoints = 1
    train.save_checkpoint(args, 6, model, tokenizer, optimizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    with pytest.raises(SystemExit, match="--keep-checkpoints must be >= 1"):
        train.check_args(train.Args(output_dir=str(tmp_path), keep_checkpoints=0))


def test_estimated_minutes_by_hand(monkeypatch):
    """Default run in float32, warm start not cached: 16 x 25 s + 2 x 80 x 1.5 s (warm start and its two
    evaluations), 2 x 300 x 2 s (greedy evaluations before step 1 and at the end), 20 x 2 x 75 s (steps of 4
    questions x 6 leaves: twice the reference step of 2 questions). In bfloat16 the other reference CPU's timings."""
    import train

    speeds = {torch.float32: 90.0, torch.bfloat16: 370.0}  # the reference CPUs' own matmul speeds
    monkeypatch.setattr(train, "matmul_gflops", lambda dtype: speeds[dtype])
    monkeypatch.setattr(train, "has_amx", lambda: False)
    args = train.Args(dtype="float32")
    assert train.estimated_minutes(args, 80, 300, False) == pytest.approx((400 + 240 + 1200 + 3000) / 60)
    assert train.estimated_minutes(args, 80, 300, True) == pytest.approx((1200 + 3000) / 60)
    args = train.Args(dtype="bfloat16")  # 16 x 14 + 2 x 80 x 0.4 + 2 x 300 x 0.38 + 20 x 2 x 35
    assert train.estimated_minutes(args, 80, 300, False) == pytest.approx((224 + 64 + 228 + 1400) / 60)
    speeds = {torch.float32: 45.0, torch.bfloat16: 185.0}  # a machine half as fast
    args = train.Args(dtype="float32", total_steps=10, eval_every=4)  # evaluations before steps 1, 5, 9 and at the end
    assert train.estimated_minutes(args, 80, 300, True) == pytest.approx(2 * (4 * 600 + 10 * 75 * 2) / 60)
    # a CPU with AMX: its own reference, at its own matmul speed (16 x 9.6 + 2 x 80 x 0.4 + 2 x 300 x 0.21 + 20 x 2 x 26.3)
    monkeypatch.setattr(train, "has_amx", lambda: True)
    speeds = {torch.bfloat16: 936.0}
    args = train.Args(dtype="bfloat16")
    assert train.estimated_minutes(args, 80, 300, False) == pytest.approx((153.6 + 64 + 126 + 1052) / 60)
    args = train.Args(dtype="float32")  # float32 on the same CPU: the AVX2 reference
    speeds = {torch.float32: 90.0}
    assert train.estimated_minutes(args, 80, 300, True) == pytest.approx((1200 + 3000) / 60)


def test_matmul_probe_runs_on_one_thread_and_gives_the_count_back(monkeypatch):
    """The probe times one thread (as the references were timed) and restores the caller's thread count, also when
    the timing fails."""
    import train

    seen, before = [], torch.get_num_threads()
    monkeypatch.setattr(torch, "randn", lambda *a, **k: seen.append(torch.get_num_threads()) or torch.ones(256, 256))
    train.SET_NUM_THREADS(2)  # torch's own (vLLM's worker, if started in this process, makes torch.set_num_threads a no-op)
    try:
        assert train.matmul_gflops(torch.float32, seconds=0.01) > 0
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setattr(torch, "randn", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            train.matmul_gflops(torch.float32, seconds=0.01)
        assert torch.get_num_threads() == 2
    finally:
        train.SET_NUM_THREADS(before)


def test_progress_bars_in_a_log_file_write_no_cursor_codes(capsys):
    """An evaluation bar inside the RL bar, written to a file (not a terminal): plain lines, no "move up" escapes."""
    import train

    outer = train.progress_bar(total=2, desc="RL", unit="step")
    with train.progress_bar(total=3, desc="evaluation", unit="question", leave=False) as bar:
        bar.update(3)
    outer.update()
    outer.close()
    log = capsys.readouterr().err
    assert "RL" in log and "evaluation" in log and "\x1b[" not in log


def test_console_line_uses_the_metric_names_grouped_by_namespace():
    import train

    record = {"step": 3, "charts/reward": 0.25, "charts/trees_trained": 2, "charts/uniform_trees": 0.5, "losses/policy": -0.001,
              "losses/kl_to_start": 0.0123456, "time/step": 12.345, "charts/tokens_per_s": 11.26}
    # CONSOLE's order and selection (uniform_trees is in metrics.jsonl only), the namespace once per group
    assert train.console_line(record) == ("charts: reward 0.250 trees_trained 2 tokens_per_s 11.3 | "
                                          "losses: policy -0.0010 kl_to_start 0.0123 | time: step 12.3")
    assert train.console_line({"step": 0, "eval/em": 0.48, "eval/em/default-1hop": 0.4}) == "eval: em 0.480 em/default-1hop 0.400"


def test_release_freed_memory_hands_back_freed_heap_pages():
    # 300 blocks of 100 KiB (under glibc's mmap threshold: heap memory), all freed but the last, which keeps the
    # heap's top in use so that free() alone cannot shrink it: ~29 MiB stay resident until malloc_trim.
    code = """
import ctypes, train
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
blocks = [libc.malloc(100 * 1024) for _ in range(300)]
for b in blocks:
    ctypes.memset(b, 1, 100 * 1024)
for b in blocks[:-1]:
    libc.free(ctypes.c_void_p(b))
before = train.resident_gib()
train.release_freed_memory()
print(before - train.resident_gib())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert float(out.stdout.split()[-1]) * 1024 > 25  # MiB handed back


def test_fused_adamw_takes_the_for_loop_step():
    """train.py's AdamW is the fused one (a speed option): the same parameters as the for-loop AdamW after steps on
    the same gradients, weight decay and bias correction included (float32 rounding apart)."""
    import train

    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    start = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = []
    for make in (lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=False), lambda params: train.adamw(params, 1e-2)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append(params)
    assert optimizer.defaults["fused"]  # train.adamw's
    for loop, fused, begin in zip(*results, start):
        assert not torch.equal(loop, begin)  # the steps moved the parameters
        torch.testing.assert_close(fused, loop, rtol=0, atol=1e-6)
