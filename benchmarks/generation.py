"""Generation throughput with a KV cache: posttrain's `generate` against transformers' `generate`.

Same random weights in both (copied key for key), the same batch of prompts of different lengths
(left-padded by each library), greedy decoding of exactly NEW tokens per row (EOS disabled in both,
so the work is identical). Prints one JSON line per (model, impl).

    python benchmarks/generation.py                               # CPU: batch 8, 64 new tokens
    DEVICE=cuda BATCH=64 NEW=256 python benchmarks/generation.py
"""

from __future__ import annotations

import json
import os
import platform
import random
import time

import torch
import transformers

from posttrain.generate import GenerationConfig, generate
from posttrain.models.gpt2 import CONV1D_SUFFIXES
from posttrain.models.registry import PRESETS, build_model

DEVICE = os.environ.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
BATCH, NEW = int(os.environ.get("BATCH", 8)), int(os.environ.get("NEW", 64))
PROMPT_MIN, PROMPT_MAX = 16, 64
REPEATS = int(os.environ.get("REPEATS", 2))
MODELS = os.environ.get("MODELS", "gpt2,smollm2-135m").split(",")
IMPLS = os.environ.get("IMPLS", "posttrain,transformers").split(",")
NEVER = -1  # an EOS id no token has: both libraries then generate exactly NEW tokens


class NoEosTokenizer:
    """The least a tokenizer must offer posttrain's generate when only ids matter."""
    eos_id, bos_id, pad_id, stop_ids = NEVER, None, 0, []

    def decode(self, ids, skip_special: bool = True) -> str:
        return " ".join(map(str, ids))


def models_for(alias: str):
    torch.manual_seed(0)
    config = PRESETS[alias].config
    native = build_model(config)
    native.config.eos_token_id = None
    hf_config = transformers.AutoConfig.for_model(**{**config.to_hf(), "eos_token_id": None})
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    state = {k: v.t() if k.endswith(CONV1D_SUFFIXES) else v for k, v in native.state_dict().items()}
    hf.load_state_dict(state, strict=False)
    return native.to(DEVICE, DTYPE).eval(), hf.to(DEVICE, DTYPE).eval()


def prompts_for(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(PROMPT_MIN, PROMPT_MAX))] for _ in range(BATCH)]


def run_posttrain(model, prompts) -> int:
    out = generate(model, NoEosTokenizer(), prompts, GenerationConfig(max_new_tokens=NEW))
    return sum(len(o) for o in out)


@torch.inference_mode()
def run_transformers(model, prompts) -> int:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEVICE)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEVICE)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    return (out.shape[1] - width) * len(prompts)


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def bench(alias: str) -> list[dict]:
    """Both libraries on the same prompts, runs interleaved so that a busy machine slows both alike;
    the best of REPEATS runs after one warm-up each."""
    native, hf = models_for(alias)
    prompts = prompts_for(PRESETS[alias].config.vocab_size)
    runs = {"posttrain": (run_posttrain, native), "transformers": (run_transformers, hf)}
    runs = {impl: runs[impl] for impl in IMPLS}
    best = {impl: float("inf") for impl in runs}
    tokens = {}
    for repeat in range(REPEATS + 1):
        for impl, (fn, model) in runs.items():
            synchronize()
            start = time.perf_counter()
            tokens[impl] = fn(model, prompts)
            synchronize()
            if repeat:  # the first run of each is a warm-up
                best[impl] = min(best[impl], time.perf_counter() - start)
    return [{"model": alias, "impl": impl, "device": DEVICE, "dtype": str(DTYPE), "batch": BATCH,
             "new_tokens": NEW, "seconds": round(best[impl], 2), "tokens_per_s": round(tokens[impl] / best[impl], 1),
             "torch": torch.__version__, "transformers": transformers.__version__,
             "machine": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.machine(),
             "threads": torch.get_num_threads()} for impl in runs]


if __name__ == "__main__":
    for alias in MODELS:
        for row in bench(alias):
            print(json.dumps(row), flush=True)
