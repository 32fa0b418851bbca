"""The GPU recipe's check on one GPU, in under 8 minutes: one line per check, PASS or FAIL with its figure.

    .venv/bin/python -m benchmarks.gpu_check          (from the repository root; "no GPU" and exit 0 where there is none)

Trainer half (torch + transformers; tyro and bitsandbytes carried as wheels where missing):
  1. a random Qwen3-shaped model (grouped-query attention, 4 layers) from a config: packed vs path-by-path log-probs
     and gradients equal, in float32 and bfloat16, with node and row lengths of 64 mod 128; a boolean-masked SDPA backward
     finite under each backend learner.safe_attention allows (cuDNN's result is shown, not judged: it is the one excluded);
  2. a Qwen3-4B-sized model from its config with the recipe's dtype and optimizer (memory.RECIPE): two updates of a
     40-leaf tree over the token budget (several micro-batches); the second, in the steady state (gradients of the
     micro-batch before and the optimizer state present), torch.cuda.max_memory_allocated against memory.py's total;
  3. train.py for 2 steps with --engine transformers (no vLLM) on a Qwen3-shaped model and a BPE tokenizer built on
     the spot from the default corpus, against a retrieval server on loopback: the whole loop on the GPU.
Engine half, where vLLM is installed (the default model):
  4. after a weight push vLLM's log-probs equal the trainer's;
  5. sleep (level 2) frees the engine's memory, wake-up and a push restore it, log-probs again equal;
  6. the engine starts beside a resident Qwen3-4B-sized trainer (weights and 8-bit optimizer state allocated first);
  7. train.py for 2 steps with no skipped update.
"""

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# node lengths: every row and node block of 64 mod 128 tokens somewhere (the lengths pytorch#196678 saw NaN at)
PROMPT, TURNS, OBSERVATION = 64, [64, 192, 256], 128  # a whole path: 832 = 6 x 128 + 64 tokens
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True}


def say(name: str, passed: bool | None, figure: str) -> bool:
    print(f"{'PASS' if passed else 'INFO' if passed is None else 'FAIL'}  {name}: {figure}", flush=True)
    return passed is not False


def random_tree(vocab: int, leaves: int, rng: random.Random, turns: list[int], observation: int, prompt: int):
    """A tree of `leaves` leaves with random tokens: chains of len(turns) turns (observations between them) branching
    off random earlier nodes, rewards 0 or 1 (at least one of each)."""
    from atpo_tree import Tree

    tree = Tree([rng.randrange(vocab) for _ in range(prompt)])
    while len(tree.leaves()) < leaves:
        node = rng.choice([i for i, n in enumerate(tree.nodes) if not n.done])
        for depth in range(len(tree.path(node)), len(turns)):
            ids = [rng.randrange(vocab) for _ in range(turns[depth])]
            node = tree.add(node, ids, [-rng.uniform(0.1, 2.0) for _ in ids])
            last = depth == len(turns) - 1
            tree.nodes[node].obs_ids = [] if last else [rng.randrange(vocab) for _ in range(observation)]
            if last:
                tree.nodes[node].done, tree.nodes[node].reward = True, float(len(tree.leaves()) % 2)
    return tree


def tiny_qwen3(device: torch.device):
    from transformers import AutoModelForCausalLM, Qwen3Config

    from learner import TREE_ATTENTION, register_tree_attention

    register_tree_attention()
    config = Qwen3Config(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, attn_implementation=TREE_ATTENTION)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).train()
    model.config.use_cache = False
    return model


def log_probs_and_grads(model, trees, packing: str, dtype: str):
    import learner
    import train
    from atpo_loss import policy_loss

    args = train.Args(packing=packing, dtype=dtype, gradient_checkpointing="off", micro_batch=len(trees))
    rows, _ = train.training_rows(trees, args)
    model.zero_grad()
    log_probs = learner.response_log_probs(model, rows, trees, args, pad_id=0)
    mask = learner.pad([r.traj.response_mask for r in rows], 0, torch.long).to(log_probs.device)
    advantages = learner.padded([r.advantages for r in rows]).to(log_probs.device)
    loss, _ = policy_loss(log_probs, log_probs.detach(), advantages, mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    return (log_probs.detach() * mask).float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])


def packed_equals_path(device: torch.device) -> bool:
    """Check 1."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_qwen3(device)
    rng = random.Random(0)
    trees = [random_tree(model.config.vocab_size, 6, rng, TURNS, OBSERVATION, PROMPT) for _ in range(2)]
    ok = True
    for dtype, tolerance in (("float32", 1e-4), ("bfloat16", 5e-2)):
        lp_tree, g_tree = log_probs_and_grads(model, trees, "tree", dtype)
        lp_path, g_path = log_probs_and_grads(model, trees, "path", dtype)
        difference = (lp_tree - lp_path).abs().max().item()
        relative = ((g_tree - g_path).norm() / g_path.norm()).item()
        finite = bool(torch.isfinite(g_tree).all() and torch.isfinite(g_path).all())
        ok &= say(f"packed = path-by-path, {dtype}", finite and difference <= tolerance and relative <= tolerance,
                  f"log-prob max diff {difference:.2e}, gradient rel diff {relative:.2e} (tolerance {tolerance:g}), finite {finite}")
    if device.type != "cuda":
        return ok
    backends = {"efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 448, 32, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(448, 448, dtype=torch.bool, device=device).tril().repeat(2, 1, 1, 1)  # 448 = 3 x 128 + 64
    mask[1, :, :, 400:] = False  # a padded row, as transformers masks one
    for name, backend in backends.items():
        q.grad = k.grad = v.grad = None
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).float().square().sum().backward()
            finite = all(torch.isfinite(t.grad).all().item() for t in (q, k, v))
            figure = f"gradients finite: {finite}"
        except RuntimeError as err:  # a backend that cannot run this shape
            finite, figure = None, f"not available ({str(err)[:80]})"
        ok &= say(f"boolean-masked SDPA backward, bf16, length 448, {name}", finite if name != "cudnn" else None, figure)
    return ok


def update_memory(device: torch.device) -> bool:
    """Check 2."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    import learner
    import train
    from learner import TREE_ATTENTION, register_tree_attention
    from memory import GIB, RECIPE, training_memory

    try:
        import bitsandbytes  # noqa: F401

        optimizer_kind = RECIPE["optimizer"]
    except ImportError:
        optimizer_kind = "adamw"  # no bitsandbytes here: float32 AdamW, against its own prediction
    register_tree_attention()
    config = Qwen3Config(**QWEN3_4B, attn_implementation=TREE_ATTENTION)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    parameters = sum(p.numel() for p in model.parameters())
    rng = random.Random(1)
    tree = random_tree(config.vocab_size, 40, rng, [300, 300, 300], 400, 600)
    args = train.Args(dtype=RECIPE["dtype"], gradient_checkpointing="on" if RECIPE["checkpointing"] else "off",
                      micro_batch_tokens=RECIPE["micro_batch_tokens"], logprob_chunk=RECIPE["logprob_chunk"],
                      optimizer=optimizer_kind, demo_coef=0.0, log_kl_to_start="off", lr=1e-6)
    rows, _ = train.training_rows([tree], args)
    optimizer = learner.adamw(model.parameters(), args.lr, optimizer_kind)
    train.update(model, None, optimizer, rows, [tree], [], None, 0, rng, args)  # the first: the optimizer state appears
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    losses = train.update(model, None, optimizer, rows, [tree], [], None, 0, rng, args)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    plan = training_memory(parameters, config.num_hidden_layers, config.hidden_size, config.vocab_size,
                           **{**RECIPE, "optimizer": optimizer_kind})["update"]
    predicted = sum(plan.values())
    units = len(learner.micro_batches([rows], [tree], args))
    return say(f"Qwen3-4B-sized update, steady state ({optimizer_kind}, {units} units of <= {args.micro_batch_tokens} tokens)",
               units >= 2 and peak <= predicted and losses["losses/skipped_updates"] == 0,
               f"peak {peak / GIB:.1f} GiB, predicted {predicted / GIB:.1f} GiB, {time.time() - start:.0f} s, "
               f"grad norm {losses['losses/grad_norm']:.3g}")


def small_model_folder(folder: Path) -> None:
    """A Qwen3-shaped model with random weights and a 4,096-token byte-level BPE trained on the default corpus, with a
    ChatML template: a model folder as train.py takes one, made here with nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    from envs import DEFAULT_TASK_DIR, INSTRUCTION, read_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    texts = [INSTRUCTION] + [doc["contents"] for doc in read_corpus(DEFAULT_TASK_DIR / "corpus.jsonl")]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer.save_pretrained(folder)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def transformers_train_steps(device: torch.device) -> bool:
    """Check 3 (on the CPU too, where train.py then runs there)."""
    import importlib.util

    from tests.test_checks import server_refusing_topk_above

    optimizer = "adamw8bit" if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") else "adamw"
    with tempfile.TemporaryDirectory() as out, server_refusing_topk_above(10) as url:
        small_model_folder(Path(out) / "model")
        # random weights give every leaf reward 0: uniform trees kept, a KL term so that every update runs
        proc = subprocess.run([sys.executable, "train.py", "--engine", "transformers", "--model", f"{out}/model",
                               "--retrieval-url", url, "--total-steps", "2", "--prompts-per-step", "2", "--m", "2", "--l", "1",
                               "--k", "2", "--max-turns", "3", "--max-turn-tokens", "32", "--eval-questions", "2",
                               "--no-drop-uniform-trees", "--kl-coef", "0.01", "--optimizer", optimizer,
                               "--output-dir", f"{out}/run"], cwd=ROOT, capture_output=True, text=True, timeout=400)
        rows = [json.loads(line) for line in Path(f"{out}/run/metrics.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
        steps = [r for r in rows if "losses/policy" in r]
        skipped = sum(r["losses/skipped_updates"] for r in steps)
        tokens = sum(r["charts/generated_tokens"] for r in steps)
        on = "the GPU" if device.type == "cuda" else "the CPU"
        return say(f"train.py --engine transformers, 2 steps on {on} (Qwen3-shaped, {optimizer})",
                   proc.returncode == 0 and len(steps) == 2 and skipped == 0 and tokens > 0 and f"on {on}" in proc.stdout,
                   f"exit {proc.returncode}, {len(steps)} steps, {tokens} tokens generated, {skipped} skipped updates"
                   + ("" if proc.returncode == 0 else f": {(proc.stderr.strip().splitlines() or [''])[-1][:200]}"))


def engine_half() -> bool:
    """Checks 4-7, in child processes (vLLM binds the process it runs in)."""
    ok = True
    for code, count in ((ENGINE_CODE, 2), (BESIDE_TRAINER_CODE, 1)):
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
        print("\n".join(lines), flush=True)
        ok &= proc.returncode == 0 and len(lines) == count and not any(line.startswith("FAIL") for line in lines)
        if proc.returncode != 0:
            say("engine checks", False, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "train.py", "--total-steps", "2", "--eval-questions", "0", "--sft-steps", "2",
                               "--sft-eval-questions", "2", "--save-every", "100", "--output-dir", f"{out}/run"],
                              cwd=ROOT, capture_output=True, text=True, timeout=400)
        steps = [json.loads(line) for line in Path(f"{out}/run/metrics.jsonl").read_text().splitlines()] if proc.returncode == 0 else []
        skipped = sum(r.get("losses/skipped_updates", 0) for r in steps)
        ok &= say("train.py, 2 steps on the default model", proc.returncode == 0 and len(steps) == 2 and skipped == 0,
                  f"exit {proc.returncode}, {len(steps)} steps, {skipped} skipped updates"
                  + ("" if proc.returncode == 0 else f": {proc.stderr.strip().splitlines()[-1][:200]}"))
    return ok


ENGINE_CODE = """
import engine, torch, train
from benchmarks.gpu_check import say
from default_model import default_model_path
from learner import load_policy, token_log_probs
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

path = default_model_path()
tokenizer = AutoTokenizer.from_pretrained(path)
model = load_policy(path, torch.device("cuda"))
rollout_engine = engine.VllmEngine(path, train.Args(dtype="bfloat16", max_length=256))
llm = rollout_engine.llm
ids = tokenizer.encode("<think> I need to look up Mobin Pigubor. </think>\\n<search> Mobin Pigubor </search>")

def gap():
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    served = torch.tensor([lp[t].logprob for t, lp in zip(ids[1:], out.prompt_logprobs[1:])])
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        trained = token_log_probs(model, x, torch.ones_like(x), torch.ones_like(x), 1.0)[0].cpu()
    return (served - trained).abs().max().item()

with torch.no_grad():
    for name, p in model.named_parameters():
        if "layers.3." in name or "embed_tokens" in name:
            p.add_(torch.randn_like(p) * 0.02)
stale = gap()
rollout_engine.push_weights(model)
synced = gap()
say("weight push: vLLM's log-probs = the trainer's (bf16)", synced < 0.05 < stale, f"max gap {synced:.3f} after, {stale:.3f} before")
free = torch.cuda.mem_get_info()[0]
llm.sleep(level=2)
freed = torch.cuda.mem_get_info()[0] - free
rollout_engine.push_weights(model, asleep=True)
back = free - torch.cuda.mem_get_info()[0]
after = gap()
say("sleep (level 2) and wake-up", freed > 0.5 * 2**30 and abs(back) < 0.5 * 2**30 and after < 0.05,
    f"freed {freed / 2**30:.2f} GiB, {back / 2**30:+.2f} GiB against before sleep after waking, max gap {after:.3f}")
"""

BESIDE_TRAINER_CODE = """
import engine, torch, train
from benchmarks.gpu_check import say
from default_model import default_model_path
from memory import MODELS, RECIPE, training_memory
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

path = default_model_path()
kept = training_memory(**MODELS["Qwen3-4B"], **RECIPE)["rollout"]
resident = torch.empty(kept["policy weights (float32)"] + kept["optimizer state (adamw8bit)"], dtype=torch.uint8, device="cuda")
free, total = torch.cuda.mem_get_info()
second = engine.VllmEngine(path, train.Args(dtype="bfloat16", max_length=256))
out = second.llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], SamplingParams(max_tokens=8), use_tqdm=False)[0]
say("engine start beside a resident Qwen3-4B-sized trainer", len(out.outputs[0].token_ids) > 0,
    f"{resident.nbytes / 2**30:.1f} GiB resident, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free at start "
    f"(vLLM's default 0.92 would ask {0.92 * total / 2**30:.1f}), generated {len(out.outputs[0].token_ids)} tokens")
"""


def main() -> None:
    if not torch.cuda.is_available():
        print("no GPU: nothing to check here (benchmarks/gpu_check.py runs on a CUDA GPU)")
        return
    started = time.time()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
    ok = True
    for name, check in (("packed = path-by-path", packed_equals_path), ("Qwen3-4B-sized update", update_memory),
                        ("train.py --engine transformers", transformers_train_steps)):
        try:
            ok &= check(device)
        except Exception as err:  # one FAIL line with the error, and the checks after it still run
            ok &= say(name, False, f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}")
    torch.cuda.empty_cache()
    try:
        import vllm  # noqa: F401
    except ImportError:
        print("SKIP  engine half: vLLM is not installed here")
    else:
        ok &= engine_half()
    print(f"{'all PASS' if ok else 'some FAIL'} in {time.time() - started:.0f} s")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
