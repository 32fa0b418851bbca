"""memory.py's parts against what the default model really allocates on this CPU (bytes of tensors, not RSS)."""

import pytest
import torch

from memory import MODELS, training_memory

FLAGS = {"dtype": "bfloat16", "optimizer": "adamw", "micro_batch_tokens": 512, "checkpointing": True, "logprob_chunk": 4096,
         "kv_cache_gb": 1.0, "start_policy": True, "sleep_engine": False}


def plan(model, **flags) -> dict[str, int]:
    config = model.config
    parts = training_memory(sum(p.numel() for p in model.parameters()), config.num_hidden_layers, config.hidden_size,
                            config.vocab_size, **{**FLAGS, **flags})
    return parts["update"]


def saved_bytes(model, ids: torch.Tensor, checkpointing: bool, dtype: str) -> int:
    """Bytes of the tensors autograd keeps for the backward of one forward, each storage once, parameters aside."""
    import learner

    learner.fit_checkpointing(model, ids.numel(), "on" if checkpointing else "off", dtype)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                                      enabled=dtype == "bfloat16"):
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    del hidden
    return sum(n for ptr, n in storages.items() if ptr not in parameters)


def test_weights_gradients_and_optimizer_state_are_the_bytes_it_says(model):
    parameters = sum(p.numel() for p in model.parameters())
    parts = plan(model)
    assert parts["policy weights (float32)"] == sum(p.nbytes for p in model.parameters()) == 4 * parameters
    assert parts["start policy (float32, --log-kl-to-start)"] == 4 * parameters
    model.zero_grad()
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.float().sum().backward()
    assert parts["gradients (float32, from the micro-batches before)"] == sum(p.grad.nbytes for p in model.parameters())
    import learner

    weights = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    optimizer = learner.adamw(weights, 1e-5)
    for w, p in zip(weights, model.parameters()):
        w.grad = p.grad.clone()
    optimizer.step()
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    assert parts["optimizer state (adamw)"] == pytest.approx(state, rel=1e-4)  # two float32 moments (+ a step count each)
    model.zero_grad()


def test_activations_bound_what_autograd_keeps(model):
    """Per token, layer and hidden unit the estimate (learner.ACTIVATION_BYTES, measured as peak RSS on this model)
    bounds what autograd saves, and not loosely; bf16 autocast also keeps a bf16 copy of the weights (within 2 bytes a
    parameter); with checkpointing only the layers' float32 inputs stay. Slopes from two lengths, so fixed costs cancel."""
    import learner

    config = model.config
    unit = config.num_hidden_layers * config.hidden_size  # bytes per token of one byte per layer and hidden unit
    for dtype in ("float32", "bfloat16"):
        short, long = (saved_bytes(model, torch.randint(100, 40000, (1, n)), False, dtype) for n in (256, 512))
        slope = (long - short) / 256 / unit
        assert 0.5 * learner.ACTIVATION_BYTES[dtype] <= slope <= learner.ACTIVATION_BYTES[dtype], dtype
        fixed = short - slope * 256 * unit
        assert abs(fixed) <= (2 * sum(p.numel() for p in model.parameters()) if dtype == "bfloat16" else 1e6), dtype
        short, long = (saved_bytes(model, torch.randint(100, 40000, (1, n)), True, dtype) for n in (256, 512))
        slope = (long - short) / 256 / unit
        assert 4 <= slope <= 4 + learner.ACTIVATION_BYTES[dtype] / config.num_hidden_layers, dtype  # memory.py's formula


def test_the_readme_recipe_fits_one_80_gb_gpu_with_a_margin():
    for name, config in MODELS.items():
        from memory import GIB, RECIPE

        parts = training_memory(**config, **RECIPE)
        assert all(sum(moment.values()) / GIB < 79 - 20 for moment in parts.values()), name  # 20 GiB for what is not counted
        assert parts["update"]["vLLM weights (bfloat16)"] == 0  # asleep
