"""Peak memory of an SFT training step: the plain LM-head loss against the chunked one
(`train/linear_cross_entropy.py`), each with and without activation checkpointing.

Each variant runs in a fresh process: it builds a GPT-2 of SIZE (random weights), fused AdamW where
there is CUDA, and runs STEPS optimizer steps of `forward_backward` on one packed batch (BATCH rows of
SEQ tokens, documents of Alpaca-like lengths, PROMPT_SHARE of each untrained), as the loop does.
  CUDA: peak = torch.cuda.max_memory_allocated over the steps (weights, gradients, AdamW state and
        activations), bf16-mixed.
  CPU:  peak = the process's maximum resident set size (ru_maxrss), fp32; the variants share
        everything but the step's activations, so their differences are the activations' difference.
One JSON line per variant: head (plain | chunked), activation_checkpointing, peak_gib, step_s (median)
and tok_per_s (real tokens of the batch per second of a step).

    python benchmarks/memory.py                                        # CPU: 124M, 4 x 512
    DEVICE=cuda SIZE=355M BATCH=16 SEQ=1024 python benchmarks/memory.py
Env: SIZE=124M (355M, tiny), BATCH=4, SEQ=512, STEPS=2, PROMPT_SHARE=0.27, VARIANTS=plain,chunked x
CKPT=0,1 (all four by default), DEVICE=auto.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import GPT2_SIZES, bench_device, env_int, env_list, machine_name


def plain_sft_loss(model, batch):
    """The LM head at target positions with one (N, V) logit matrix: what sft_loss did before chunking."""
    from posttrain.train.losses import IGNORE_INDEX
    hidden = model.hidden(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
    mask = batch["targets"] != IGNORE_INDEX
    loss = F.cross_entropy(model.lm_head(hidden[mask]).float(), batch["targets"][mask], reduction="sum")
    return loss, mask.sum(), {}


def packed_batch(batch: int, seq: int, prompt_share: float, seed: int = 0) -> dict:
    """Rows of documents with Alpaca-like lengths; the first prompt_share of each document untrained."""
    from posttrain.data.batching import BatchLoader
    from posttrain.data.tokenize import TokenizedDataset

    rng = np.random.default_rng(seed)
    examples, total = [], 0
    while total < batch * seq * 1.1:
        n = int(np.clip(rng.lognormal(np.log(243), 0.6), 16, seq))
        prompt = max(1, int(prompt_share * n))
        examples.append((rng.integers(0, 50000, n).tolist(), [False] * prompt + [True] * (n - prompt)))
        total += n
    loader = BatchLoader(TokenizedDataset.from_examples(examples), mode="packed", batch_size=batch, max_length=seq,
                         pad_id=0, shuffle=False)
    return next(iter(loader))


def measure(head: str, checkpointing: bool) -> dict:
    from posttrain.models.gpt2 import GPT2, GPT2Config
    from posttrain.train.loop import _autocast, _checkpoint_blocks, _resolve_precision, forward_backward
    from posttrain.train.losses import count_units, sft_loss
    from posttrain.train.optim import build_optimizer, param_groups

    device = bench_device()
    size = os.environ.get("SIZE", "124M")
    batch = packed_batch(env_int("BATCH", 4), env_int("SEQ", 512), float(os.environ.get("PROMPT_SHARE", "0.27")))
    precision = _resolve_precision("auto", device)
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_positions=env_int("SEQ", 512), **GPT2_SIZES[size])).to(device).train()
    if checkpointing:
        _checkpoint_blocks(model)
    optimizer = build_optimizer(param_groups(model, 0.1), lr=1e-4)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_fn = sft_loss if head == "chunked" else plain_sft_loss
    units = count_units(sft_loss, batch)
    times = []
    for _ in range(env_int("STEPS", 2)):
        started = time.perf_counter()
        loss, _, _ = forward_backward(model, [batch], loss_fn, units, device, _autocast(precision, device))
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return dict(tool="posttrain", size=size, head=head, activation_checkpointing=checkpointing,
                batch=env_int("BATCH", 4), seq=env_int("SEQ", 512), target_tokens=units,
                peak_gib=round(peak, 3), peak_kind="cuda allocated" if device.type == "cuda" else "max RSS",
                step_s=round(step_s, 3), tok_per_s=round(batch["num_tokens"] / step_s), loss=round(loss.item(), 4),
                precision=precision, device=machine_name(device))


def main() -> None:
    if len(sys.argv) == 3:  # one variant, in this fresh process
        print(json.dumps(measure(sys.argv[1], sys.argv[2] == "1")), flush=True)
        return
    for head in env_list("VARIANTS", "plain,chunked"):
        for ckpt in env_list("CKPT", "0,1"):
            done = subprocess.run([sys.executable, __file__, head, ckpt], capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("{")), None)
            print(line or json.dumps(dict(tool="posttrain", size=os.environ.get("SIZE", "124M"), head=head,
                                          activation_checkpointing=ckpt == "1",
                                          error=done.stderr.strip()[-400:])), flush=True)


if __name__ == "__main__":
    main()
