"""Training throughput and peak memory: full fine-tuning vs LoRA vs QLoRA, on the shapes posttrain's
recipes train (GPT-2 medium 355M, SmolLM2-135M, SmolLM2-360M).

Each configuration runs posttrain's own training step on random weights (throughput does not depend on
them) and random tokens: `train.loop.forward_backward` with `train.losses.sft_loss` (every position a
target), gradient clipping and fused AdamW from `train.optim` over the trainable parameters only,
bf16-mixed autocast on CUDA (fp32 on CPU). The modes:
  full    every weight trains (AdamW state for all of them)
  lora    posttrain.lora.apply_lora: rank R adapters on TARGETS (default all-linear), base frozen
  qlora   the same with the base's linear layers in 4-bit NF4 (bitsandbytes, CUDA only), adapters,
          embeddings and norms in bf16; on a CPU it is skipped with a message
One JSON line per (size, mode), timed over the steps after WARMUP:
  tok_per_s        input tokens per second (BATCH x SEQ per step, no padding)
  step_ms          milliseconds per optimizer step
  peak_gib         torch.cuda.max_memory_allocated over the warm-up and timed steps, weights included (CUDA)
  weights_gib      memory allocated by the model before the first step (CUDA): the 4-bit saving shows here
  trainable, params  trainable and total parameters (posttrain.lora.parameter_counts)

Env: SIZES=gpt2-medium,smollm2-135m,smollm2-360m (tiny-gpt2, tiny-llama: 2 layers, 64 dims, for a CPU
smoke run), MODES=full,lora,qlora, BATCH=8, SEQ=1024, STEPS=20, WARMUP=5 (always leaves one timed
step), R=16, ALPHA=32, TARGETS=all-linear, VARIANT=lora, COMPILE=0|1 (torch.compile each block, as the
loop's train.compile does), PRECISION=auto, DEVICE=auto.

CPU smoke check (repository root):
    SIZES=tiny-gpt2,tiny-llama STEPS=3 WARMUP=1 BATCH=2 SEQ=64 python benchmarks/lora_throughput.py

On the GPU machine (it has torch, transformers, accelerate and peft; not bitsandbytes, and it cannot
download). Here, once:
    echo /.bench-lora/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .bench-lora bitsandbytes
then with the `run` tool, carry [".bench-lora"] (a call may last 10 minutes; one size per call is safe):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .bench-lora/*.whl && export PYTHONPATH=/tmp/site:src:$PYTHONPATH && SIZES=gpt2-medium python3 benchmarks/lora_throughput.py
    ... SIZES=smollm2-135m,smollm2-360m python3 benchmarks/lora_throughput.py
(PYTHONPATH=src stands in for installing the package.)
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn as nn

from posttrain.lora import LoraConfig, apply_lora, parameter_counts, require_bitsandbytes, require_cuda_for_qlora
from posttrain.models.gpt2 import GPT2Config
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import PRESETS, build_model
from posttrain.train.loop import _autocast, _compile_blocks, _resolve_precision, forward_backward
from posttrain.train.losses import count_units, sft_loss
from posttrain.train.optim import build_optimizer, param_groups

from common import bench_device, env_int, env_list, machine_name, print_guarded

TINY = {"tiny-gpt2": GPT2Config(vocab_size=512, n_positions=1024, n_embd=64, n_layer=2, n_head=4),
        "tiny-llama": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)}
MODES = ("full", "lora", "qlora")


def model_config(size: str):
    if size in TINY:
        return TINY[size]
    if size not in PRESETS:
        raise SystemExit(f"unknown size {size!r}: use a preset ({', '.join(sorted(PRESETS))}) or {', '.join(TINY)}")
    return PRESETS[size].config


def gib(n_bytes: int) -> float:
    return round(n_bytes / 2**30, 2)


def run(size: str, mode: str, device: torch.device) -> dict:
    batch, seq = env_int("BATCH", 8), env_int("SEQ", 1024)
    steps, warmup = env_int("STEPS", 20), env_int("WARMUP", 5)
    warmup = min(warmup, steps - 1)
    compile_blocks = os.environ.get("COMPILE", "0") not in ("", "0", "false")
    precision = _resolve_precision(os.environ.get("PRECISION", "auto"), device)
    autocast = _autocast(precision, device)
    lora = LoraConfig(r=env_int("R", 16), alpha=float(os.environ.get("ALPHA", "32")), dropout=0.0,
                      targets=os.environ.get("TARGETS", "all-linear"), variant=os.environ.get("VARIANT", "lora"),
                      quantize="nf4" if mode == "qlora" else None)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device) if cuda else 0
    torch.manual_seed(0)
    config = model_config(size)
    with torch.device(device):  # random weights built where they train
        model = build_model(config)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    if mode != "full":
        model = apply_lora(model, lora, base=size, device=device, verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = (torch.cuda.memory_allocated(device) - before) if cuda else 0
    if cuda:  # from here: training (QLoRA's fp32 copy before quantization is not what training needs)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    optimizer = build_optimizer(param_groups(model, 0.0, trainable), lr=1e-4)  # fused AdamW on CUDA
    if compile_blocks:
        _compile_blocks(model)

    g = torch.Generator().manual_seed(0)
    vocab = config.vocab_size
    batches = []
    for _ in range(min(steps, 4)):  # a few distinct batches, reused: data loading is not measured here
        rows = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        batches.append({"input_ids": rows[:, :-1].to(device), "targets": rows[:, 1:].to(device),
                        "position_ids": None, "document_ids": None})
    units = count_units(sft_loss, batches[0])

    for step in range(steps):
        if step == warmup:  # compile and allocator warm-up stay out of the timing
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        loss, _, _ = forward_backward(model, [batches[step % len(batches)]], sft_loss, units, device, autocast)
        loss.item()  # the loop's one host sync per step
        nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    seconds, timed = time.perf_counter() - started, steps - warmup
    n_trainable, n_total = parameter_counts(model)
    return dict(tool="posttrain", size=size, mode=mode, batch=batch, seq=seq, steps=timed, warmup=warmup,
                tok_per_s=round(batch * seq * timed / seconds), step_ms=round(1000 * seconds / timed, 1),
                peak_gib=gib(torch.cuda.max_memory_allocated(device) - before) if cuda else None,
                weights_gib=gib(weights) if cuda else None, trainable=n_trainable, params=n_total,
                lora=None if mode == "full" else dict(r=lora.r, alpha=lora.alpha, targets=lora.targets,
                                                      variant=lora.variant, quantize=lora.quantize),
                precision=precision, compile=compile_blocks, final_loss=round(loss.item(), 4))


def qlora_unavailable(device: torch.device) -> str | None:
    """Why QLoRA cannot run here (posttrain's own error message), or None."""
    try:
        require_cuda_for_qlora(device)
        require_bitsandbytes()
    except (ValueError, ImportError) as e:
        return str(e)
    return None


def main() -> None:
    device = bench_device()
    import peft

    print(json.dumps(dict(device=machine_name(device), torch=torch.__version__, peft=peft.__version__,
                          threads=torch.get_num_threads())), flush=True)
    for size in env_list("SIZES", "gpt2-medium,smollm2-135m,smollm2-360m"):
        for mode in env_list("MODES", ",".join(MODES)):
            why = qlora_unavailable(device) if mode == "qlora" else None
            if why:  # QLoRA needs CUDA and bitsandbytes: say so and go on with the other figures
                print(json.dumps(dict(tool="posttrain", size=size, mode=mode, skipped=why)), flush=True)
                continue
            print_guarded(lambda: run(size, mode, device), device, size=size, mode=mode)


if __name__ == "__main__":
    main()
