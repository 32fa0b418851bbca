"""trl_atpo.py against TRL's own code: on one-turn completions ATPOTrainer's loss and gradient are TRL's GSPO
(importance_sampling_level="sequence") loss and gradient; with several turns they are atpo_loss.policy_loss on
log-probs of a plain forward; a real trainer.train() of 2 steps on the default model and task grows trees of
M + L*K leaves, logs TRL's metrics and changes the weights."""

import copy
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from atpo_loss import policy_loss  # noqa: E402
from trl_atpo import ATPOTrainer, TreeRollouts, leaf_reward  # noqa: E402

EPS_LOW, EPS_HIGH = 0.2, 0.28


def tiny_model(seed: int = 0):
    """A small random Llama in float64: in float32 the ~1e-8 rounding apart of a sequence's ratio (TRL) and each
    token's (ours) comes out of this model's backward as up to 1e-4 on a few gradients."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    return AutoModelForCausalLM.from_config(config).double()


def trainer_of(cls, model, tokenizer, tmp_path, **config):
    config = {"beta": 0.0, **config}
    args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), use_cpu=True, report_to="none", loss_type="grpo",
                      epsilon=EPS_LOW, epsilon_high=EPS_HIGH, num_generations=2, per_device_train_batch_size=2, **config)
    trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                  processing_class=tokenizer, train_dataset=Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}]))
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop; _compute_loss divides by it
    return trainer


def batch(model, tool_mask: bool) -> dict:
    """Four completions after equal-length prompts, right-padded; pi_old the current log-probs plus a per-row offset
    and noise, so that ratios differ from 1 and one row's is clipped; with `tool_mask`, tool tokens cut completions
    into turns."""
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 50, (4, 5), generator=g)
    completion_ids = torch.randint(3, 50, (4, 12), generator=g)
    lengths = torch.tensor([12, 9, 7, 12])
    completion_mask = (torch.arange(12)[None] < lengths[:, None]).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor([1.0, -0.5, 0.8, -1.2], dtype=torch.float64)}
    with torch.no_grad():
        offsets = torch.tensor([-0.3, -0.1, 0.5, 0.05], dtype=torch.float64)[:, None]  # row 0's ratio e^0.3 passes 1 + EPS_HIGH with A > 0
        noise = 0.05 * torch.randn(4, 12, generator=g, dtype=torch.float64)
        inputs["old_per_token_logps"] = plain_log_probs(model, inputs) + offsets + noise
    if tool_mask:
        tools = torch.ones(4, 12, dtype=torch.long)
        tools[0, 3:5] = 0  # three turns in row 0, two in rows 1 and 3, one in row 2
        tools[0, 8:9] = 0
        tools[1, 4:6] = 0
        tools[3, 6:10] = 0
        inputs["tool_mask"] = tools
        inputs["old_per_token_logps"][:, :3] += 0.4  # each row's first turn drifted more than the rest
    return inputs


def plain_log_probs(model, inputs) -> torch.Tensor:
    """log pi of each completion token by one plain forward (not TRL's helper): [B, T]."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, inputs["prompt_ids"].shape[1] - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, inputs["completion_ids"][..., None])[..., 0]


def loss_and_gradient(trainer, model, inputs):
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_one_turn_completions_give_trls_own_sequence_level_loss(tokenizer, tmp_path):
    base = tiny_model()
    oracle_model, atpo_model = copy.deepcopy(base), copy.deepcopy(base)
    oracle = trainer_of(GRPOTrainer, oracle_model, tokenizer, tmp_path, importance_sampling_level="sequence")
    atpo = trainer_of(ATPOTrainer, atpo_model, tokenizer, tmp_path)
    inputs = batch(base, tool_mask=False)
    expected_loss, expected_grad = loss_and_gradient(oracle, oracle_model, inputs)
    loss, grad = loss_and_gradient(atpo, atpo_model, inputs)
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=0, check_dtype=False)  # TRL keeps pi_old in float64
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    assert expected_grad.norm() > 1e-3
    # row 0 alone is clipped: 1 of 4 sequences for TRL's sequence-level metric, its 12 of 40 tokens for ours
    assert oracle._metrics["train"]["clip_ratio/region_mean"][-1] == pytest.approx(1 / 4)
    assert atpo._metrics["train"]["clip_ratio/region_mean"][-1] == pytest.approx(12 / 40)


def test_several_turns_give_the_atpo_loss(tokenizer, tmp_path):
    """Tool tokens (TRL's tool_mask) cut completions into turns: the loss and gradient are policy_loss at turn level
    on the same log-probs (TRL's forward), masks and advantages, and differ from the sequence-level loss."""
    model = tiny_model()
    atpo = trainer_of(ATPOTrainer, model, tokenizer, tmp_path)
    inputs = batch(model, tool_mask=True)
    loss, grad = loss_and_gradient(atpo, model, inputs)
    model.zero_grad()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    log_probs, _, _ = atpo._get_per_token_logps_and_entropies(atpo.model, ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                                                              12, compute_entropy=True)
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    advantages = inputs["advantages"][:, None].expand_as(log_probs)
    expected, _ = policy_loss(log_probs, inputs["old_per_token_logps"], advantages, mask, level="turn", clip_low=EPS_LOW, clip_high=EPS_HIGH)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.cat([p.grad.flatten() for p in model.parameters()]), atol=1e-6, rtol=0)
    sequence, _ = policy_loss(log_probs.detach(), inputs["old_per_token_logps"], advantages, mask, level="sequence",
                              clip_low=EPS_LOW, clip_high=EPS_HIGH)
    assert abs(sequence.item() - loss.item()) > 1e-4  # the turns matter: it is not the sequence-level loss


def test_settings_the_atpo_loss_does_not_have_are_refused(tokenizer, tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "tiny")  # where TRL loads its reference model from when beta > 0
    model.config._name_or_path = str(tmp_path / "tiny")
    with pytest.raises(ValueError, match=r"no beta \(a KL term\), top_entropy_quantile: turn it off"):
        trainer_of(ATPOTrainer, model, tokenizer, tmp_path, beta=0.1, top_entropy_quantile=0.5)


def test_two_training_steps_on_the_default_model_and_task_with_tree_rollouts(tokenizer, default_retriever, tmp_path):
    import random

    import train
    import warm_start
    from default_model import default_model_path
    from envs import DEFAULT_TASK_DIR, SearchEnv, load_tasks

    model = AutoModelForCausalLM.from_pretrained(default_model_path())
    # 6 small steps at a high rate: the tool format and some right answers, so that rewards differ within a tree
    sft = train.Args(dtype="float32", sft_steps=6, sft_batch=2, sft_lr=1e-4, gradient_checkpointing="off")
    warm_start.supervised_steps(model, tokenizer, warm_start.load_demos(sft.sft_demos), sft, torch.device("cpu"), tokenizer.pad_token_id)
    tasks = random.Random(0).sample(load_tasks(DEFAULT_TASK_DIR / "train.jsonl"), 4)
    env = SearchEnv(tokenizer, default_retriever, max_turns=3, max_length=1024, format_penalty=1.0)
    trees_seen = []

    class Recorded(TreeRollouts):
        def __call__(self, prompts, trainer):
            out = super().__call__(prompts, trainer)
            trees_seen.extend(self.last_trees)
            return out

    rollouts = Recorded(env, tasks, m=2, l=1, k=2, max_turn_tokens=48, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), num_generations=4, per_device_train_batch_size=8, max_steps=2,
                      logging_steps=1, use_cpu=True, report_to="none", learning_rate=1e-5, beta=0.0, save_strategy="no", seed=0)
    trainer = ATPOTrainer(model=model, reward_funcs=leaf_reward, args=args, processing_class=tokenizer, rollout_func=rollouts,
                          train_dataset=Dataset.from_list([{"prompt": t.question} for t in tasks]))
    trainer.train()
    assert len(trees_seen) == 4 and all(len(t.leaves()) == 2 + 1 * 2 for t in trees_seen)
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2 and all({"reward", "reward_std", "clip_ratio/region_mean", "grad_norm"} <= row.keys() for row in logged)
    assert any(row["grad_norm"] > 0 for row in logged)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
