"""Classification throughput: training and prediction examples per second for GPT-2 124M and 355M.

Everything runs through posttrain's own classification path, as `posttrain classify` and
`posttrain predict` run it: `train.classify.ClassificationBatches` (batches padded to their longest
example), `models.heads.add_classification_head` + `trainable_parameters` (the freezing policy),
`train.classify.classification_loss` (last-non-pad pooling, cross-entropy per example) through
`train.loop.forward_backward`, gradient clipping and fused AdamW from `train.optim`; prediction is
`train.classify.predict_logits` over length-sorted batches. bf16-mixed autocast on CUDA (fp32 on
CPU), optional `torch.compile` of each block as the loop does it (COMPILE=1), random GPT-2 weights.

Data: synthetic SMS-like texts. Token counts are drawn from a log-normal fitted by eye to the SMS Spam
Collection under GPT-2's tokenizer (median about 20 tokens, long tail; LLMs-from-scratch's longest
training message is 120 tokens), clipped to [2, MAX_LENGTH]; token ids uniform over GPT-2's vocabulary
(speed does not depend on which ids).

One JSON line per (size, trainable policy) for training, and one per size for prediction, timed
after WARMUP steps (batches):
  train: examples_per_s, tokens_per_s (real tokens), step_ms, peak_gib (CUDA), trainable (parameters)
  predict: examples_per_s, tokens_per_s, batch_ms, peak_gib

Env: SIZES=124M,355M (tiny: 2 layers, 64 dims, for a CPU smoke run), TRAINABLE=last-k,all (head |
last-k | all; LAST_K=1), BATCH=8 (the seed setting), EVAL_BATCH=64, N_EX=2000, MAX_LENGTH=256,
STEPS (default: one epoch of N_EX), WARMUP=10, COMPILE=0|1, PRECISION=auto, DEVICE=auto.

CPU smoke check (repository root):
    SIZES=tiny N_EX=64 STEPS=4 WARMUP=1 python benchmarks/classify_throughput.py

On the GPU machine (the `run` tool; torch, numpy, pyyaml, tqdm and safetensors are there, PYTHONPATH=src
stands in for installing the package):
    PYTHONPATH=src SIZES=124M,355M python3 benchmarks/classify_throughput.py
    PYTHONPATH=src SIZES=124M,355M BATCH=32 COMPILE=1 python3 benchmarks/classify_throughput.py
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from posttrain.models.gpt2 import GPT2, GPT2Config
from posttrain.models.heads import add_classification_head, trainable_parameters
from posttrain.train.classify import ClassificationBatches, classification_loss, predict_logits
from posttrain.train.loop import _autocast, _compile_blocks, _resolve_precision, forward_backward
from posttrain.train.losses import count_units
from posttrain.train.optim import build_optimizer, param_groups

from common import GPT2_SIZES, PAD_ID, bench_device, env_int, env_list, machine_name, print_guarded


def sms_like(n: int, max_length: int, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
    """n token-id arrays with SMS-like lengths, and balanced 0/1 labels."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(mean=np.log(20), sigma=0.65, size=n)), 2, max_length).astype(int)
    return [rng.integers(0, 50257, size=k) for k in lengths], [i % 2 for i in range(n)]


def build(size: str, max_length: int, device: torch.device, precision: str) -> GPT2:
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_positions=max(max_length, 1024), **GPT2_SIZES[size]))
    add_classification_head(model, 2)
    model.to(device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def bench_train(size: str, policy: str, ids, labels, device: torch.device) -> dict:
    batch_size, max_length = env_int("BATCH", 8), env_int("MAX_LENGTH", 256)
    precision = _resolve_precision(os.environ.get("PRECISION", "auto"), device)
    autocast = _autocast(precision, device)
    model = build(size, max_length, device, precision)
    params = trainable_parameters(model, policy, env_int("LAST_K", 1))
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)  # as the loop freezes them
    optimizer = build_optimizer(param_groups(model, 0.1, params), lr=5e-5)
    if os.environ.get("COMPILE", "0") not in ("", "0", "false"):
        _compile_blocks(model)
    loss_fn = classification_loss("last-nonpad")
    batches = ClassificationBatches(ids, labels, batch_size, PAD_ID, shuffle=True, seed=0)
    order = batches.batch_order(0)
    total = min(env_int("STEPS", len(order)), len(order))
    warmup = min(env_int("WARMUP", 10), total - 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    examples = tokens = 0
    for step, idx in enumerate(order[:total]):
        if step == warmup:  # compile and allocator warm-up stay out of the timing
            sync(device)
            started, examples, tokens = time.perf_counter(), 0, 0
        batch = batches.collate(idx)
        units = count_units(loss_fn, batch)
        forward_backward(model, [batch], loss_fn, units, device, autocast)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        examples += units
        tokens += int(batch["attention_mask"].sum())
    sync(device)
    seconds = time.perf_counter() - started
    steps = total - warmup
    return {"bench": "train", "size": size, "trainable": policy, "trainable_params": sum(p.numel() for p in params),
            "batch": batch_size, "steps": steps, "examples_per_s": round(examples / seconds, 1),
            "tokens_per_s": round(tokens / seconds), "step_ms": round(1000 * seconds / steps, 2),
            "peak_gib": peak_gib(device), "precision": precision}


def bench_predict(size: str, ids, device: torch.device) -> dict:
    batch_size, max_length = env_int("EVAL_BATCH", 64), env_int("MAX_LENGTH", 256)
    precision = _resolve_precision(os.environ.get("PRECISION", "auto"), device)
    autocast = _autocast(precision, device)
    model = build(size, max_length, device, precision).eval()
    warm = ClassificationBatches(ids[:batch_size * 2], None, batch_size, PAD_ID, by_length=True)
    predict_logits(model, warm, "last-nonpad", device, autocast)  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = ClassificationBatches(ids, None, batch_size, PAD_ID, by_length=True)
    sync(device)
    started = time.perf_counter()
    logits = predict_logits(model, batches, "last-nonpad", device, autocast)  # includes the copy to the CPU
    sync(device)
    seconds = time.perf_counter() - started
    assert logits.shape == (len(ids), 2)
    return {"bench": "predict", "size": size, "batch": batch_size, "examples": len(ids),
            "examples_per_s": round(len(ids) / seconds, 1), "tokens_per_s": round(sum(map(len, ids)) / seconds),
            "batch_ms": round(1000 * seconds / len(batches), 2), "peak_gib": peak_gib(device), "precision": precision}


def main() -> None:
    device = bench_device()
    ids, labels = sms_like(env_int("N_EX", 2000), env_int("MAX_LENGTH", 256))
    print(json.dumps({"device": machine_name(device), "torch": torch.__version__, "examples": len(ids),
                      "mean_tokens": round(float(np.mean([len(x) for x in ids])), 1)}), flush=True)
    for size in env_list("SIZES", "124M,355M"):
        for policy in env_list("TRAINABLE", "last-k,all"):
            print_guarded(lambda: bench_train(size, policy, ids, labels, device), device, size=size, trainable=policy)
        print_guarded(lambda: bench_predict(size, ids, device), device, size=size, trainable="predict")


if __name__ == "__main__":
    main()
