"""The LM head and cross-entropy in one pass over chunks of tokens, never all logits at once.

For N target tokens and a vocabulary of V, the plain `F.cross_entropy(lm_head(h).float(), t)` keeps
an (N, V) logit matrix in the compute dtype, its fp32 copy and the fp32 log-softmax alive until the
backward pass: for GPT-2 (V = 50257) and 12k target tokens (16 rows of 1024 at 73% targets) that is
about 6 GiB under bf16 autocast, more than the weights, gradients and AdamW state of GPT-2 medium
together (5.3 GiB). It is the largest activation of a small model.

`linear_cross_entropy` computes, chunk by chunk of tokens, the logits, their fp32 log-sum-exp, the
summed loss and, when gradients are wanted, the gradient of the summed loss with respect to the
logits (softmax minus one-hot), which it multiplies straight away into the gradients of the hidden
states (N, C) and of the head's weight (V, C). Only those two are kept for the backward pass, which
merely scales them by the incoming gradient of the loss. So at most one chunk's logits exist at a
time, and no matrix product is recomputed: the same three products as the plain path (logits,
gradient of the states, gradient of the weight), in the same precision (the autocast dtype, fp32
accumulation of the weight's gradient), each done during the forward pass. This is the approach of
Liger-Kernel's fused linear cross-entropy, written with torch operations only.

It serves losses that are a plain sum over target tokens (SFT): the incoming gradient is the one
scalar that multiplies every token. A loss that weights tokens differently (DPO's per-sequence
log-probs) goes through the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits of one chunk, in fp32: about 256 MiB whatever the vocabulary (1335 tokens of GPT-2's 50257,
# 523 of Llama 3's 128256); large enough for full-speed matrix products on a GPU.
CHUNK_BYTES = 256 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    return max(128, CHUNK_BYTES // (4 * vocab_size))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype an nn.Linear would multiply in here: autocast's, else the states' own."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits, loss and the weight's gradient: fp32 at least (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, log-sum-exp per row) of fp32 logits (n, V) against targets (n,)."""
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    return (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum(), lse


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, targets_i), its gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, dtype):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h, w, acc = hidden.to(dtype), weight.to(dtype), _accumulation_dtype(dtype)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_hidden = torch.empty_like(h) if need_hidden else None  # (N, C)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen above
            for start in range(0, h.shape[0], chunk_size):
                h_chunk, t_chunk = h[start:start + chunk_size], targets[start:start + chunk_size]
                logits = (h_chunk @ w.T).to(acc)  # (n, V)
                chunk_loss, lse = _chunk_loss(logits, t_chunk)
                loss += chunk_loss
                # d(sum CE)/d(logits) = softmax - one_hot, built in place in the logits' memory
                grad_logits = logits.sub_(lse[:, None]).exp_()
                grad_logits[torch.arange(len(t_chunk), device=t_chunk.device), t_chunk] -= 1
                grad_logits = grad_logits.to(dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk_size] = grad_logits @ w
                if need_weight:
                    grad_weight += grad_logits.T @ h_chunk  # (V, C), accumulated in fp32
                del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # Scaled in fp32: under fp16 the incoming gradient carries GradScaler's factor (up to 2^16).
        return (None if grad_hidden is None else
                (grad_hidden.to(_accumulation_dtype(grad_hidden.dtype)) * grad_loss).to(hidden_dtype),
                None if grad_weight is None else (grad_weight * grad_loss).to(weight_dtype),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden` (N, C) under the bias-free head `weight` (V, C)
    against `targets` (N,): `F.cross_entropy(F.linear(hidden, weight).float(), targets,
    reduction="sum")`, holding one chunk of `chunk_size` tokens' logits at a time."""
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    dtype = _compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, dtype)
    # No gradient wanted (evaluation): the loss alone, still chunk by chunk.
    loss = torch.zeros((), dtype=_accumulation_dtype(dtype), device=hidden.device)
    h, w = hidden.to(dtype), weight.to(dtype)  # cast once, not once per chunk
    for start in range(0, h.shape[0], chunk_size):
        logits = F.linear(h[start:start + chunk_size], w).to(loss.dtype)
        loss += _chunk_loss(logits, targets[start:start + chunk_size])[0]
    return loss
