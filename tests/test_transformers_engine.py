"""transformers_engine.py with the real default model, tokenizer and BM25 environment: its log-probs are the trainer's,
the same seed grows the same trees, turns stop where vLLM's would; and train.py end to end where vLLM cannot be
imported (a child process with vLLM hidden): metrics, checkpoint, saved trees, --resume."""

import json
import random
import subprocess
import sys

import pytest
import torch

from tests.handmade import env_without_vllm
from tests.test_train import ROOT, TINY, TINY_ENV

SHAPE = {"m": 2, "l": 1, "k": 2}


@pytest.fixture(scope="module")
def env(tokenizer, default_retriever):
    from envs import SearchEnv

    return SearchEnv(tokenizer, default_retriever, max_turns=3, max_length=1024)


def grow(model, tokenizer, env, seed: int, dtype: str, temperature: float = 1.0):
    """Three default-task questions' trees by the transformers engine (48-token turns): (trees, the sampler)."""
    import train
    from atpo_tree import grow_trees
    from envs import DEFAULT_TASK_DIR, build_prompt, load_tasks
    from transformers_engine import TransformersEngine

    tasks = load_tasks(DEFAULT_TASK_DIR / "train.jsonl")[:3]
    args = train.Args(engine="transformers", dtype=dtype, max_turn_tokens=48)
    sampler = TransformersEngine(model, tokenizer, args).sampler(random.Random(seed), temperature)
    trees = grow_trees([build_prompt(tokenizer, t.question) for t in tasks], tasks, sampler, env.step,
                       rng=random.Random(seed), **SHAPE)
    return trees, sampler


def sampled_against_trained(model, tokenizer, env, dtype: str):
    """Trees grown in `dtype` and, for every sampled token, |its log-prob from the engine - the trainer's
    response_log_probs (tree packing, the same dtype) on the same tokens and weights|: (trees, sampler, [tokens])."""
    import train
    from learner import response_log_probs

    trees, sampler = grow(model, tokenizer, env, seed=0, dtype=dtype)
    args = train.Args(dtype=dtype, packing="tree", gradient_checkpointing="off")
    rows, _ = train.training_rows(trees, args)
    with torch.no_grad():
        trainer = response_log_probs(model, rows, trees, args, tokenizer.eos_token_id)  # [B, T]
    masks = [torch.tensor(row.traj.response_mask, dtype=torch.bool) for row in rows]
    gaps = [(torch.tensor(row.traj.sampler_logprobs)[m] - trained[: len(m)][m]).abs() for row, trained, m in zip(rows, trainer, masks)]
    return trees, sampler, torch.cat(gaps)


def test_its_log_probs_are_the_trainers_and_its_turns_stop_where_vllms_would(model, tokenizer, env):
    """float32: every sampled token's log-prob equals the trainer's response_log_probs (tree packing) on the same
    tokens and weights to 1e-4, also for turns whose context reused an earlier turn's KV cache (depth >= 2); every
    turn ends at its first stop string, at EOS, or at its token limit."""
    from envs import STOP

    trees, sampler, gaps = sampled_against_trained(model, tokenizer, env, "float32")
    assert model.training  # the engine samples in eval mode and gives the trainer its mode back
    assert max(len(t.path(leaf)) for t in trees for leaf in t.leaves()) >= 2 and sampler.kept.entries  # continued turns
    assert gaps.max().item() <= 1e-4
    for tree in trees:
        for node in tree.nodes[1:]:
            text = tokenizer.decode(node.token_ids, skip_special_tokens=True)
            before = tokenizer.decode(node.token_ids[:-1], skip_special_tokens=True)
            if any(s in text for s in STOP):
                assert not any(s in before for s in STOP)  # the token that completed the stop string ended the turn
            else:
                assert node.token_ids[-1] == tokenizer.eos_token_id or len(node.token_ids) == 48


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_linear_layers_forward_on_weights_cast_once_is_autocasts_linear(device):
    """bfloat16_linears on a layer with a bias (as in Qwen2's attention), for decoding's 16 rows and a prefill's 300:
    autocast's linear of the float32 weights, in bfloat16; off the CPU (the branch is picked by the device's type alone,
    the tensors stay here) exactly, on it (oneDNN's layout where the CPU has bfloat16 products) to bfloat16 rounding."""
    from transformers_engine import bfloat16_linears

    torch.manual_seed(0)
    layer = torch.nn.Linear(576, 1536)
    (forward,) = bfloat16_linears(torch.nn.Sequential(layer), torch.device(device)).values()
    for rows in (16, 300):
        x = torch.randn(rows, 576)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = layer(x)
            out = forward(x)
        assert out.dtype == expected.dtype == torch.bfloat16
        if device == "cpu":
            torch.testing.assert_close(out, expected)
        else:
            assert torch.equal(out, expected)


def test_in_bfloat16_its_log_probs_are_the_trainers_to_rounding(model, tokenizer, env):
    """bfloat16 (its linear layers on weights cast once, on a CPU laid out once for oneDNN; an additive mask a
    decoding step): the trainer's log-probs up to bfloat16's rounding of other product shapes (the bounds against
    the gaps measured, and those of a mask that leaves the padding in: docs/notes.md)."""
    from engine import resolve_dtype

    if resolve_dtype("auto") != "bfloat16":
        pytest.skip("this CPU has no bfloat16 products (--dtype auto is float32)")
    _, _, gaps = sampled_against_trained(model, tokenizer, env, "bfloat16")
    assert len(gaps) > 300 and gaps.mean().item() <= 0.06 and gaps.max().item() <= 0.5


def test_the_same_seed_grows_the_same_trees(model, tokenizer, env):
    """The run's dtype (bf16 autocast where the CPU has it): seed 5 twice gives the same tokens and log-probs in every
    node; seed 6 other trees. Greedy (temperature 0) picks each row's most likely token."""
    from engine import resolve_dtype

    def picture(trees):
        return [[(n.parent, n.token_ids, n.logprobs, n.obs_ids) for n in t.nodes] for t in trees]

    dtype = resolve_dtype("auto")
    first, second, other = (picture(grow(model, tokenizer, env, seed, dtype)[0]) for seed in (5, 5, 6))
    assert first == second and first != other
    greedy, _ = grow(model, tokenizer, env, seed=5, dtype="float32", temperature=0.0)
    for tree in greedy:
        for node in tree.nodes[1:3]:
            context = torch.tensor([tree.context(node.parent) + node.token_ids])
            with torch.no_grad():
                logits = model(input_ids=context).logits[0, -len(node.token_ids) - 1 : -1]  # [turn, V]
            assert node.token_ids == logits.argmax(-1).tolist()


def test_train_py_runs_and_resumes_where_vllm_cannot_be_imported(tmp_path):
    """--engine auto with vLLM hidden: the transformers engine; 1 step, then --resume to 2, with the default's two
    optimizer steps a batch; metrics, checkpoint, trees."""
    out = tmp_path / "run"
    env = env_without_vllm(tmp_path, TINY_ENV)

    def run(*extra):
        proc = subprocess.run([sys.executable, "train.py", *TINY, "--num-minibatches", "2", "--output-dir", str(out), *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout

    first = run("--total-steps", "1", "--eval-questions", "0")
    assert "rollouts by the policy itself (transformers)" in first.splitlines()[0]
    resumed = run("--total-steps", "2", "--eval-questions", "0", "--resume")
    assert "resumed from" in resumed and "at step 1" in resumed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["losses/skipped_updates"] == 0 for r in rows)
    assert rows[0]["charts/generated_tokens"] > 0 and rows[1]["charts/generated_tokens"] > 0
    # the default's two optimizer steps a batch: step 1's first trains the start policy itself (KL 0 exactly), the
    # second (a second tree kept) has moved from it and needed pi_old, computed before the first (§3.6)
    assert (rows[0]["losses/kl_to_start"] == 0.0) == (rows[0]["charts/trees_trained"] <= 1)
    assert all((r["time/old_log_prob"] > 1e-3) == (r["charts/trees_trained"] > 1) for r in rows)
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    trees = json.loads((out / "trees" / "step_000002.json").read_text())
    assert all(sum(n["end"] is not None for n in t["nodes"]) == 4 for t in trees)  # M + L*K leaves
