"""Attention shared by every model family: document-aware masks and a preallocated KV cache.

A token may attend to an earlier (or the same) slot only when both carry the same document id.
Packed training rows use this so that no example sees another; left-padded generation uses it
with pad slots given their own document id, so real tokens never see padding.

A model computes its mask once per forward (`attention_mask`) and hands it to every layer's
`scaled_dot_product`, which dispatches on what the mask is:

- None: plain causal attention (SDPA's is_causal kernel);
- a boolean (B, 1, T, S) tensor: SDPA with attn_mask (CPU, KV-cache steps, POSTTRAIN_ATTENTION=sdpa);
- a FlexAttention BlockMask (`models/flex.py`): packed rows on CUDA without a cache, where SDPA
  would compute every masked score of a (T, T) matrix that is mostly other documents.

POSTTRAIN_ATTENTION (environment, read at each forward): `auto` (default: flex on CUDA for
document ids without a cache, SDPA otherwise), `flex` (flex wherever document ids come without a
cache, CPU included: for tests; torch has no flex backward on CPU) or `sdpa` (never flex).

Masks stay boolean rather than additive float (0 / -inf): on torch 2.13 CPU (2 cores, 1 thread)
a decode-step SDPA call (1 query, 70 cached keys, 12 heads) takes 14 us with a boolean mask and
12.5 us with a float one, a whole GPT-2 124M decode step (batch 4) 53.6 ms against 53.2 ms, and a
4 x 256 packed forward + backward 34.3 ms against 33.8 ms; outputs are bit-identical. A float
mask would also have to match the query's dtype (bf16 under autocast or bf16 weights).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from posttrain.models import flex
from posttrain.models.flex import BlockMask

ATTENTION_ENV = "POSTTRAIN_ATTENTION"
ATTENTION_BACKENDS = ("auto", "flex", "sdpa")


class KVCache:
    """Keys and values of every layer, preallocated to `max_len` slots.

    `doc_ids` holds the document id of each filled slot so that later queries can be masked
    against it; `length` is how many slots are filled (the same for every row of the batch).
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.doc_ids = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.max_len = max_len
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, H, T, D) keys/values after the filled slots; return all filled slots."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reserve(self, doc_ids: torch.Tensor) -> None:
        """Record the document ids of the T slots this forward step is about to fill."""
        end = self.length + doc_ids.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this step would need {end}")
        self.doc_ids[:, self.length:end] = doc_ids

    def advance(self, steps: int) -> None:
        self.length += steps

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished sequences from the batch (rows: indices to keep)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.doc_ids = self.doc_ids[rows]

    def widened(self, width: int, max_len: int, joining: "KVCache") -> "KVCache":
        """A new cache of `max_len` slots holding these rows, then `joining`'s, each cache's filled slots
        moved to end at slot `width`; the slots left empty before them get document id -1, which no
        query attends to. Keys carry their positions already (RoPE, GPT-2's embeddings), so moving
        them changes nothing they compute."""
        if width < max(self.length, joining.length):
            raise ValueError(f"cannot fit caches of {self.length} and {joining.length} slots into {width}")
        layers, batch, heads, _, dim = self.k.shape
        out = KVCache(layers, batch + joining.k.shape[1], heads, max_len, dim, self.k.dtype, self.k.device)
        for cache, rows in ((self, slice(0, batch)), (joining, slice(batch, None))):
            shift, n = width - cache.length, cache.length
            out.k[:, rows, :, shift:width] = cache.k[:, :, :, :n]
            out.v[:, rows, :, shift:width] = cache.v[:, :, :, :n]
            out.doc_ids[rows, :shift] = -1
            out.doc_ids[rows, shift:width] = cache.doc_ids[:, :n]
        out.length = width
        return out


def attention_backend() -> str:
    """The POSTTRAIN_ATTENTION setting: auto (default), flex or sdpa."""
    name = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"{ATTENTION_ENV}={name!r} is not one of {', '.join(ATTENTION_BACKENDS)}; unset it "
                         f"or pick one (auto: FlexAttention for packed rows on CUDA, SDPA elsewhere)")
    return name


def _use_flex(device: torch.device) -> bool:
    backend = attention_backend()
    return backend == "flex" or (backend == "auto" and device.type == "cuda")


def attention_mask(document_ids: torch.Tensor | None, cache: KVCache | None, batch: int,
                   seq_len: int) -> torch.Tensor | BlockMask | None:
    """The mask of one forward, built once and shared by every layer; None means plain causal.

    A boolean (B, 1, T, S) tensor, True where attention is allowed, or for packed rows without a
    cache on CUDA (see POSTTRAIN_ATTENTION above) a document-causal FlexAttention BlockMask.
    Queries fill slots [offset, offset + T) after what the cache already holds; their document
    ids are recorded in the cache so that later steps are masked against them. Without ids a
    step is document 0, the id a generation prompt's real tokens carry.
    """
    offset = cache.length if cache is not None else 0
    if cache is not None:
        if document_ids is None:
            document_ids = cache.doc_ids.new_zeros(batch, seq_len)
        cache.reserve(document_ids)
    if document_ids is None:
        return None  # plain causal: SDPA's is_causal fast path
    if cache is None and _use_flex(document_ids.device):
        return flex.document_block_mask(document_ids)
    device = document_ids.device
    q_slot = torch.arange(offset, offset + seq_len, device=device)
    k_slot = torch.arange(offset + seq_len, device=device)
    causal = q_slot[:, None] >= k_slot[None, :]  # (T, S)
    key_docs = cache.doc_ids[:, :offset + seq_len] if cache is not None else document_ids
    same_doc = document_ids[:, :, None] == key_docs[:, None, :]  # (B, T, S)
    return (causal[None] & same_doc)[:, None]


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: torch.Tensor | BlockMask | None) -> torch.Tensor:
    """(B, H, T, D) queries against (B, Hkv, S, D) keys/values, grouped-query aware.

    `mask` is what `attention_mask` returned: None (causal), a boolean tensor, or a BlockMask.
    """
    if isinstance(mask, BlockMask):
        return flex.attention(q, k, v, mask)
    gqa = k.shape[1] != q.shape[1]  # grouped-query: SDPA shares each kv head across its group
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def default_positions(cache: KVCache | None, batch: int, seq_len: int, device: torch.device
                      ) -> torch.Tensor:
    """Positions when the caller gives none: count on from what the cache holds."""
    offset = cache.length if cache is not None else 0
    return torch.arange(offset, offset + seq_len, device=device).expand(batch, seq_len)
