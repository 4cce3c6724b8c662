"""Preference tuning (DPO, IPO, hinge, SimPO, ORPO): pairs -> batches -> the shared loop -> a run directory.

`dpo(...)`'s typed signature and docstring are the `posttrain dpo` command:

    posttrain dpo --model runs/my-sft --data.path prefs.json --loss.type sigmoid --loss.beta 0.1

The pieces, usable on their own:

- `sequence_logps(model, batch)`: summed log-probs of every response in a batch (chosen and
  rejected in one forward pass; prompt and padding masked; packed rows allowed) and token counts.
- `reference_logps(model, batches, n_pairs)`: the reference model's summed log-probs of every pair,
  computed once. With LoRA the reference is the base model: call it under peft's
  `with model.disable_adapter(): ...` and no second copy of the weights is needed.
- `cached_reference_logps(...)`: the same, stored on disk under a hash of (model weights, tokenized
  data, prompt style, max length, precision), so a second run on the same start skips it.
- `preference_loss_fn(config, reference)`: the loop's loss function (train/losses.py contract; a
  unit is a pair). The reference log-probs come from the batch (cached), from a frozen model kept in
  memory, or from any callable `reference(batch) -> (2P,) summed log-probs`.

Metrics (TRL's names; the loop adds `val_` for validation): loss, rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (ORPO also
nll_loss, log_odds_ratio, log_odds_chosen). Rewards are beta-scaled as in TRL:
beta * (log pi - log ref); LLMs-from-scratch logs the log-ratios without beta (multiply its
margins by beta to compare). The run directory holds plots of the loss, margins and accuracies
against steps, and sample answers to validation prompts at every evaluation (a collapsing model
shows there first).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain.data.preferences import PAIR_MODES, PAIR_OVERLONG, PairLoader, PreferencePairs, prepare_preference_data
from posttrain.data.sources import DEFAULT_SPLIT, cache_dir
from posttrain.generate import saved_style
from posttrain.lora import (LoraConfig, adapters_disabled, apply_lora, base_model_reference, check_lora,
                            new_tokens_error, trainable_parameters)
from posttrain.models.registry import OFFLINE_DEFAULT
from posttrain.prompts import STYLES, resize_model_for_tokenizer
from posttrain.runlog import METRICS_FILE, read_jsonl, write_config
from posttrain.train.loop import TrainConfig, _autocast, _resolve_precision, train
from posttrain.train.losses import IGNORE_INDEX, LossFn, LossOutput, counts
from posttrain.train.preference_losses import (AVERAGES_BY_DEFAULT, LOSSES, REFERENCE_FREE_LOSSES, log_odds_ratio,
                                               preference_loss, reward_metrics)
from posttrain.weights.checkpoint import atomic_write

# The command's own needs (model loading, sampling, saving) are imported where it runs, so that the
# pieces above import with torch, numpy, tokenizers, safetensors, pyyaml and tqdm alone (the GPU
# machine's benchmarks/dpo_throughput.py).

REFERENCE_MODES = ("cached", "memory")
REFERENCE_CACHE_VERSION = 1  # bump when what the cache stores changes


@dataclass
class PreferenceDataConfig:
    """Preference data, prompt style and batching.

    Attributes:
        path: preference file/folder, http(s) URL or hub dataset id (required)
        style: auto: the style the model was trained with (posttrain.json), else template (tokenizer
            has a chat template), else alpaca
        max_length: tokens per sequence (prompt + one response)
        batching: padding (one sequence per row) | packed (pairs share rows)
        batch_size: pairs per micro-batch
        val_path: separate validation file (then `path` is all training data)
        test_path: separate test file
        split: train, test, val fractions, in order
        shuffle: shuffle records before splitting
        seed: seed of the split shuffle and of the batch order
        overlong: truncate (cut responses) | drop (drop the pair); both counted
        skip_invalid: count and skip bad records (missing/empty fields, prompts over max_length)
        cache: tokenized pairs and reference log-probs cached on disk
    """
    path: str | None = None
    style: str = "auto"
    max_length: int = 1024
    batching: str = "padding"
    batch_size: int = 8
    val_path: str | None = None
    test_path: str | None = None
    split: tuple[float, float, float] = DEFAULT_SPLIT
    shuffle: bool = False
    seed: int = 0
    overlong: str = "truncate"
    skip_invalid: bool = False
    cache: bool = True


@dataclass
class PreferenceLossConfig:
    """Which preference loss, and its hyper-parameters.

    Attributes:
        type: sigmoid (DPO) | ipo | hinge | simpo | orpo (the last two: no reference)
        beta: DPO/hinge beta, IPO tau, SimPO beta (paper: 2-2.5), ORPO lambda
        label_smoothing: cDPO / SimPO: assumed share of flipped labels
        gamma: SimPO target reward margin
        average_logps: per-token mean of response log-probs instead of the sum; None: the loss's own
            (sum: sigmoid, hinge; mean: ipo, simpo, orpo)
    """
    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    average_logps: bool | None = None


@dataclass
class ReferenceConfig:
    """Where the reference log-probs come from.

    Attributes:
        mode: cached: log-probs computed once before training (only the policy in memory) | memory:
            a frozen copy of the model beside the policy
        model: reference model (default: the model training starts from)
    """
    mode: str = "cached"
    model: str | None = None


@dataclass
class PreferenceSampleConfig:
    """Sample generations at each evaluation (collapse shows early).

    Attributes:
        prompts: val prompts answered at each evaluation (samples.jsonl)
        max_new_tokens: most tokens of each sample answer
    """
    prompts: int = 3
    max_new_tokens: int = 64


def dpo_train_config() -> TrainConfig:
    """DPO's usual optimizer settings (lr 5e-6) and a step-0 evaluation as the baseline."""
    return TrainConfig(lr=5e-6, weight_decay=0.0, schedule="constant", eval_on_start=True)


# ----------------------------------------------------------------------------------------------
# Log-probs

def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums, counts), each (2P,): summed log-probs of each sequence's response tokens and how many
    there are; sequence j < P is the chosen response of the batch's pair j, P + j its rejected one.

    One forward pass over every row; the LM head runs only at response positions (as sft_loss);
    log-softmax in fp32.
    """
    P = batch["pair_ids"].numel()
    hidden = model.hidden(batch["input_ids"], position_ids=batch.get("position_ids"),
                          document_ids=batch.get("document_ids"))  # (R, T, C)
    targets = batch["targets"]
    mask = targets != IGNORE_INDEX  # (R, T)
    logits = model.lm_head(hidden[mask]).float()  # (N, V)
    token_logps = -F.cross_entropy(logits, targets[mask], reduction="none")  # (N,)
    seq = batch["sequence_ids"][mask]  # (N,) which sequence each target belongs to
    sums = torch.zeros(2 * P, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)
    n = torch.bincount(seq, minlength=2 * P)
    return sums, n


@torch.no_grad()
def reference_logps(model: nn.Module, batches: Iterable[dict], n_pairs: int, device: torch.device | str = "cpu",
                    autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """(n_pairs, 2) float32: summed log-probs of each pair's (chosen, rejected) response under `model`.

    `batches` must cover every pair once (e.g. `PairLoader.epoch(0)`); each batch's `pair_ids` says
    where its rows go. The model runs in eval mode; its mode is restored afterwards. LoRA: call this
    under `with model.disable_adapter():` to get the base model's log-probs.
    """
    device = torch.device(device)
    out = torch.full((n_pairs, 2), float("nan"), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with (autocast or contextlib.nullcontext)():
                sums, _ = sequence_logps(model, batch)
            P = batch["pair_ids"].numel()
            out[batch["pair_ids"].cpu()] = torch.stack([sums[:P], sums[P:]], dim=1).float().cpu()
    finally:
        model.train(was_training)
    if torch.isnan(out).any():
        missing = torch.isnan(out).any(dim=1).nonzero().flatten()[:5].tolist()
        raise ValueError(f"the batches left out {int(torch.isnan(out).any(dim=1).sum())} of {n_pairs} pairs "
                         f"(e.g. {missing}); give reference_logps every pair (a loader's epoch(0))")
    return out


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer (names, dtypes, shapes, bytes): equal iff the weights are."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def pairs_fingerprint(pairs: PreferencePairs) -> str:
    """sha256 of the tokenized pairs (ids, response masks, boundaries): covers data, tokenizer, style
    and max length as they reached the model."""
    h = hashlib.sha256()
    for array in (pairs.sequences.ids, pairs.sequences.trainable, pairs.sequences.offsets):
        h.update(str(array.dtype).encode())
        h.update(array.tobytes())
    return h.hexdigest()


def reference_cache_key(model: nn.Module | str, pairs: PreferencePairs, style: str, max_length: int, precision: str,
                        device_type: str) -> str:
    """The cache file name: a hash of the model's weights (or its fingerprint), the tokenized pairs, the
    prompt style, max length, precision and device type (numerics differ slightly between them)."""
    model = model if isinstance(model, str) else model_fingerprint(model)
    key = {"v": REFERENCE_CACHE_VERSION, "model": model, "data": pairs_fingerprint(pairs),
           "style": style, "max_length": max_length, "precision": precision, "device": device_type}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def cached_reference_logps(model: nn.Module, loader: PairLoader, style: str, max_length: int,
                           device: torch.device, precision: str = "fp32", cache: str | Path | bool | None = True,
                           fingerprint: str | None = None) -> tuple[torch.Tensor, Path | None, bool]:
    """The reference log-probs of every pair in `loader`, from the disk cache or computed now and stored.

    Returns (logps (N, 2), cache file or None, whether it was read from the cache). `cache`: True
    (posttrain's cache folder, reference_logps/), a folder, or False/None (compute, store nothing).
    `fingerprint`: model_fingerprint(model) when the caller has it (hashing 135M weights takes a second).
    """
    folder = None if cache is None or cache is False else (cache_dir("reference_logps") if cache is True
                                                             else Path(cache))
    path = None
    if folder is not None:
        key = reference_cache_key(fingerprint or model, loader.pairs, style, max_length, precision, device.type)
        path = folder / f"{key}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file
            try:
                logps = load_file(str(path))["logps"]
                if logps.shape == (len(loader.pairs), 2):
                    return logps, path, True
            except Exception:  # a torn or foreign file: compute again and overwrite it
                pass
    loader_reference, loader.reference_logps = loader.reference_logps, None
    try:
        logps = reference_logps(model, loader.epoch(0), len(loader.pairs), device, _autocast(precision, device))
    finally:
        loader.reference_logps = loader_reference
    if path is not None:
        from safetensors.torch import save_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"logps": logps.contiguous()}, tmp)
            os.replace(tmp, path)  # readers see the whole file or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return logps, path, False


# ----------------------------------------------------------------------------------------------
# The loss function for the loop

Reference = nn.Module | Callable[[dict], torch.Tensor] | None


def preference_loss_fn(config: PreferenceLossConfig, reference: Reference = None) -> LossFn:
    """The loop's loss function for `config`: (sum of per-pair losses, pairs, metric sums).

    Reference log-probs, for the losses that need them: the batch's `reference_logps` when the
    loader carries cached ones; else `reference`, a frozen model (run under no_grad on the same
    batch) or a callable batch -> (2P,) summed log-probs (LoRA: the base model with adapters off).
    """
    if config.type not in LOSSES:
        raise ValueError(f"loss.type {config.type!r} is unknown; choose one of {', '.join(LOSSES)}")
    average = AVERAGES_BY_DEFAULT[config.type] if config.average_logps is None else config.average_logps
    needs_reference = config.type not in REFERENCE_FREE_LOSSES

    def reference_sums(batch: dict) -> torch.Tensor:
        if "reference_logps" in batch:
            ref = batch["reference_logps"]  # (P, 2)
            return torch.cat([ref[:, 0], ref[:, 1]])
        if reference is None:
            raise ValueError(f"loss {config.type!r} needs reference log-probs: cache them on the loader "
                             f"(cached_reference_logps) or pass a reference model")
        with torch.no_grad():
            if isinstance(reference, nn.Module):
                return sequence_logps(reference, batch)[0]
            return reference(batch)

    @counts(lambda batch: batch["pair_ids"].numel())
    def loss_fn(model: nn.Module, batch: dict) -> LossOutput:
        P = batch["pair_ids"].numel()
        sums, n = sequence_logps(model, batch)
        scale = n.clamp(min=1).to(sums.dtype) if average else 1.0
        logps = sums / scale
        ref = reference_sums(batch).to(sums.dtype) / scale if needs_reference else None
        losses, chosen_rewards, rejected_rewards = preference_loss(
            config.type, logps[:P], logps[P:], ref[:P] if ref is not None else None,
            ref[P:] if ref is not None else None, config.beta, config.label_smoothing, config.gamma)
        metrics = reward_metrics(chosen_rewards, rejected_rewards, logps[:P], logps[P:])
        if config.type == "orpo":
            odds = log_odds_ratio(logps[:P].detach(), logps[P:].detach())
            metrics.update({"nll_loss": -logps[:P].detach().sum(), "log_odds_ratio": F.logsigmoid(odds).sum(),
                            "log_odds_chosen": odds.sum()})
        return losses.sum(), P, metrics

    return loss_fn


# ----------------------------------------------------------------------------------------------
# The command

def dpo(model: str = OFFLINE_DEFAULT, data: PreferenceDataConfig = PreferenceDataConfig(),
        loss: PreferenceLossConfig = PreferenceLossConfig(), reference: ReferenceConfig = ReferenceConfig(),
        train: TrainConfig = dpo_train_config(), samples: PreferenceSampleConfig = PreferenceSampleConfig(),
        lora: LoraConfig = LoraConfig(), run_dir: str | None = None, runs: str = "runs", name: str | None = None
        ) -> dict:
    """Preference tuning: DPO (sigmoid), IPO, hinge, SimPO or ORPO on pairs of chosen and rejected answers.

    Start from an instruction-tuned model (an SFT run directory works); the reference model's
    log-probs are computed once before training and cached on disk, so only the policy is held in
    memory (--reference.mode memory keeps a frozen copy instead). The validation metrics are logged
    before the first step (step 0) and at every evaluation.

    Args:
        model: preset alias, hub id, local Hugging Face directory, .gguf file or run directory.
        data: preference dataset, prompt style, max length, batching.
        loss: the loss and its parameters (beta, label smoothing, SimPO's gamma, mean or summed log-probs).
        reference: how reference log-probs are obtained (cached or in memory) and from which model.
        train: optimizer, schedule, precision, accumulation, evaluation and checkpoints.
        samples: sample answers to validation prompts at each evaluation.
        lora: LoRA / rsLoRA / DoRA adapters (lora.r > 0; QLoRA: lora.quantize nf4, CUDA). The reference is
            then the base itself with the adapters switched off: no second copy of the weights.
        run_dir: where the run is written (default: RUNS/NAME).
        runs: folder of runs.
        name: run name (default: dpo-<model>-<time>).
    """
    return run_dpo(model, data, loss, reference, train, samples, run_dir, runs, name, lora)


def check_dpo_choices(data: PreferenceDataConfig, loss: PreferenceLossConfig, reference: ReferenceConfig) -> None:
    """Raise ValueError naming the allowed values when an option is not one of them."""
    if not data.path:
        raise ValueError("data.path is required: a preference file (records with chosen and rejected plus "
                         "instruction, prompt or messages); CLI: --data.path FILE")
    choices = [("data.style", data.style, (*STYLES, "auto")), ("data.batching", data.batching, PAIR_MODES),
               ("data.overlong", data.overlong, PAIR_OVERLONG), ("loss.type", loss.type, LOSSES),
               ("reference.mode", reference.mode, REFERENCE_MODES)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{key} {value!r} is unknown; choose one of: {', '.join(allowed)}")
    if loss.beta <= 0:
        raise ValueError(f"loss.beta must be positive, got {loss.beta}")


def resolve_dpo_style(style: str, tokenizer, model: str) -> str:
    """`auto`: the style the model was trained with (a posttrain run's posttrain.json), else the
    tokenizer's chat template, else alpaca."""
    if style != "auto":
        return style
    return saved_style(model) or ("template" if getattr(tokenizer, "chat_template", None) else "alpaca")


def run_dpo(model: str, data: PreferenceDataConfig, loss: PreferenceLossConfig, reference: ReferenceConfig,
            train_config: TrainConfig, samples: PreferenceSampleConfig, run_dir: str | None, runs: str = "runs",
            name: str | None = None, lora: LoraConfig = LoraConfig()) -> dict:
    from posttrain.train.run import check_run_dir, load_capped, resolve_run_dir, train_device
    from posttrain.train.sft import answer, save_model
    from posttrain.weights import load

    run_dir = resolve_run_dir(run_dir, runs, name, "dpo", model)
    device = train_device(train_config.device)
    # Mistakes that need no model to find are reported before minutes of loading and tokenizing.
    check_dpo_choices(data, loss, reference)
    check_lora(lora, device)
    check_run_dir(run_dir, train_config.resume)
    net, tokenizer, data = load_capped(model, data)
    style_name = resolve_dpo_style(data.style, tokenizer, model)
    prefs = prepare_preference_data(data.path, tokenizer, style_name, data.max_length, data.val_path, data.test_path,
                                    tuple(data.split), data.shuffle, data.seed, data.skip_invalid, data.overlong,
                                    cache=data.cache)
    style = prefs.style
    if resize_model_for_tokenizer(net, tokenizer):
        if lora.enabled:  # the new rows would stay untrained (frozen embeddings)
            raise new_tokens_error(style.name)
        print(f"added special tokens for {style.name}; embeddings resized to {net.config.vocab_size}")
    if lora.enabled:  # before the reference: with QLoRA it is the 4-bit base the policy starts from
        net = apply_lora(net, lora, base=model, device=device, seed=train_config.seed)
    if disable_dropout(net):  # config.yaml records it: lora.dropout, as asked, is not what trained
        print("dropout disabled: policy and reference log-probs must be the same function of the weights")
        lora = replace(lora, dropout=0.0) if lora.enabled else lora
    print(f"prompt style {style.name}\n{prefs.summary()}")
    train_batches = PairLoader(prefs.train, data.batching, data.batch_size, data.max_length, tokenizer.pad_id,
                               shuffle=True, seed=data.seed)
    val_batches = (PairLoader(prefs.val, data.batching, data.batch_size, data.max_length, tokenizer.pad_id,
                              shuffle=False) if prefs.val is not None else None)
    print(f"batching {data.batching}: {train_batches.stats}")

    precision = _resolve_precision(train_config.precision, device)
    reference_report: dict = {"mode": None if loss.type in REFERENCE_FREE_LOSSES else reference.mode,
                              "model": reference.model or model}
    reference_net: nn.Module | None = None
    if loss.type not in REFERENCE_FREE_LOSSES:
        if reference.model is not None:
            reference_net, _ = load(reference.model)
            resize_model_for_tokenizer(reference_net, tokenizer)
        if reference.mode == "cached":
            ref = reference_net if reference_net is not None else net
            ref.to(device)
            if precision == "bf16-true":  # the loop trains in bf16 weights: score the reference the same way
                ref.to(torch.bfloat16)
            started = time.perf_counter()
            fingerprint = model_fingerprint(ref) if data.cache else None
            for split, loader in (("train", train_batches), ("val", val_batches)):
                if loader is None:
                    continue
                with adapters_disabled(ref):  # LoRA: the base model (peft's disable_adapter); else as is
                    logps, path, hit = cached_reference_logps(ref, loader, style.name, data.max_length, device,
                                                              precision, data.cache, fingerprint)
                loader.reference_logps = logps
                reference_report[f"{split}_cache"] = str(path) if path else None
                reference_report[f"{split}_cache_hit"] = hit
            print(f"reference log-probs: {reference_report} ({time.perf_counter() - started:.1f} s)")
            reference_net = None  # only the policy stays in memory
        elif reference_net is None and lora.enabled:  # the base itself, adapters switched off: no second copy
            net.to(device)
            reference_net = base_model_reference(net, lambda m, batch: sequence_logps(m, batch)[0])
        else:
            if reference_net is None:
                reference_net = copy.deepcopy(net)
            reference_net.requires_grad_(False)
            reference_net.eval().to(device)
            if precision == "bf16-true":
                reference_net.to(torch.bfloat16)
    loss_fn = preference_loss_fn(loss, reference_net)

    write_config(run_dir, {"task": "dpo", "model": model, "data": {**asdict(data), "style": style.name},
                           "loss": asdict(loss), "reference": asdict(reference), "train": asdict(train_config),
                           "samples": asdict(samples), "lora": asdict(lora), "data_report": prefs.report,
                           "reference_report": reference_report})
    sample_pairs = prefs.val if prefs.val is not None else prefs.train
    sample_prompts = sample_pairs.prompts[:samples.prompts]
    sample_refs = sample_pairs.references[:samples.prompts]

    def sample_fn(m, step):
        rows = answer(m, tokenizer, style, sample_prompts, samples.max_new_tokens)
        return [{**row, "chosen": ref} for row, ref in zip(rows, sample_refs)]

    def save_final(m, path):
        save_model(m, tokenizer, style, path)

    summary: dict = {"run_dir": str(run_dir)}
    summary.update(train(net, train_config, train_batches, loss_fn, run_dir, val_data=val_batches,
                         sample_fn=sample_fn if sample_prompts else None, save_final=save_final,
                         trainable_params=trainable_parameters(net) if lora.enabled else None))
    before = [r for r in read_jsonl(run_dir / METRICS_FILE) if r.get("step") == 0]
    if before:
        summary["val_before"] = {k: v for k, v in before[0].items() if k.startswith("val_")}
    summary["reference"] = reference_report
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    print_comparison(summary)
    print(f"run: {run_dir}  (plots: {run_dir / 'plots'}, model: {run_dir / 'model'})")
    return summary


def disable_dropout(net: nn.Module) -> int:
    """Switch every dropout off (LoRA's included), as TRL's DPOTrainer does by default: with dropout
    the policy's log-probs are noisy where the reference's are not, so the step-0 loss is not log 2
    and rewards/margins carry noise. Returns how many dropout layers were on."""
    switched = 0
    for module in net.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            switched += 1
    return switched


def print_comparison(summary: dict) -> None:
    """Validation metrics before (step 0) and after training, side by side."""
    before, after = summary.get("val_before") or {}, summary.get("val") or {}
    keys = [k for k in ("val_loss", "val_rewards/accuracies", "val_rewards/margins", "val_rewards/chosen",
                        "val_rewards/rejected", "val_logps/chosen", "val_logps/rejected") if k in after]
    for k in keys:
        was = f"{before[k]:.4f}" if k in before else "-"
        print(f"{k:<24} before {was:>10}  after {after[k]:.4f}")
