"""Training-step throughput: native models against transformers' on the same batch.

A step is forward + cross-entropy + backward + AdamW update, random weights (speed does not depend on
them), the same token batch for both implementations. Prints one JSON line per (model, impl).

    python benchmarks/throughput.py                        # CPU defaults: batch 4 x 256, 5 steps
    DEVICE=cuda BATCH=16 SEQ=1024 STEPS=20 python benchmarks/throughput.py
    MODELS=gpt2,smollm2-135m IMPLS=native,transformers python benchmarks/throughput.py
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch
import torch.nn.functional as F
import transformers

from posttrain.models.registry import PRESETS, build_model

DEVICE = os.environ.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
BATCH, SEQ = int(os.environ.get("BATCH", 4)), int(os.environ.get("SEQ", 256))
STEPS, WARMUP = int(os.environ.get("STEPS", 5)), int(os.environ.get("WARMUP", 2))
MODELS = os.environ.get("MODELS", "gpt2,smollm2-135m").split(",")
IMPLS = os.environ.get("IMPLS", "native,transformers").split(",")


def transformers_model(alias: str) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(**PRESETS[alias].config.to_hf())
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def logits_of(model, impl: str, x: torch.Tensor) -> torch.Tensor:
    return model(x) if impl == "native" else model(input_ids=x).logits


def bench(alias: str, impl: str) -> dict:
    torch.manual_seed(0)
    model = build_model(PRESETS[alias].config) if impl == "native" else transformers_model(alias)
    model.to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    vocab = PRESETS[alias].config.vocab_size
    x = torch.randint(0, vocab, (BATCH, SEQ + 1), device=DEVICE)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")

    def step():
        with autocast:
            logits = logits_of(model, impl, inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / STEPS
    return {"model": alias, "impl": impl, "device": DEVICE, "batch": BATCH, "seq": SEQ,
            "ms_per_step": round(seconds * 1000, 1), "tokens_per_s": round(BATCH * SEQ / seconds, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    for alias in MODELS:
        for impl in IMPLS:
            print(json.dumps(bench(alias, impl)), flush=True)
