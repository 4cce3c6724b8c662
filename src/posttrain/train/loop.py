"""The one training loop shared by SFT, DPO and classification.

A task supplies a batch source and a loss function (see `train/losses.py` for the contract); the
loop owns everything else: AdamW and the schedule, precision, gradient accumulation, clipping,
evaluation, checkpoints, logging and the progress bar.

Normalisation (DESIGN principle 6): the loop gathers the k micro-batches of an optimizer step,
counts their units (target tokens, pairs, examples: what the loss function says it counts) from
the batches alone, then runs forward + backward on each with `loss_sum / units_in_step`. So the
gradient of k accumulated micro-batches equals that of one batch k times the size, while only one
micro-batch's activations are alive at a time.

Batch sources: anything with `len()` (micro-batches per epoch) and `epoch(epoch, start)` (that
epoch's micro-batches from index `start` on, in an order fixed by the epoch: resume depends on it;
`posttrain.data.batching.BatchLoader` is one), or a plain list of batches (same order every
epoch). A batch is a dict of tensors: `input_ids`, `targets` (-100 = not trained), `position_ids`,
`document_ids` for SFT; whatever its loss function reads for other tasks; and optionally
`num_tokens`, its real (non-pad) token count for tokens seen and tokens/s (else every slot counts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.utils.checkpoint

from posttrain.report import plot_run
from posttrain.runlog import RunLog
from posttrain.train.losses import LossFn, count_units
from posttrain.train.optim import build_optimizer, build_scheduler, param_groups
from posttrain.train.run import check_run_dir, train_device
from posttrain.weights.checkpoint import ensure_writable_dir, load_checkpoint, resolve_checkpoint, save_checkpoint

PRECISIONS = ("auto", "bf16-mixed", "bf16-true", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Optimizer, schedule, precision, accumulation, evaluation and checkpoints.

    Attributes:
        lr: peak learning rate (AdamW).
        weight_decay: decoupled weight decay, on matrices only (never norms, biases, embeddings).
        betas: AdamW's betas.
        eps: AdamW's epsilon.
        warmup_steps: optimizer steps of linear warmup.
        schedule: constant | linear | cosine decay after warmup.
        min_lr_ratio: the decay ends at lr * min_lr_ratio.
        epochs: passes over the training data (ignored when max_steps is set).
        max_steps: train exactly this many optimizer steps.
        grad_accum: micro-batches per optimizer step (the loss is normalised by the step's target tokens).
        max_grad_norm: gradient-norm clipping; 0: none (the norm is still logged).
        precision: bf16-mixed | bf16-true | fp16 (with loss scaling) | fp32 | auto (bf16-mixed on a
            GPU that has bf16, else fp32).
        compile: torch.compile each transformer block; a string names the backend.
        activation_checkpointing: keep only each transformer block's input for the backward pass and
            recompute the rest there: activation memory of one block instead of all of them, for about
            a third more block compute (SFT's LM-head loss is chunked anyway).
        eval_every: optimizer steps between evaluations (val loss and samples); 0: at the end only.
        eval_on_start: also evaluate before the first step (a step-0 row: the baseline).
        log_every: steps between metrics.jsonl rows (evaluation steps always log).
        save_every: steps between checkpoints/last; 0: at the end (and on Ctrl-C/SIGTERM).
        seed: random seed of the run.
        resume: continue exactly from <run_dir>/checkpoints/last when it exists (else start afresh).
        best_metric: validation metric that picks checkpoints/best.
        best_mode: min | max: whether lower or higher best_metric is better.
        device: cuda, cpu, ...; auto: cuda when available, else cpu.
        tensorboard: write TensorBoard events to <run_dir>/tb.
        progress: show a progress bar (loss, lr, tokens/s, ETA).
    """
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"
    compile: bool | str = False
    activation_checkpointing: bool = False
    eval_every: int = 0
    eval_on_start: bool = False
    log_every: int = 10
    save_every: int = 0
    seed: int = 0
    resume: bool = False
    best_metric: str = "val_loss"
    best_mode: str = "min"
    device: str = "auto"
    tensorboard: bool = True
    progress: bool = True


class BatchSource(Protocol):
    def __len__(self) -> int: ...
    def epoch(self, epoch: int, start: int = 0) -> Iterable[dict]: ...


class _FixedOrder:
    """A list of batches as a BatchSource: the same order every epoch."""

    def __init__(self, batches):
        self._batches = batches

    def __len__(self) -> int:
        return len(self._batches)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        return (self._batches[i] for i in range(start, len(self._batches)))


def as_batch_source(data) -> BatchSource:
    if callable(getattr(data, "epoch", None)) and hasattr(data, "__len__"):
        return data
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return _FixedOrder(data)
    raise TypeError(f"{type(data).__name__} is not a batch source: give an object with __len__ and "
                    f"epoch(epoch, start), or a list of batch dicts")


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved after the step in progress. Exit code: 128 + signum."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to "
                         f"{checkpoint}; run again with resume=True to continue")


class _StopOnSignal:
    """SIGINT/SIGTERM only raise a flag, checked after each optimizer step, so the loop can save first.

    A second Ctrl-C aborts at once (KeyboardInterrupt) for a user who will not wait.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers live in the main thread only
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _resolve_precision(name: str, device: torch.device) -> str:
    if name not in PRECISIONS:
        raise ValueError(f"precision {name!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":  # it runs (the tests use it), but it is no CPU format
        warnings.warn("precision fp16 on a CPU is slow and gains nothing there; bf16-mixed or fp32 are the "
                      "CPU's formats")
    return name  # fp16 runs anywhere autocast and GradScaler do


def _autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision in ("bf16-mixed", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        return functools.partial(torch.autocast, device.type, dtype=dtype)
    return contextlib.nullcontext  # fp32, and bf16-true (the weights themselves are bf16)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated transformer blocks: the members of its nn.ModuleLists."""
    return [b for m in model.modules() if isinstance(m, nn.ModuleList) for b in m]


def _compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Compile each repeated block in place: state-dict keys stay as they are, and every entry point
    (forward, model.hidden, a classification head) runs compiled blocks; compile time is one block's."""
    for b in _blocks(model) or [model]:
        b.compile(backend=backend)


def _checkpointed(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation, samples, generation: nothing to save anyway
        return forward(*args, **kwargs)
    # Non-reentrant: works with frozen inputs (LoRA), keyword arguments and torch.compile, and
    # restores the RNG state so that dropout (LoRA's) draws the same mask when it recomputes.
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing of every block, in place: the block's own forward is wrapped, so
    state-dict keys, LoRA wrappers and heads see the same modules (compile then traces the wrapper)."""
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"activation_checkpointing: {type(model).__name__} has no nn.ModuleList of blocks")
    for b in blocks:
        if not (isinstance(b.forward, functools.partial) and b.forward.func is _checkpointed):  # once only
            b.forward = functools.partial(_checkpointed, b.forward)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _n_tokens(batch: dict) -> int:
    """Real (non-pad) tokens the model reads: the batch's `num_tokens` (every collate in posttrain
    counts them), else every slot of its *input_ids tensors. Tokens seen and tokens/s count these."""
    if "num_tokens" in batch:
        return int(batch["num_tokens"])
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))


def _step_batches(source: BatchSource, grad_accum: int, epoch: int, start: int) -> Iterator[tuple[int, int, list]]:
    """(epoch, index of the next micro-batch, micro-batches of one optimizer step), epoch after epoch.

    A step never spans two epochs; the last step of an epoch may hold fewer micro-batches.
    """
    while True:
        it, index = iter(source.epoch(epoch, start)), start
        while micro := list(itertools.islice(it, grad_accum)):
            index += len(micro)
            yield epoch, index, micro
        if index == start:
            raise RuntimeError(f"the batch source gave no batches for epoch {epoch} from batch {start} "
                               f"although its len() is {len(source)}")
        epoch, start = epoch + 1, 0


def forward_backward(model: nn.Module, micro: list[dict], loss_fn: LossFn, units: int, device: torch.device,
                     autocast=contextlib.nullcontext, scaler=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Accumulate the gradient of one optimizer step: sum over micro-batches of loss_sum / units.

    Returns the step's loss (per unit), the units the loss function reported, and metric sums.
    """
    loss, reported, sums = torch.zeros((), device=device), 0, {}
    for batch in micro:
        with autocast():
            loss_sum, n, metrics = loss_fn(model, _to_device(batch, device))
        part = loss_sum.float() / max(units, 1)  # a step without targets contributes nothing
        (scaler.scale(part) if scaler is not None else part).backward()
        loss += part.detach()
        reported = reported + n
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else v)
    return loss, reported, sums


@torch.no_grad()
def evaluate(model: nn.Module, source: BatchSource, loss_fn: LossFn, device: torch.device,
             autocast=contextlib.nullcontext) -> dict:
    """Unit-weighted mean loss (and metrics) over the whole source, e.g. per target token: `val_*` keys."""
    was_training = model.training
    model.eval()
    total, units, sums = torch.zeros((), device=device, dtype=torch.float64), 0, {}
    for batch in source.epoch(0, 0):
        with autocast():
            loss_sum, n, metrics = loss_fn(model, _to_device(batch, device))
        total += loss_sum.double()
        units = units + n
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + (v.double() if isinstance(v, torch.Tensor) else v)
    model.train(was_training)
    units = max(int(units), 1)
    return {"val_loss": total.item() / units, **{f"val_{k}": float(v) / units for k, v in sums.items()}}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def train(model: nn.Module, config: TrainConfig, train_data, loss_fn: LossFn, run_dir: str | Path,
          val_data=None, sample_fn: Callable[[nn.Module, int], list[dict]] | None = None,
          save_final: Callable[[nn.Module, Path], None] | None = None,
          trainable_params: Iterable[nn.Parameter] | None = None) -> dict:
    """Train `model` in place; write the run directory; return a summary dict.

    run_dir receives metrics.jsonl, tb/, plots/, samples.jsonl, checkpoints/{last,best}/ and, through
    `save_final(model, run_dir / "model")`, the final model. The caller writes config.yaml
    (`posttrain.runlog.write_config`). `sample_fn(model, step)` runs at every evaluation; its rows go to
    samples.jsonl. `trainable_params`: train only these (LoRA, a head); every other parameter is frozen.
    """
    cfg = config
    if cfg.grad_accum < 1 or cfg.epochs < 1 or (cfg.max_steps is not None and cfg.max_steps < 1):
        raise ValueError(f"grad_accum, epochs and max_steps must be >= 1 (got {cfg.grad_accum}, {cfg.epochs}, "
                         f"{cfg.max_steps})")
    if cfg.best_mode not in ("min", "max"):
        raise ValueError(f"best_mode must be 'min' or 'max', not {cfg.best_mode!r}")
    run_dir = ensure_writable_dir(run_dir)  # fail now, not after an hour of training
    last_dir, best_dir = run_dir / "checkpoints" / "last", run_dir / "checkpoints" / "best"
    device = train_device(cfg.device)
    precision = _resolve_precision(cfg.precision, device)
    autocast = _autocast(precision, device)
    source = as_batch_source(train_data)
    val_source = as_batch_source(val_data) if val_data is not None else None
    if len(source) == 0:
        raise ValueError("the training data holds no batches")
    total_steps = cfg.max_steps or cfg.epochs * math.ceil(len(source) / cfg.grad_accum)

    _seed_everything(cfg.seed)
    if trainable_params is not None:
        trainable_params = list(trainable_params)
        keep = {id(p) for p in trainable_params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    model.to(device)
    if precision == "bf16-true":
        model.to(torch.bfloat16)
    groups = param_groups(model, cfg.weight_decay, trainable_params)
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, cfg.lr, cfg.betas, cfg.eps)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total_steps, cfg.schedule, cfg.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    pos = {"step": 0, "epoch": 0, "batch": 0, "tokens_seen": 0, "best": None, "best_step": None}
    if cfg.resume and resolve_checkpoint(last_dir) is not None:
        saved = load_checkpoint(last_dir, model, optimizer, scheduler, scaler)
        pos.update({k: saved[k] for k in pos})
        changed = {k: (v, getattr(cfg, k)) for k, v in saved.get("config", {}).items()
                   if k not in ("resume", "progress", "tensorboard", "log_every")
                   and v != _plain_value(getattr(cfg, k, None))}
        if changed:
            warnings.warn(f"resuming {last_dir} with changed settings (saved, now): {changed}; the run "
                          f"will not equal an uninterrupted one")
    elif not cfg.resume:
        check_run_dir(run_dir, resume=False)
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    if cfg.compile:
        _compile_blocks(model, cfg.compile if isinstance(cfg.compile, str) else "inductor")

    def state() -> dict:
        return {**pos, "config": dataclasses.asdict(cfg)}

    def save_last() -> Path:
        return save_checkpoint(last_dir, model, state(), optimizer, scheduler, scaler)

    def run_eval(step: int, track_best: bool = True) -> dict:
        val = evaluate(model, val_source, loss_fn, device, autocast) if val_source is not None else {}
        if sample_fn is not None:
            model.eval()
            with torch.no_grad():
                log.samples(step, sample_fn(model, step))
            model.train()
        if val and track_best:
            if cfg.best_metric not in val:
                raise KeyError(f"best_metric {cfg.best_metric!r} is not among the validation metrics {sorted(val)}")
            value = val[cfg.best_metric]
            if pos["best"] is None or (value < pos["best"] if cfg.best_mode == "min" else value > pos["best"]):
                pos.update(best=value, best_step=step)
                # As complete as "last" (optimizer, scheduler, scaler, RNG, data position): copied to
                # checkpoints/last, it resumes training from the best step.
                save_checkpoint(best_dir, model, state(), optimizer, scheduler, scaler)
        return val

    log = RunLog(run_dir, total_steps, pos["step"], cfg.tensorboard, cfg.progress)
    if cfg.eval_on_start and pos["step"] == 0 and (val_source is not None or sample_fn is not None):
        # The untrained model's metrics as step 0: the baseline every later evaluation is read against.
        # Not a "best" candidate: checkpoints/best only ever holds a state reached by training.
        log.log({"step": 0, "epoch": 0.0, "tokens_seen": 0, **run_eval(0, track_best=False)})
        plot_run(run_dir)
    model.train()
    started, step_loss, val, evaluated_at = time.perf_counter(), float("nan"), {}, -1
    start_step, start_tokens = pos["step"], pos["tokens_seen"]
    interval_start, interval_tokens = time.perf_counter(), 0
    try:
        with _StopOnSignal() as stop:
            for epoch, index, micro in _step_batches(source, cfg.grad_accum, pos["epoch"], pos["batch"]):
                if pos["step"] >= total_steps:
                    break
                units = sum(count_units(loss_fn, b) for b in micro)
                loss, reported, metric_sums = forward_backward(model, micro, loss_fn, units, device, autocast, scaler)
                step, step_loss = pos["step"] + 1, loss.item()  # the one host sync of a step
                if not math.isfinite(step_loss):  # checked before the update: the weights stay the last good ones
                    raise FloatingPointError(
                        f"loss is {step_loss} at step {step} (epoch {epoch}, micro-batches {index - len(micro)}-"
                        f"{index - 1}); training stopped. Lower the learning rate, use bf16 instead of fp16, or "
                        f"check those batches. Last good checkpoint: {resolve_checkpoint(last_dir)}")
                if int(reported) != units:
                    raise ValueError(f"the loss function reported {int(reported)} units at step {step} but counted "
                                     f"{units} beforehand; give it a matching @counts(...) (train/losses.py)")
                scaler.unscale_(optimizer)  # clip the true gradient, not the fp16-scaled one
                grad_norm = nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)  # skips the update when fp16 gradients overflowed
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                tokens = sum(_n_tokens(b) for b in micro)
                epoch_done = index >= len(source)
                pos.update(step=step, epoch=epoch + int(epoch_done), batch=0 if epoch_done else index,
                           tokens_seen=pos["tokens_seen"] + tokens)
                interval_tokens += tokens
                eval_now = (val_source is not None or sample_fn is not None) and (
                    step == total_steps or (cfg.eval_every and step % cfg.eval_every == 0))
                if step % cfg.log_every == 0 or step == total_steps or eval_now:
                    elapsed = max(time.perf_counter() - interval_start, 1e-9)
                    row = {"step": step, "epoch": round(epoch + index / len(source), 4),
                           "tokens_seen": pos["tokens_seen"], "loss": step_loss, "lr": lr,
                           "grad_norm": float(grad_norm), "tokens_per_s": interval_tokens / elapsed,
                           **{k: float(v) / max(units, 1) for k, v in metric_sums.items()}}
                    if eval_now:
                        val, evaluated_at = run_eval(step), step
                        row.update(val)
                    log.log(row)
                    if evaluated_at == step:
                        plot_run(run_dir)
                    log.progress(1, loss=step_loss, lr=lr, **{"tok/s": int(row["tokens_per_s"])})
                    interval_start, interval_tokens = time.perf_counter(), 0  # eval and plots are not throughput
                else:
                    log.progress(1)
                if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps or stop.signum is not None:
                    save_last()
                    if stop.signum is not None:
                        raise TrainingInterrupted(stop.signum, step, last_dir)
                    interval_start = time.perf_counter()

        plot_run(run_dir)
        if save_final is not None:
            save_final(model, run_dir / "model")
    finally:
        log.close()
    seconds = time.perf_counter() - started
    return {"steps": pos["step"], "tokens_seen": pos["tokens_seen"], "loss": step_loss, "val": val,
            "best_metric": cfg.best_metric if val_source is not None else None, "best": pos["best"],
            "best_step": pos["best_step"], "seconds": seconds,
            "tokens_per_s": (pos["tokens_seen"] - start_tokens) / max(seconds, 1e-9), "precision": precision,
            "device": str(device), "resumed_from": start_step or None, "run_dir": str(run_dir),
            "last_checkpoint": str(last_dir), "best_checkpoint": str(best_dir) if pos["best_step"] else None,
            "model_dir": str(run_dir / "model") if save_final is not None else None}


def _plain_value(v):
    """A config value as it reads back from state.json (tuples become lists)."""
    return list(v) if isinstance(v, tuple) else v
