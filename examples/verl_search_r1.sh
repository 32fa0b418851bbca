#!/usr/bin/env bash
# AT²PO's loss and turn credit in verl's own PPO trainer, on a Search-R1-style multi-turn search task.
# The recipe for a GPU machine (not run by us: our machines have no GPU). Needs ./setup.sh --verl and:
#   - train/test parquet files in verl's Search-R1 layout (verl's examples/data_preprocess/preprocess_search_r1_dataset.py
#     writes them; data_source "searchR1_*" selects verl's exact-match reward),
#   - a /retrieve server: .venv/bin/python retrieval_server.py --corpus CORPUS.jsonl --port 8000
# Extra hydra overrides are passed through: ./examples/verl_search_r1.sh trainer.n_gpus_per_node=4
set -euo pipefail
ATPO_DIR="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$HOME/data/searchR1}"
MODEL="${MODEL:-Qwen/Qwen2.5-3B-Instruct}"

# verl imports verl_atpo in the driver and in every Ray worker: that registers "atpo" as a policy loss and as an
# advantage estimator.
export PYTHONPATH="$ATPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
export VERL_USE_EXTERNAL_MODULES=verl_atpo
export ATPO_RETRIEVAL_URL="${ATPO_RETRIEVAL_URL:-http://127.0.0.1:8000/retrieve}"

exec "$ATPO_DIR/.venv-verl/bin/python" -m verl.trainer.main_ppo \
    algorithm.adv_estimator=atpo \
    actor_rollout_ref.actor.policy_loss.loss_mode=atpo \
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \
    actor_rollout_ref.actor.clip_ratio_low=0.003 \
    actor_rollout_ref.actor.clip_ratio_high=0.004 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8 \
    actor_rollout_ref.rollout.multi_turn.enable=True \
    actor_rollout_ref.rollout.multi_turn.max_assistant_turns=4 \
    actor_rollout_ref.rollout.multi_turn.function_tool_path="$ATPO_DIR/examples/verl_search_tool.py" \
    actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent \
    algorithm.use_kl_in_reward=False \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=64 \
    data.max_prompt_length=1024 \
    data.max_response_length=2048 \
    data.return_raw_chat=True \
    trainer.critic_warmup=0 \
    trainer.logger='[console]' \
    trainer.project_name=atpo \
    trainer.experiment_name=verl_search_r1_atpo \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    "$@"
