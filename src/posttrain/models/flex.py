"""FlexAttention for packed rows: one document-causal block mask per forward, shared by all layers.

A packed row holds several documents; a token may attend to an earlier (or the same) slot of its
own document only. SDPA needs that as a dense (B, 1, T, T) mask and then computes every score,
masked or not. FlexAttention takes the rule as a `mask_mod` and, through `create_block_mask`,
a map of which 128 x 128 tiles are empty (skipped), full (no masking needed) or partial; its
compiled kernel then does about the work of the causal part of each document only.

`models/attention.py` decides when this path runs (CUDA, document ids, no KV cache, or forced by
POSTTRAIN_ATTENTION=flex) and dispatches on the mask's type; this module only builds the mask and
calls the kernel. Both `flex_attention` and `create_block_mask` are compiled once, lazily, on the
first CUDA call: uncompiled, flex_attention is a reference implementation that materialises the
full score matrix, and create_block_mask evaluates mask_mod densely over (B, T, T). On CPU (tests,
POSTTRAIN_ATTENTION=flex) both run eagerly; torch refuses flex_attention's backward on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

__all__ = ["BlockMask", "document_causal_mask_mod", "document_block_mask", "attention"]

_compiled: dict[str, Callable] = {}  # name -> torch.compile'd function, built on first CUDA use


def _compiled_fn(name: str, fn: Callable) -> Callable:
    """torch.compile(fn), once per process: every layer and every step reuse the same compiled function."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def document_causal_mask_mod(document_ids: torch.Tensor) -> Callable:
    """mask_mod for (B, T) document ids: query q sees key kv iff kv <= q and both are in one document."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])
    return mask_mod


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """The document-causal BlockMask of a (B, T) batch of packed rows, shared by all heads (H=None)."""
    B, T = document_ids.shape
    build = _compiled_fn("create_block_mask", create_block_mask) if document_ids.is_cuda else create_block_mask
    return build(document_causal_mask_mod(document_ids), B, None, T, T, device=document_ids.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """(B, H, T, D) queries against (B, Hkv, T, D) keys/values under `block_mask`, grouped-query aware."""
    device = q.device.type
    # Under autocast, Llama's rotary embedding (fp32 cos/sin times bf16 projections) leaves q, k
    # in fp32 and v in bf16. Autocast casts SDPA's inputs; flex_attention's handling depends on
    # the torch version (older ones reject mixed dtypes, newer compiled kernels may upcast k, v
    # to q's fp32 and run several times slower), so cast to the autocast dtype here, as SDPA gets.
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    fn = _compiled_fn("flex_attention", flex_attention) if q.is_cuda else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
