"""AT²PO inside TRL (pinned: trl==1.16.0): the turn-level loss in `GRPOTrainer`, and tree rollouts as its `rollout_func`.

    trainer = ATPOTrainer(model=model, reward_funcs=leaf_reward, args=GRPOConfig(num_generations=M + L * K, ...),
                          train_dataset=Dataset.from_list([{"prompt": t.question} for t in tasks]),
                          processing_class=tokenizer, rollout_func=TreeRollouts(env, tasks, m=M, l=L, k=K))
    trainer.train()

`ATPOTrainer` keeps everything of GRPOTrainer but its loss: `atpo_loss.policy_loss` at turn level (§3), the turns
being the runs of model tokens in TRL's completion mask times its tool/environment mask, with per-token advantages
where the rollout gave them (trees, §2.4) and GRPO's per-completion advantage otherwise. `TreeRollouts` grows one
AT²PO tree per distinct prompt of TRL's batch (atpo_tree.TreeGrower, §1) with the project's `SearchEnv`, and hands
the tree's M + L·K leaves to TRL as that prompt's `num_generations` completions: observations masked (`env_mask`),
each token's turn credit (`atpo_advantages`), the leaf reward (`atpo_reward`, which `leaf_reward` gives TRL). Turns
are sampled on the trainer's own model with transformers (transformers_engine.py). TRL's vLLM path (`use_vllm`) is
not built: TRL 1.16 pins vllm <= 0.31, this project 0.32.
"""

import random
from collections import Counter
from types import SimpleNamespace

import torch
from trl import GRPOTrainer

from atpo_loss import policy_loss
from atpo_tree import TreeGrower
from envs import SearchEnv, Task, build_prompt
from learner import tree_credit
from transformers_engine import TransformersEngine


class ATPOTrainer(GRPOTrainer):
    """GRPOTrainer with the ATPO turn-level loss (§3) and, for tree rollouts, per-token turn advantages (§2.4)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        ignored = {"beta (a KL term)": self.beta != 0.0, "top_entropy_quantile": self.top_entropy_quantile < 1.0,
                   "an entropy bonus": self._entropy_bonus_enabled, "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
                   "vllm_importance_sampling_correction": self.use_vllm and self.vllm_importance_sampling_correction}
        if any(ignored.values()):  # the ATPO loss has none of these: refused, not silently left out
            raise ValueError(f"ATPOTrainer's loss has no {', '.join(k for k, v in ignored.items() if v)}: turn it off in GRPOConfig")

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if "atpo_advantages" in inputs[0]:  # TRL copied the rollout's fields into `inputs`: the trees' turn credit
            width = output["completion_ids"].shape[1]
            rows = [x["atpo_advantages"] + [0.0] * (width - len(x["atpo_advantages"])) for x in inputs]
            output["advantages"] = torch.tensor(rows, dtype=torch.float32, device=output["completion_ids"].device)  # [B, T]
        return output

    def _compute_loss(self, model, inputs):
        """The ATPO loss on TRL's batch: its log-probs (TRL's own forward), its masks, its pi_old (or the current policy's
        log-probs, detached, as TRL does), scaled for gradient accumulation as TRL scales its 'grpo' loss."""
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        log_probs, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask, completion_ids.size(1),
                                                                  compute_entropy=True)  # [B, T]; as TRL calls it
        mask = inputs["completion_mask"] * inputs.get("tool_mask", 1)  # model tokens only: tool/environment tokens out
        advantages = inputs["advantages"]
        advantages = advantages[:, None].expand_as(log_probs) if advantages.dim() == 1 else advantages  # [B, T]
        old = inputs.get("old_per_token_logps")
        loss, stats = policy_loss(log_probs, log_probs.detach() if old is None else old, advantages, mask, level="turn",
                                  clip_low=self.epsilon_low, clip_high=self.epsilon_high)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["clip_ratio/region_mean"].append(stats["clip_frac"])
        self._metrics[mode]["atpo/approx_kl"].append(stats["approx_kl"])
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)


def leaf_reward(prompts, completions, atpo_reward, **kwargs) -> list[float]:
    """TRL's reward function for tree rollouts: the environment's reward of each completion's leaf."""
    return list(atpo_reward)


class TreeRollouts:
    """TRL's `rollout_func`: one AT²PO tree per distinct prompt, its leaves as the prompt's completions."""

    def __init__(self, env: SearchEnv, tasks: list[Task], *, m: int, l: int, k: int, alpha: float = 0.05,  # noqa: E741
                 temperature: float = 1.0, max_turn_tokens: int = 256, kv_cache_gb: float = 1.0, seed: int = 0,
                 value_mode: str = "child_softmax", adv_mode: str = "node_value"):
        self.env, self.tasks = env, {t.question: t for t in tasks}
        self.shape = {"m": m, "l": l, "k": k, "alpha": alpha}
        self.temperature, self.seed, self.value_mode, self.adv_mode = temperature, seed, value_mode, adv_mode
        self.sampling = SimpleNamespace(max_turn_tokens=max_turn_tokens, max_length=env.max_length, kv_cache_gb=kv_cache_gb,
                                        dtype="float32")
        self.last_trees: list = []

    def __call__(self, prompts: list[str], trainer) -> dict[str, list]:
        """TRL's batch of prompts (each num_generations times) -> per completion its prompt and response ids, the
        sampler's log-probs, the observation mask, the turn credit and the leaf reward."""
        leaves = self.shape["m"] + self.shape["l"] * self.shape["k"]
        counts = Counter(prompts)
        if trainer.num_generations != leaves or any(count != leaves for count in counts.values()):
            raise ValueError(f"tree rollouts give M + L*K = {leaves} completions a prompt: set num_generations = {leaves}")
        unknown = [q for q in counts if q not in self.tasks]
        if unknown:
            raise ValueError(f"a prompt that is no task's question: {unknown[0]!r:.80}")
        tokenizer = trainer.processing_class
        seeds = random.Random(self.seed * 1_000_003 + trainer.state.global_step)  # a step's draws from (seed, step), as train.py
        engine = TransformersEngine(trainer.accelerator.unwrap_model(trainer.model), tokenizer, self.sampling)
        grower = TreeGrower(engine.sampler(seeds, self.temperature), self.env.step, **self.shape, rng=seeds)
        trees = {q: grower.add(build_prompt(tokenizer, q), self.tasks[q]) for q in counts}
        for _ in grower.grow():
            pass
        self.last_trees = list(trees.values())
        leaves_of = {}  # question -> an iterator over its tree's leaves: (prompt ids, trajectory, token advantages)
        for question, tree in trees.items():
            _, _, leaves = tree_credit(tree, self.value_mode, self.adv_mode)
            leaves_of[question] = iter([(tree.prompt_ids, traj, advantages.tolist()) for traj, advantages in leaves])
        picked = [next(leaves_of[q]) for q in prompts]  # each occurrence of a prompt takes its tree's next leaf
        return {"prompt_ids": [p for p, _, _ in picked], "completion_ids": [t.response_ids for _, t, _ in picked],
                "logprobs": [t.sampler_logprobs for _, t, _ in picked], "env_mask": [t.response_mask for _, t, _ in picked],
                "atpo_advantages": [a for _, _, a in picked], "atpo_reward": [t.reward for _, t, _ in picked]}
