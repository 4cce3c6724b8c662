"""Training-step throughput: native models against transformers' on the same batch.

A step is forward + cross-entropy + backward + AdamW update, random weights (speed does not depend on
them), the same token batch for both implementations, their steps interleaved; the median step
time of each is reported. Prints one JSON line per (model, impl).

    python benchmarks/throughput.py                        # CPU defaults: batch 4 x 256, 5 steps each
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


def make_step(alias: str, impl: str, inputs, targets):
    """One training step of a fresh model (random weights, seed 0) as a closure."""
    torch.manual_seed(0)
    model = build_model(PRESETS[alias].config) if impl == "native" else transformers_model(alias)
    model.to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE == "cuda")
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda")

    def step():
        with autocast:
            logits = logits_of(model, impl, inputs)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(alias: str) -> list[dict]:
    """Both implementations on the same batch, their steps interleaved so that a busy machine slows
    both alike: the ratio is what to compare."""
    vocab = PRESETS[alias].config.vocab_size
    x = torch.randint(0, vocab, (BATCH, SEQ + 1), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:]
    steps = {impl: make_step(alias, impl, inputs, targets) for impl in IMPLS}
    for _ in range(WARMUP):
        for step in steps.values():
            step()
    seconds = {impl: [] for impl in IMPLS}
    for _ in range(STEPS):
        for impl, step in steps.items():
            seconds[impl].append(timed(step))
    rows = []
    for impl in IMPLS:
        median = sorted(seconds[impl])[len(seconds[impl]) // 2]
        rows.append({"model": alias, "impl": impl, "device": DEVICE, "batch": BATCH, "seq": SEQ,
                     "ms_per_step": round(median * 1000, 1), "tokens_per_s": round(BATCH * SEQ / median, 1),
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "machine": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.machine(),
                     "threads": torch.get_num_threads()})
    return rows


if __name__ == "__main__":
    for alias in MODELS:
        for row in bench(alias):
            print(json.dumps(row), flush=True)
