"""checks.py: bad input is refused before any model work, one line per problem, exit code 2, no earlier run lost.

The table runs train.py as a user would, in a subprocess, against a model folder whose weights cannot load (one tensor
of the wrong shape): had an invocation got as far as loading the model, transformers would fail on it with a traceback
and another exit code.
"""

import contextlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def problems(capsys, **flags) -> list[str]:
    """check_args on train.Args(**flags): the lines it prints before exit 2 ([] when it passes)."""
    from checks import check_args
    from train import Args

    try:
        check_args(Args(**flags))
    except SystemExit as stop:
        assert stop.code == 2
        return capsys.readouterr().err.strip().splitlines()
    return []


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert problems(capsys, k=0, output_dir=out) == ["error: --k must be >= 1, got 0"]
    assert problems(capsys, demo_coef=-1.0, output_dir=out) == ["error: --demo-coef must be a finite number in [0, ∞), got -1.0"]
    [line] = problems(capsys, demo_coef=1.0, demo_source="no-such-source", output_dir=out)
    assert "--demo-batch 2 split evenly" in line and "source 'no-such-source'" in line and line.endswith("than []")
    demos = tmp_path / "demos.jsonl"  # one two-hop transcript: too few for a batch of 3, enough for 1
    demos.write_text(json.dumps({"question": "q", "data_source": "default-2hop", "segments": [["model", "<answer> a </answer>"]]}) + "\n")
    [line] = problems(capsys, demo_coef=1.0, demo_batch=3, sft_demos=str(demos), output_dir=out)
    assert "--demo-batch 3 split" in line and line.endswith("than [1]")
    assert problems(capsys, demo_coef=1.0, demo_batch=1, sft_demos=str(demos), output_dir=out) == []
    assert problems(capsys, demo_coef=1.0, demo_source="", output_dir=out) == []  # one of each source of the default file
    assert problems(capsys, threads=-1, output_dir=out) == ["error: --threads must be >= 0, got -1"]
    assert problems(capsys, policy_coef=-1.0, output_dir=out) == ["error: --policy-coef must be a finite number in [0, ∞), got -1.0"]
    assert problems(capsys, policy_coef=0.0, demo_coef=0.0, output_dir=out) == [
        "error: --policy-coef, --kl-coef and --demo-coef are all 0: no term left to train"]
    assert problems(capsys, policy_coef=0.0, output_dir=out) == []  # the control: the transcripts' term alone
    assert problems(capsys, train_data=str(tmp_path / "missing.jsonl"), output_dir=out) == [
        f"error: --train-data: no such file: {tmp_path / 'missing.jsonl'}"]
    assert problems(capsys, num_minibatches=99, output_dir=out) == [
        "error: --num-minibatches 99 is more than the 4 trees of a step (--packing tree)"]
    [line] = problems(capsys, model="no-such-org/no-such-model", output_dir=out)
    assert "not a local folder nor in the Hugging Face cache" in line
    assert problems(capsys, resume=True, output_dir=str(tmp_path)) == [f"error: --resume: no checkpoint in {tmp_path}/checkpoint"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/retrieve"
    [line] = problems(capsys, retrieval_url=url, output_dir=out)
    assert line.startswith(f"error: --retrieval-url with --topk 3: retrieval server {url} failed")
    assert problems(capsys, output_dir=out) == []  # the defaults are valid


def test_the_8bit_optimizer_without_bitsandbytes_is_one_line(tmp_path, capsys, monkeypatch):
    import importlib.util

    out = str(tmp_path / "run")
    assert problems(capsys, optimizer="adamw8bit", output_dir=out) == []  # installed here
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    assert problems(capsys, optimizer="adamw8bit", output_dir=out) == [
        "error: --optimizer adamw8bit (auto's choice on a GPU) needs bitsandbytes: pip install 'bitsandbytes>=0.50', or --optimizer adamw"]
    assert problems(capsys, optimizer="adamw", output_dir=out) == []


def test_the_vllm_engine_where_vllm_cannot_be_imported_is_one_line_and_auto_picks_transformers(tmp_path, unloadable_model):
    """A child process that cannot import vLLM: --engine vllm is refused in one line naming --engine transformers,
    before anything loads; --engine auto passes the checks and says transformers (then fails at the empty weights)."""
    import os

    from tests.handmade import env_without_vllm

    env = env_without_vllm(tmp_path, os.environ)
    refused = subprocess.run([sys.executable, "train.py", "--engine", "vllm", "--model", str(unloadable_model), "--output-dir",
                              str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        "error: --engine vllm: vLLM is not installed here (it has no wheel for macOS or Windows): use --engine transformers"]
    auto = subprocess.run([sys.executable, "train.py", "--model", str(unloadable_model), "--output-dir", str(tmp_path / "run")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert auto.returncode == 1 and "ignore_mismatched_sizes" in auto.stderr
    assert auto.stdout.startswith("atpo: ") and "rollouts by the policy itself (transformers)" in auto.stdout.splitlines()[0]


def test_what_the_checks_read_is_passed_on(tmp_path):
    from checks import check_args
    from envs import load_tasks, read_corpus
    from train import Args
    from warm_start import load_demos

    args = Args(output_dir=str(tmp_path / "run"))
    inputs = check_args(args)
    assert inputs.train_tasks == load_tasks(args.train_data) and inputs.test_tasks == load_tasks(args.test_data)
    assert inputs.corpus == read_corpus(args.corpus) and inputs.demos == load_demos(args.sft_demos)
    assert inputs.resume_state is None and inputs.tokenizer.eos_token_id is not None


@contextlib.contextmanager
def server_refusing_topk_above(largest: int):
    """A /retrieve server on loopback that answers with one passage per query, and 422 for a topk above `largest`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            payload = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if payload["topk"] > largest:
                status, body = 422, {"detail": f"topk must be in 1..{largest}, got {payload['topk']}"}
            else:
                status, body = 200, {"result": [[{"document": {"contents": "T\ntext"}, "score": 1.0}] for _ in payload["queries"]]}
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    finally:
        server.shutdown()


def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {}

    def write(name: str, text: str) -> None:
        files[name] = tmp_path / name
        files[name].write_text(text)

    question = {"question": "Who?", "golden_answers": ["Ann"]}
    write("torn.jsonl", json.dumps(question) + "\n{not json\n")
    write("empty.jsonl", "\n")
    write("no_answers.jsonl", json.dumps({"question": "Who?"}) + "\n")
    write("article_answer.jsonl", json.dumps(question) + "\n\n" + json.dumps({"question": "Who?", "golden_answers": ["The"]}) + "\n")
    write("bad_demos.jsonl", json.dumps({"question": "q", "data_source": "s", "segments": [["model", "x"]]}) + "\n[1, 2]\n")
    write("bad_corpus.jsonl", json.dumps({"id": "1", "contents": "T\nx"}) + "\n" + json.dumps({"id": "2"}) + "\n")
    write("a_file", "not a folder")
    (tmp_path / "empty_model").mkdir()
    files["empty_model"] = tmp_path / "empty_model"
    (tmp_path / "torn_run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "torn_run" / "checkpoint" / "state.pt").write_bytes(b"PK\x03\x04 torn")
    files["torn_run"] = tmp_path / "torn_run"
    for name, config, weights in [("torn_model", "{}", b"\x10\x00\x00\x00\x00\x00\x00\x00{"), ("bad_config_model", "{", b"")]:
        files[name] = tmp_path / name
        files[name].mkdir()
        (files[name] / "config.json").write_text(config)
        (files[name] / "tokenizer.json").write_text("{}")
        (files[name] / "model.safetensors").write_bytes(weights)
    return files


def runs_to_resume(tmp_path: Path, model: Path) -> dict[str, Path]:
    """A run started with --seed 3 (its checkpoint's state.pt records its flags), and one whose weights are torn."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from train import Args

    runs = {}
    for name, weights in [("seed_3_run", None), ("torn_weights_run", b"\x10\x00")]:
        runs[name] = tmp_path / name
        (runs[name] / "checkpoint").mkdir(parents=True)
        (runs[name] / "checkpoint" / "config.json").write_text("{}")
        if weights is None:
            save_file({"w": torch.zeros(1)}, runs[name] / "checkpoint" / "model.safetensors")
        else:
            (runs[name] / "checkpoint" / "model.safetensors").write_bytes(weights)
        args = dataclasses.asdict(Args(model=str(model), seed=3, output_dir=str(runs[name])))
        torch.save({"step": 1, "args": args}, runs[name] / "checkpoint" / "state.pt")
    return runs


# every float flag at values that make no sense, in one invocation each: every one is its own line
FLOATS = ["--kv-cache-gb", "--format-penalty", "--sft-lr", "--sft-two-hop-frac", "--alpha",
          "--temperature", "--clip-low", "--clip-high", "--policy-coef", "--kl-coef", "--demo-coef", "--lr", "--max-grad-norm"]
ZERO_IS_BAD = ["--kv-cache-gb", "--sft-lr", "--temperature", "--clip-low", "--clip-high", "--lr",
               "--max-grad-norm"]
# every integer flag that has a smallest value, one below it
INTS = {"--prompts-per-step": 0, "--max-draws": 0, "--m": 0, "--l": -1, "--k": 0, "--topk": 0, "--passage-chars": 0,
        "--max-turns": 0, "--max-turn-tokens": 0, "--sft-steps": 0, "--sft-batch": 0, "--sft-eval-questions": 0,
        "--demo-batch": 0, "--total-steps": -1, "--num-minibatches": 0, "--threads": -1, "--micro-batch": 0,
        "--eval-every": 0, "--eval-questions": -1, "--save-every": 0, "--save-trees-every": -1, "--seed": -1,
        "--logprob-chunk": 0}


def refused(tmp_path: Path, model: Path, url: str) -> list[tuple[list[str], list[str]]]:
    """(the invocation's flags, what its error lines must say, one line each)."""
    f, runs = bad_files(tmp_path), runs_to_resume(tmp_path, model)
    default = str(ROOT / "data" / "default")
    cases = [
        ([flag for name in FLOATS for flag in (name, "nan")], FLOATS),
        ([flag for name in FLOATS for flag in (name, "inf")], FLOATS),
        ([flag for name in FLOATS for flag in (name, "-1")], FLOATS),
        ([flag for name in FLOATS if name != "--policy-coef" for flag in (name, "0")], ZERO_IS_BAD),
        (["--sft-two-hop-frac", "1.1", "--clip-low", "1"], ["--sft-two-hop-frac", "--clip-low"]),
        ([flag for name, value in INTS.items() for flag in (name, str(value))] + ["--max-length", "1"],
         [*INTS, "--max-length"]),
        (["--seed", str(2**32)], ["--seed must be below 2**32"]),
        (["--policy-coef", "0", "--demo-coef", "0"], ["no term left to train"]),
        (["--num-minibatches", "99"], ["--num-minibatches 99 is more than the 4 trees"]),
        (["--max-turn-tokens", "2000"], ["--max-turn-tokens 2000 must be below --max-length 1024"]),
        (["--micro-batch-tokens", "1000"], ["--micro-batch-tokens 1000 must be 0 or at least --max-length 1024"]),
        (["--micro-batch-tokens", "-1"], ["--micro-batch-tokens -1 must be 0 or at least --max-length 1024"]),
        (["--track", "--wandb-project", " "], ["--wandb-project"]),
        (["--model", "/nonexistent"], ["--model /nonexistent: no such model folder"]),
        (["--model", str(f["empty_model"])], [f"--model {f['empty_model']}: not a model folder, it has no config.json"]),
        (["--model", str(f["torn_model"])], [f"--model {f['torn_model']}: {f['torn_model']}/model.safetensors cannot be read"]),
        (["--model", str(f["bad_config_model"])], [f"--model {f['bad_config_model']}: {f['bad_config_model']}/config.json cannot be read"]),
        (["--model", "no-such-org/no-such-model"], ["--model no-such-org/no-such-model: not a local folder nor in the Hugging Face cache"]),
        (["--train-data", str(tmp_path / "missing.jsonl")], [f"--train-data: no such file: {tmp_path / 'missing.jsonl'}"]),
        (["--train-data", str(f["torn.jsonl"])], [f"--train-data: {f['torn.jsonl']}: line 2 is not valid JSON"]),
        (["--test-data", str(f["empty.jsonl"])], [f"--test-data: {f['empty.jsonl']}: no questions"]),
        (["--train-data", str(f["no_answers.jsonl"])], [f"{f['no_answers.jsonl']}: line 1 has no field 'golden_answers'"]),
        (["--test-data", str(f["article_answer.jsonl"])], [f"{f['article_answer.jsonl']}: line 3: no gold answer left after normalisation"]),
        (["--sft", "on", "--sft-demos", f"{default}/train.jsonl"], [f"--sft-demos: {default}/train.jsonl: line 1 is not a gold transcript"]),
        (["--demo-coef", "1", "--sft-demos", str(f["bad_demos.jsonl"])], [f"--sft-demos: {f['bad_demos.jsonl']}: line 2 is not a gold transcript"]),
        (["--demo-coef", "1", "--demo-source", "nope", "--sft-demos", f"{default}/demos.jsonl"], ["--demo-batch 2 split evenly"]),
        (["--corpus", str(tmp_path / "missing_corpus.jsonl")], ["--corpus: no such file"]),
        (["--corpus", str(f["bad_corpus.jsonl"])], [f"--corpus: {f['bad_corpus.jsonl']}: line 2 has no field 'contents'"]),
        (["--output-dir", "/proc/no/such/run"], ["--output-dir /proc/no/such/run: cannot write in /proc"]),
        (["--output-dir", str(f["a_file"])], [f"--output-dir {f['a_file']} is a file, not a folder"]),
        (["--output-dir", str(tmp_path / "never_ran"), "--resume"], [f"--resume: no checkpoint in {tmp_path / 'never_ran'}/checkpoint"]),
        (["--output-dir", str(f["torn_run"]), "--resume"], [f"--resume: {f['torn_run']}/checkpoint/state.pt cannot be read"]),
        (["--output-dir", str(f["torn_run"]), "--resume", "--overwrite-output-dir"],
         ["--resume and --overwrite-output-dir contradict", "state.pt cannot be read"]),
        (["--output-dir", str(runs["seed_3_run"]), "--resume", "--seed", "4", "--total-steps", "9"],
         [f"--resume: the run in {runs['seed_3_run']} was started with other values (--seed 3 there, 4 now)"]),
        (["--output-dir", str(runs["torn_weights_run"]), "--resume", "--seed", "3"],
         [f"--resume: {runs['torn_weights_run']}/checkpoint/model.safetensors cannot be read"]),
        (["--retrieval-url", "localhost:8000/retrieve"], ["--retrieval-url localhost:8000/retrieve is not an http(s) URL"]),
        (["--retrieval-url", url, "--topk", "3"], [f"--retrieval-url with --topk 3: retrieval server {url} refused the request (422)"]),
        (["--max-length", "60", "--max-turn-tokens", "8"], ["--max-length 60 leaves no room to answer: the longest prompt has"]),
    ]
    return [([*(["--model", str(model)] if "--model" not in flags else []), *flags], expected) for flags, expected in cases]


def run_train(flags: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    out = [] if "--output-dir" in flags else ["--output-dir", str(output_dir)]
    return subprocess.run([sys.executable, "train.py", *flags, *out], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_every_refused_invocation_is_one_line_per_problem_before_any_model_work(tmp_path, unloadable_model):
    with server_refusing_topk_above(2) as url:
        cases = refused(tmp_path, unloadable_model, url)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda c: run_train(c[1][0], tmp_path / f"out{c[0]}"), enumerate(cases)))
    for (flags, expected), proc in zip(cases, results):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (flags, proc.stderr[-3000:])
        assert proc.stdout == "", (flags, proc.stdout)  # not even the first line of a run
        assert all(line.startswith("error: ") for line in lines), (flags, lines)
        assert len(lines) == len(expected), (flags, lines)
        for text in expected:  # a bare flag names its own line: "error: --m must ..." (not "--max-turns")
            said = f"error: {text} must" if " " not in text else text
            assert sum(said in line for line in lines) == 1, (flags, text, lines)
    # the control: the same model and files without the bad flag pass every check and fail only at loading the weights
    control = run_train(["--model", str(unloadable_model)], tmp_path / "control")
    assert control.returncode == 1 and "ignore_mismatched_sizes" in control.stderr and control.stdout.startswith("atpo: ")


def test_an_earlier_run_is_never_lost_by_a_fresh_start(tmp_path, unloadable_model):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    metrics = b'{"step": 0, "eval/em": 0.5}\n{"step": 1, "losses/policy": 0.1}\n'
    (run / "metrics.jsonl").write_bytes(metrics)
    (run / "checkpoint" / "state.pt").write_bytes(b"the earlier run's state")
    proc = run_train(["--model", str(unloadable_model)], run)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --output-dir {run} holds a run: continue it with --resume, or start over with --overwrite-output-dir"]
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "checkpoint" / "state.pt").read_bytes() == b"the earlier run's state"
    # --overwrite-output-dir says to start over, but the earlier run's files go only once the new run has loaded its
    # model and started its engine: this one cannot load its weights, and the earlier run stays as it was
    proc = run_train(["--model", str(unloadable_model), "--overwrite-output-dir"], run)
    assert proc.returncode == 1 and "ignore_mismatched_sizes" in proc.stderr
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "checkpoint" / "state.pt").read_bytes() == b"the earlier run's state"


def test_resume_refuses_other_values_of_what_defines_the_run_in_one_line(tmp_path, capsys):
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from train import Args

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, run / "checkpoint" / "model.safetensors")
    saved = Args(output_dir=str(run), seed=3, m=2, lr=3e-5, total_steps=4)
    torch.save({"step": 2, "args": dataclasses.asdict(saved)}, run / "checkpoint" / "state.pt")
    # what may change (how long, evaluation, saving, threads, the engine) passes, with paths written another way
    assert problems(capsys, output_dir=str(run), resume=True, seed=3, m=2, lr=3e-5, total_steps=30, eval_every=5,
                    save_every=2, threads=1, engine="transformers", corpus=os.path.relpath(Args.corpus)) == []
    # what defines the run does not: one line naming each flag with the checkpoint's value and the new one
    lines = problems(capsys, output_dir=str(run), resume=True, seed=4, m=3, lr=1e-4, loss_level="token", total_steps=30)
    assert len(lines) == 1 and lines[0].startswith(f"error: --resume: the run in {run} was started with other values")
    for said in ("--seed 3 there, 4 now", "--m 2 there, 3 now", "--lr 3e-05 there, 0.0001 now", "--loss-level turn there, token now"):
        assert said in lines[0], (said, lines[0])
    assert "--total-steps" not in lines[0]


def test_a_broken_cache_entry_is_one_line_naming_the_folder_to_delete(tmp_path, monkeypatch, tokenizer):
    """A truncated weights file in the converted default model, then in a cached warm start (a cache of our own,
    $ATPO_CACHE): each is refused before any model work, in one line that names the folder to delete."""
    import engine
    from default_model import NAME, default_model_path
    from train import Args
    from warm_start import warm_start_dir

    cache = tmp_path / "cache"
    shutil.copytree(default_model_path(), cache / NAME)
    monkeypatch.setenv("ATPO_CACHE", str(cache))
    warm = warm_start_dir(Args(dtype=engine.resolve_dtype("auto")))  # the run's cached warm start, in this cache
    shutil.copytree(cache / NAME, warm)
    (warm / "report.json").write_text("{}")
    env = {**os.environ, "ATPO_CACHE": str(cache)}

    def torn(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:1000])

    for broken, what, folder in [(warm, "the cached warm start", warm), (cache / NAME, "the converted default model", cache / NAME)]:
        torn(broken / "model.safetensors")
        proc = subprocess.run([sys.executable, "train.py", "--output-dir", str(tmp_path / "run")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith(f"error: {what}: {folder}/model.safetensors cannot be read") and lines[0].endswith(
            f"delete {folder} ({'the next run builds it again' if folder == warm else 'the next run converts it again'})"), lines[0]


def test_cli_error_is_one_line_and_fast():
    proc = subprocess.run([sys.executable, "train.py", "--m", "0", "--output-dir", "/nonexistent/x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --m must be >= 1, got 0"]
