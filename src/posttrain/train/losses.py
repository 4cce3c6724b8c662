"""Loss functions for the shared training loop, and the contract they follow.

A loss function is a plain function `loss_fn(model, batch) -> (loss_sum, n, metrics)`:

- `loss_sum`: scalar tensor, the loss SUMMED over the units it counts (target tokens for SFT,
  pairs for DPO, examples for classification). Never a mean: the loop divides by the number of
  units in the whole optimizer step, so that k accumulated micro-batches give exactly the
  gradient of one batch k times the size, and packing or padding does not reweight examples.
- `n`: how many units `loss_sum` covers (int or scalar tensor).
- `metrics`: extra values, each a SUM over the same units (e.g. correct predictions for an
  accuracy); the loop divides them by the unit count of the step or of the validation set.

The loop must know a step's unit count before the first backward of that step, without running
the model: `count_units(loss_fn, batch)` asks `loss_fn.count(batch)` when the function carries
one (attach it with `@counts(...)`), else counts `batch["targets"] != -100`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain.train.linear_cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100

LossOutput = tuple[torch.Tensor, "int | torch.Tensor", dict]
LossFn = Callable[[nn.Module, dict], LossOutput]


def count_targets(batch: dict) -> int:
    """Trained target tokens in a batch: the default unit of a loss."""
    return int((batch["targets"] != IGNORE_INDEX).sum())


def counts(count: Callable[[dict], int]) -> Callable[[LossFn], LossFn]:
    """Decorator: tell the loop what a loss function normalises by, e.g. pairs for DPO:

        @counts(lambda batch: batch["chosen_input_ids"].shape[0])
        def dpo_loss(model, batch): ...
    """
    def attach(fn: LossFn) -> LossFn:
        fn.count = count
        return fn
    return attach


def count_units(loss_fn: LossFn, batch: dict) -> int:
    """What `loss_fn` will count on `batch`, computed from the batch alone (no forward pass)."""
    return int(getattr(loss_fn, "count", count_targets)(batch))


def sft_loss(model: nn.Module, batch: dict) -> LossOutput:
    """Next-token cross-entropy summed over the target tokens (targets != -100).

    The LM head runs only at target positions: logits of shape (B, T, V) with GPT-2's 50k vocab
    are the largest activation of a small model (B*T*V floats, plus as much again for their
    gradient), and prompt, padding and other ignored positions would be computed only to be
    thrown away. `model.hidden` gives the final-normed states; selecting the N target rows first
    makes the head an (N, C) x (C, V) product. Logits are upcast to fp32 so the log-softmax is
    accurate under bf16. A plain bias-free head (every native model's, unless LoRA adapts it) goes
    through `linear_cross_entropy`, which never holds more than one chunk of those logits.
    """
    targets = batch["targets"]
    hidden = model.hidden(batch["input_ids"], position_ids=batch.get("position_ids"),
                          document_ids=batch.get("document_ids"))  # (B, T, C)
    mask = targets != IGNORE_INDEX  # (B, T)
    head = model.lm_head
    if type(head) is nn.Linear and head.bias is None:
        loss_sum = linear_cross_entropy(hidden[mask], head.weight, targets[mask])
    else:  # an adapted or quantized head: its own forward
        loss_sum = F.cross_entropy(head(hidden[mask]).float(), targets[mask], reduction="sum")  # (N, V) logits
    return loss_sum, mask.sum(), {}
