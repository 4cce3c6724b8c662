"""Correctness on the GPU before any figure is believed: what the CPU test suite cannot reach.

The tests run on a CPU, where packed rows go through SDPA with a dense mask, nothing is compiled
with inductor, and bf16 is emulated. On CUDA the training path differs: FlexAttention's compiled
kernel and its compiled block mask, inductor-compiled blocks, bf16 matrix units, TF32-free fp32,
bitsandbytes' 4-bit kernels. Each check compares that path with a reference computed on the same
device, draws fresh random inputs, and prints one JSON line:

  {"check": NAME, "ok": true|false|null, ...measurements}     (null: skipped, with "skipped": why)

Errors are relative: ||got - ref|| / ||ref|| over the whole tensor (a loss, logits, every gradient).
Thresholds: fp32 1e-4 (1e-3 where a compiled kernel reorders sums), bf16 3e-2.

    python benchmarks/cuda_checks.py                   # DEVICE=auto: CUDA when there is one
    DEVICE=cpu python benchmarks/cuda_checks.py        # what runs on a CPU (CUDA-only checks skip)
    CHECKS=flex_vs_sdpa,compiled_flex python benchmarks/cuda_checks.py
"""

from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from posttrain.data.batching import BatchLoader, pad_examples
from posttrain.data.tokenize import TokenizedDataset
from posttrain.models.attention import ATTENTION_ENV
from posttrain.models.gpt2 import GPT2Config
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import build_model
from posttrain.train.linear_cross_entropy import linear_cross_entropy
from posttrain.train.loop import _checkpoint_blocks, _compile_blocks
from posttrain.train.losses import IGNORE_INDEX, sft_loss

from common import bench_device, env_list

FP32_TOL, COMPILED_FP32_TOL, BF16_TOL = 1e-4, 1e-3, 3e-2
CHECKS = {}
# Row length, model width and head tokens: the GPU's sizes, or a CPU's (set by main).
SIZE = {"row": 1024, "dim": 256, "head_tokens": 4096, "head_dim": 768}
CPU_SIZE = {"row": 128, "dim": 64, "head_tokens": 128, "head_dim": 64}


def check(cuda_only: bool = False):
    def register(fn):
        fn.cuda_only = cuda_only
        CHECKS[fn.__name__] = fn
        return fn
    return register


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


@contextmanager
def attention(backend: str):
    previous = os.environ.get(ATTENTION_ENV)
    os.environ[ATTENTION_ENV] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ATTENTION_ENV, None)
        else:
            os.environ[ATTENTION_ENV] = previous


def model_of(kind: str, device, seed: int = 0, **size):
    torch.manual_seed(seed)
    if kind == "gpt2":
        config = GPT2Config(n_layer=size.get("layers", 4), n_embd=size.get("dim", SIZE["dim"]), n_head=8,
                            n_positions=1024, vocab_size=size.get("vocab", 50257))
    else:
        dim = size.get("dim", SIZE["dim"])
        config = LlamaConfig(vocab_size=size.get("vocab", 49152), hidden_size=dim,
                             intermediate_size=4 * dim, num_hidden_layers=size.get("layers", 4),
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    return build_model(config).to(device).train()


def packed_loader(n_examples: int, max_length: int, mode: str, seed: int, vocab: int = 50000,
                  batch_size: int = 4) -> BatchLoader:
    """Examples of Alpaca-like lengths (prompt untrained), packed into rows of max_length."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n_examples):
        prompt = int(np.clip(rng.lognormal(np.log(55), 0.6), 8, 300))
        reply = int(np.clip(rng.lognormal(np.log(130), 0.8), 4, max_length - prompt))
        examples.append((rng.integers(0, vocab, prompt + reply).tolist(), [False] * prompt + [True] * reply))
    return BatchLoader(TokenizedDataset.from_examples(examples), mode=mode, batch_size=batch_size,
                       max_length=max_length, pad_id=0, shuffle=False)


def to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def loss_and_grads(model, batch, autocast_dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(batch["input_ids"].device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        loss, n, _ = sft_loss(model, batch)
    (loss / n).backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    return (loss / n).detach().float(), grads


@check(cuda_only=True)
def flex_vs_sdpa(device):
    """Packed rows: compiled FlexAttention with its block mask against SDPA with a dense mask."""
    out = {}
    for kind in ("gpt2", "llama"):
        model = model_of(kind, device)
        batch = to(next(iter(packed_loader(64, SIZE["row"], "concat", seed=1, vocab=model.config.vocab_size))), device)
        for dtype, tol in ((None, COMPILED_FP32_TOL), (torch.bfloat16, BF16_TOL)):
            with attention("sdpa"):
                ref_loss, ref_grads = loss_and_grads(model, batch, dtype)
            with attention("flex"):
                loss, grads = loss_and_grads(model, batch, dtype)
            name = f"{kind}_{'bf16' if dtype else 'fp32'}"
            out[name] = {"loss": rel_err(loss, ref_loss), "grads": rel_err(grads, ref_grads), "tol": tol}
    ok = all(v["loss"] <= v["tol"] and v["grads"] <= v["tol"] for v in out.values())
    return ok, out


@check()
def packed_equals_one_by_one(device):
    """Per-example loss of packed rows (the device's default attention) against each example alone."""
    model = model_of("gpt2", device)
    loader = packed_loader(24, SIZE["row"], "concat", seed=2, vocab=model.config.vocab_size)
    rows = loader.rows
    worst = 0.0
    for r in range(min(len(rows), 3)):
        batch = to(loader.collate(np.array([r])), device)
        with torch.no_grad():
            hidden = model.hidden(batch["input_ids"], batch["position_ids"], batch["document_ids"])
            token_loss = F.cross_entropy(model.lm_head(hidden[0]).float(), batch["targets"][0],
                                         ignore_index=IGNORE_INDEX, reduction="none")
        for example, start, _, length in rows.segments[r]:
            ids, trainable = loader.dataset[example]
            alone = to(pad_examples([(ids, trainable)], pad_id=0), device)
            with torch.no_grad():
                ref = F.cross_entropy(model(alone["input_ids"])[0].float(), alone["targets"][0],
                                      ignore_index=IGNORE_INDEX, reduction="sum")
            got = token_loss[start:start + length].sum()
            worst = max(worst, rel_err(got, ref))
    return worst <= FP32_TOL, {"worst_rel_err": worst, "tol": FP32_TOL}


@check()
def parity_with_transformers(device):
    """Native GPT-2 and Llama logits against transformers' models with the same weights, fp32."""
    from transformers import GPT2Config as HFGPT2Config, GPT2LMHeadModel, LlamaConfig as HFLlamaConfig, \
        LlamaForCausalLM

    from posttrain.models.gpt2 import CONV1D_SUFFIXES
    from posttrain.models.registry import config_from_hf

    out = {}
    torch.manual_seed(0)
    hf_gpt2 = GPT2LMHeadModel(HFGPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=256))
    hf_llama = LlamaForCausalLM(HFLlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256))
    for name, hf in (("gpt2", hf_gpt2), ("llama", hf_llama)):
        native = build_model(config_from_hf(hf.config.to_dict()))
        state = {k: v.t() if name == "gpt2" and k.endswith(CONV1D_SUFFIXES) else v
                 for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        native.load_state_dict(state, strict=True)
        hf, native = hf.to(device).eval(), native.to(device).eval()
        x = torch.randint(0, 1000, (4, 200), device=device)
        with torch.no_grad():
            out[name] = float((hf(x).logits - native(x)).abs().max())
    return all(v <= FP32_TOL for v in out.values()), {"max_abs_diff": out, "tol": FP32_TOL}


@check()
def kv_cache_matches_full_forward(device):
    """Logits of a prefill plus one-token steps through the KV cache equal one full forward, fp32 and bf16."""
    out = {}
    for kind in ("gpt2", "llama"):
        for dtype, tol in ((torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)):
            model = model_of(kind, device, layers=2).eval().to(dtype)
            x = torch.randint(0, 1000, (3, 48), device=device)
            with torch.no_grad():
                full = model(x).float()
                cache = model.new_cache(3, 48)
                steps = [model(x[:, :32], cache=cache)]
                steps += [model(x[:, t:t + 1], cache=cache) for t in range(32, 48)]
            out[f"{kind}_{str(dtype)[6:]}"] = {"rel_err": rel_err(torch.cat(steps, 1).float(), full), "tol": tol}
    return all(v["rel_err"] <= v["tol"] for v in out.values()), out


@check(cuda_only=True)
def compiled_flex_training(device):
    """Compiled blocks + FlexAttention, bf16: the same loss and gradients as eager SDPA, and no
    recompilation after the first batch although every batch's document layout differs."""
    from torch._dynamo.utils import counters

    model = model_of("gpt2", device, layers=4)
    eager = model_of("gpt2", device, layers=4)
    batches = [to(b, device) for b, _ in zip(packed_loader(160, SIZE["row"], "concat", seed=3,
                                                           vocab=model.config.vocab_size), range(4))]
    counters.clear()
    _compile_blocks(model)
    errs, compile_s = [], None
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        loss, grads = loss_and_grads(model, batch, torch.bfloat16)
        torch.cuda.synchronize(device)
        if i == 0:
            compile_s, graphs_after_first = time.perf_counter() - t, counters["stats"]["unique_graphs"]
        with attention("sdpa"):
            ref_loss, ref_grads = loss_and_grads(eager, batch, torch.bfloat16)
        errs.append((rel_err(loss, ref_loss), rel_err(grads, ref_grads)))
    recompiled = counters["stats"]["unique_graphs"] - graphs_after_first
    torch._dynamo.reset()
    ok = recompiled == 0 and all(a <= BF16_TOL and b <= BF16_TOL for a, b in errs)
    return ok, {"loss_grad_rel_errs": errs, "graphs_after_first_batch": graphs_after_first,
                "new_graphs_later": recompiled, "first_step_s": round(compile_s, 1), "tol": BF16_TOL}


@check()
def chunked_head_loss(device):
    """linear_cross_entropy against the plain head on GPT-2's vocabulary: error, and peak memory on CUDA."""
    n, c, v = SIZE["head_tokens"], SIZE["head_dim"], 50257
    out = {}
    for dtype, tol in ((None, FP32_TOL), (torch.bfloat16, BF16_TOL)):
        results = []
        for fused in (False, True):
            torch.manual_seed(0)
            hidden = torch.randn(n, c, device=device, requires_grad=True)
            weight = (0.02 * torch.randn(v, c, device=device)).requires_grad_()
            targets = torch.randint(0, v, (n,), device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = (linear_cross_entropy(hidden, weight, targets) if fused else
                        F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum"))
            loss.backward()
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
            results.append((loss.detach(), torch.cat([hidden.grad.flatten(), weight.grad.flatten()]), peak))
        (ref_loss, ref_grads, ref_peak), (loss, grads, peak) = results
        out["bf16" if dtype else "fp32"] = {"loss": rel_err(loss, ref_loss), "grads": rel_err(grads, ref_grads),
                                           "tol": tol, "plain_peak_gib": ref_peak, "chunked_peak_gib": peak}
    return all(v["loss"] <= v["tol"] and v["grads"] <= v["tol"] for v in out.values()), out


@check()
def activation_checkpointing(device):
    """Checkpointed blocks (compiled on CUDA) give the eager gradients; peak memory of both on CUDA."""
    out = {}
    batch = to(next(iter(packed_loader(64, SIZE["row"], "concat", seed=4))), device)
    for checkpointed in (False, True):
        model = model_of("gpt2", device, layers=6)
        if checkpointed:
            _checkpoint_blocks(model)
        if device.type == "cuda":
            _compile_blocks(model)
            loss_and_grads(model, batch, torch.bfloat16)  # compile outside the measurement
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        loss, grads = loss_and_grads(model, batch, torch.bfloat16 if device.type == "cuda" else None)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        out["checkpointed" if checkpointed else "plain"] = (loss, grads, peak)
        torch._dynamo.reset()
    (ref_loss, ref_grads, ref_peak), (loss, grads, peak) = out["plain"], out["checkpointed"]
    tol = BF16_TOL if device.type == "cuda" else FP32_TOL
    errs = {"loss": rel_err(loss, ref_loss), "grads": rel_err(grads, ref_grads), "tol": tol,
            "plain_peak_gib": ref_peak, "checkpointed_peak_gib": peak}
    return errs["loss"] <= tol and errs["grads"] <= tol, errs


@check(cuda_only=True)
def qlora_step(device):
    """QLoRA: the base's linear layers in nf4 (bitsandbytes' CUDA kernels), one step trains the adapters only."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return None, {"skipped": f"bitsandbytes is not installed ({e})"}
    from posttrain.lora import LoraConfig, apply_lora

    model = apply_lora(model_of("llama", device, layers=2, dim=256), LoraConfig(r=8, quantize="nf4"),
                       device=device, seed=0, verbose=False)
    batch = to(next(iter(packed_loader(16, 256, "padding", seed=5, vocab=model.config.vocab_size))), device)
    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, finite_grads = [], True
    for _ in range(2):  # lora_B starts at zero, so lora_A's gradient is zero until after the first step
        loss, grads = loss_and_grads(model, batch, torch.bfloat16)
        losses.append(float(loss))
        finite_grads &= bool(torch.isfinite(grads).all())
        optimizer.step()
    changed = sum(not torch.equal(before[k], p) for k, p in model.named_parameters() if p.requires_grad)
    quantized = sum("4bit" in type(m).__name__ for m in model.modules())
    ok = all(map(np.isfinite, losses)) and finite_grads and changed == len(before) and quantized > 0
    return ok, {"losses": losses, "trainable_tensors": len(before), "changed": changed, "4bit_layers": quantized}


def main() -> None:
    device = bench_device()
    if device.type != "cuda":
        SIZE.update(CPU_SIZE)
    # Cheap checks first, those that compile last: a job cut at its time limit loses the fewest.
    default = ["parity_with_transformers", "kv_cache_matches_full_forward", "chunked_head_loss",
               "packed_equals_one_by_one", "flex_vs_sdpa", "qlora_step", "activation_checkpointing",
               "compiled_flex_training"]
    assert sorted(default) == sorted(CHECKS)
    names = env_list("CHECKS", ",".join(default))
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise SystemExit(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references must be fp32
    torch.backends.cudnn.allow_tf32 = False
    for name in names:
        fn, started = CHECKS[name], time.perf_counter()
        if fn.cuda_only and device.type != "cuda":
            row = {"check": name, "ok": None, "skipped": "needs CUDA"}
        else:
            try:
                ok, details = fn(device)
                row = {"check": name, "ok": ok, **details}
            except Exception as e:  # one broken check must not hide the others
                traceback.print_exc()
                row = {"check": name, "ok": False, "error": repr(e)[:400]}
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row, default=float), flush=True)


if __name__ == "__main__":
    main()
