"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

Norm weights, biases and embeddings get no weight decay (nanoGPT's `configure_optimizers`,
litgpt, torchtune): decaying a LayerNorm gain towards zero or pulling rarely seen token rows
towards the origin only hurts. The schedule is linear warmup, then constant, linear or cosine
decay down to `min_lr_ratio` times the peak learning rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

SCHEDULES = ("constant", "linear", "cosine")


def param_groups(model: nn.Module, weight_decay: float,
                 trainable_params: Iterable[nn.Parameter] | None = None) -> list[dict]:
    """Two AdamW groups: matrices (decayed) and norms, biases, embeddings (not decayed).

    Only parameters that require grad take part, or only `trainable_params` when given. Each group
    carries `names` for inspection (torch.optim ignores extra keys). A tied weight (GPT-2's lm_head
    is wte) appears once, as the embedding it is.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    allowed = None if trainable_params is None else {id(p) for p in trainable_params}
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": []}
    for name, p in model.named_parameters():  # named_parameters() yields each shared tensor once
        if (allowed is not None and id(p) not in allowed) or (allowed is None and not p.requires_grad):
            continue
        group = no_decay if p.ndim < 2 or id(p) in embeddings else decay
        group["params"].append(p)
        group["names"].append(name)
    decay["weight_decay"], no_decay["weight_decay"] = weight_decay, 0.0
    if not decay["params"] and not no_decay["params"]:
        raise ValueError("no trainable parameters: every parameter has requires_grad=False "
                         "(or trainable_params was empty)")
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step when every parameter lives on a CUDA device."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_cuda for p in params)  # fused AdamW needs every tensor on the GPU
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warmup rises linearly, (step + 1) / warmup_steps, so the first step already learns and the
    last warmup step reaches the peak. Decay then runs over the remaining steps: progress goes
    from 0 at `warmup_steps` to 1 at `total_steps`, and the factor from 1 to `min_lr_ratio`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    schedule: str = "cosine", min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over `lr_factor`; call `.step()` once after every optimizer step."""
    lr_factor(0, warmup_steps, total_steps, schedule, min_lr_ratio)  # validate the name now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule, min_lr_ratio))
