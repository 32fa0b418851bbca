"""checks.py: bad flags fail before any model loads, with one line."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bad_arguments_are_one_line_errors(tmp_path):
    from checks import check_args
    from train import Args

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


def test_cli_error_is_one_line_and_fast():
    proc = subprocess.run([sys.executable, "train.py", "--m", "0", "--output-dir", "/nonexistent/x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --m must be >= 1, got 0"]
