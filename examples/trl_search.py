"""AT²PO in TRL on the embedded default task: 2 steps of `trl_atpo.ATPOTrainer`, one tree a step (a smoke run).

    .venv/bin/python examples/trl_search.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's files, run from anywhere

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from default_model import default_model_path  # noqa: E402
from envs import DEFAULT_TASK_DIR, BM25Retriever, SearchEnv, load_tasks  # noqa: E402
from trl_atpo import ATPOTrainer, TreeRollouts, leaf_reward  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(default_model_path())
tokenizer = AutoTokenizer.from_pretrained(default_model_path())
tasks = load_tasks(DEFAULT_TASK_DIR / "train.jsonl")
env = SearchEnv(tokenizer, BM25Retriever(DEFAULT_TASK_DIR / "corpus.jsonl"), max_turns=4, max_length=1024, format_penalty=1.0)
m, l, k = 3, 1, 3  # noqa: E741 (the paper's names): M chains, L rounds of K branches
trainer = ATPOTrainer(
    model=model, processing_class=tokenizer, reward_funcs=leaf_reward,
    rollout_func=TreeRollouts(env, tasks, m=m, l=l, k=k, max_turn_tokens=200),
    args=GRPOConfig(num_generations=m + l * k, per_device_train_batch_size=m + l * k, epsilon=3e-3, epsilon_high=4e-3,
                    beta=0.0, learning_rate=1e-5, max_steps=2, logging_steps=1, use_cpu=True, report_to="none",
                    save_strategy="no", output_dir="runs/trl"),
    train_dataset=Dataset.from_list([{"prompt": t.question} for t in tasks]),
)
trainer.train()
