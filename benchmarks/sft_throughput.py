"""SFT training throughput of posttrain's own pipeline, on the same synthetic data as the TRL peers.

The data are the peers' own: `make_examples(N_EX)` imported from ../shared/bench/peer_sft.py (env
PEER_BENCH_DIR; relative paths are taken from the repository root), Alpaca-like lengths with mean
about 243 tokens, completion-only loss. Each example becomes (ids, trainable = completion_mask) and
goes through posttrain as a training run would: `data.batching.BatchLoader` (padding: batch 16;
packed: rows of 1024, batch 16; concat also accepted), `train.losses.sft_loss` (chunked LM head at target
positions only), `train.loop.forward_backward`, gradient clipping, fused AdamW from
`train.optim`, bf16-mixed autocast on CUDA (fp32 on CPU), optional `torch.compile` of each block as
the loop does it (COMPILE=1), random GPT-2 weights. Batches are collated in the timed loop, so a
slow data pipeline shows up in ms/step (and `collate_ms` says how much of a step it took). On CUDA
packed rows go through FlexAttention with a document-causal block mask (POSTTRAIN_ATTENTION=auto).

One JSON line per (size, mode), timed over the steps after WARMUP:
  tok_per_s         real (non-pad) input tokens per second: the peers' `tok_per_s`
  target_tok_per_s  trained target tokens per second
  step_ms, collate_ms, peak_gib (CUDA), fill (real tokens / slots, BatchLoader.stats)
  mfu               (6 * N * real input tokens + 12 * L * C * P) / step time / 790e12, where N counts
                    the weights of every matrix product (all nn.Linear weights: blocks and LM head; not
                    the embeddings), L layers, C = heads * head dim, and P the query-key pairs that
                    the document-causal mask allows, sum of n (n + 1) / 2 over documents (pads and
                    masked pairs are not counted; 12 = 4 FLOPs per pair and channel forward, x3 with
                    backward). 790 TFLOP/s: the H100's measured bf16 matrix rate (bench/README.md).
                    null on CPU.

Env: SIZES=124M,355M (or tiny: 2 layers, 64 dims, for a CPU smoke run), MODES=padding,packed,
N_EX=4000, BATCH=16, MAX_LENGTH=1024, STEPS (default: one epoch; packed and concat time full
batches only, so a compiled step never meets a new shape), WARMUP=10 (always leaves at least one
timed step), COMPILE=0|1, ACT_CKPT=0|1 (activation checkpointing of every block, as
train.activation_checkpointing), PRECISION=auto (bf16-mixed on CUDA, fp32 on CPU), DEVICE=auto.

CPU smoke check (repository root):
    SIZES=tiny STEPS=3 WARMUP=1 N_EX=200 BATCH=4 python benchmarks/sft_throughput.py

Side by side with the peers on the GPU machine (see ../shared/bench/README.md). Here, once:
    echo /.bench/ >> .git/info/exclude; mkdir -p .bench && cp ../shared/bench/*.py .bench/
    (plus the README's `pip download ... -d .bench trl==1.16.0 ...` and unzip, for the TRL modes)
then with the `run` tool, carry [".bench"], one call each (a call may last 10 minutes):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && GPT2_VOCAB_DIR=.bench SIZES=124M MODES=trl-packing python3 .bench/peer_sft.py
    PYTHONPATH=src PEER_BENCH_DIR=.bench SIZES=124M,355M COMPILE=1 python3 benchmarks/sft_throughput.py
    PYTHONPATH=src PEER_BENCH_DIR=.bench SIZES=124M MODES=packed COMPILE=0 python3 benchmarks/sft_throughput.py
(The GPU machine has torch, numpy, safetensors, pyyaml and tqdm, all that posttrain's data and
training modules import; PYTHONPATH=src stands in for installing the package.)
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

from posttrain.data.batching import BatchLoader
from posttrain.data.tokenize import TokenizedDataset
from posttrain.models.attention import attention_backend
from posttrain.models.gpt2 import GPT2, GPT2Config
from posttrain.train.loop import _autocast, _checkpoint_blocks, _compile_blocks, _resolve_precision, forward_backward
from posttrain.train.losses import count_units, sft_loss
from posttrain.train.optim import build_optimizer, param_groups

from common import GPT2_SIZES, PAD_ID, PEAK_FLOPS, bench_device, env_int, env_list, machine_name, peer_function, print_guarded


def item_counts(loader: BatchLoader) -> tuple[np.ndarray, np.ndarray]:
    """Per batch item (an example in padding mode, a row otherwise): real tokens and allowed
    query-key pairs, sum of n (n + 1) / 2 over its documents."""
    if loader.rows is None:
        n = np.asarray(loader.dataset.lengths, dtype=np.int64)
        return n, n * (n + 1) // 2
    docs = [np.array([seg[3] for seg in segs], dtype=np.int64) for segs in loader.rows.segments]
    return np.array([d.sum() for d in docs]), np.array([(d * (d + 1) // 2).sum() for d in docs])


def run(size: str, mode: str, dataset: TokenizedDataset, device: torch.device) -> dict:
    batch_size, max_length = env_int("BATCH", 16), env_int("MAX_LENGTH", 1024)
    compile_blocks = os.environ.get("COMPILE", "0") not in ("", "0", "false")
    checkpointing = os.environ.get("ACT_CKPT", "0") not in ("", "0", "false")
    precision = _resolve_precision(os.environ.get("PRECISION", "auto"), device)
    autocast = _autocast(precision, device)

    loader = BatchLoader(dataset, mode=mode, batch_size=batch_size, max_length=max_length, pad_id=PAD_ID, seed=0)
    order = loader.batch_order(0)
    if mode != "padding":  # every step one shape: a short last batch would recompile inside the timing
        order = [idx for idx in order if len(idx) == batch_size]
    total = min(env_int("STEPS", len(order)), len(order))
    warmup = min(env_int("WARMUP", 10), total - 1)
    real, pairs = item_counts(loader)

    torch.manual_seed(0)
    config = GPT2Config(n_positions=max_length, **GPT2_SIZES[size])
    model = GPT2(config).to(device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    model.train()
    optimizer = build_optimizer(param_groups(model, 0.1), lr=5e-5)  # fused AdamW on CUDA
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if checkpointing:
        _checkpoint_blocks(model)
    if compile_blocks:
        _compile_blocks(model)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    tokens = targets = flops = 0
    collate_s = 0.0
    for step, idx in enumerate(order[:total]):
        if step == warmup:  # compile and allocator warm-up stay out of the timing
            if cuda:
                torch.cuda.synchronize(device)
            started, tokens, targets, flops, collate_s = time.perf_counter(), 0, 0, 0, 0.0
        t0 = time.perf_counter()
        batch = loader.collate(idx)
        units = count_units(sft_loss, batch)
        collate_s += time.perf_counter() - t0
        loss, _, _ = forward_backward(model, [batch], sft_loss, units, device, autocast)
        loss.item()  # the loop's one host sync per step (its finiteness check)
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_real = int(real[idx].sum())
        tokens, targets = tokens + n_real, targets + units
        flops += 6 * matmul_params * n_real + 12 * config.n_layer * config.n_embd * int(pairs[idx].sum())
    if cuda:
        torch.cuda.synchronize(device)
    seconds, timed = time.perf_counter() - started, total - warmup
    return dict(tool="posttrain", mode=mode, size=size, bs=batch_size,
                max_length=max_length if mode != "padding" else None, steps=timed, warmup=warmup,
                tok_per_s=round(tokens / seconds), target_tok_per_s=round(targets / seconds),
                step_ms=round(1000 * seconds / timed, 1), collate_ms=round(1000 * collate_s / timed, 1),
                peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
                mfu=round(flops / seconds / PEAK_FLOPS, 3) if cuda else None, fill=round(loader.stats["fill"], 3),
                params=sum(p.numel() for p in model.parameters()), compile=compile_blocks,
                activation_checkpointing=checkpointing, precision=precision,
                attention="flex" if cuda and mode != "padding" and attention_backend() != "sdpa" else "sdpa",
                final_loss=round(loss.item(), 4))


def main() -> None:
    device = bench_device()
    n = env_int("N_EX", 4000)
    examples = peer_function("peer_sft.py", "make_examples")(n)
    dataset = TokenizedDataset.from_examples(
        [(e["input_ids"], [bool(f) for f in e["completion_mask"]]) for e in examples])
    total = int(dataset.lengths.sum())
    print(json.dumps(dict(examples=n, tokens=total, mean_len=round(total / n, 1), target_tokens=dataset.num_targets(),
                          device=machine_name(device), torch=torch.__version__, threads=torch.get_num_threads())),
          flush=True)
    for size in env_list("SIZES", "124M,355M"):
        for mode in env_list("MODES", "padding,packed"):
            print_guarded(lambda: run(size, mode, dataset, device), device, size=size, mode=mode)


if __name__ == "__main__":
    main()
