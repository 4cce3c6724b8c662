"""GPT-2 in plain PyTorch, after nanoGPT's model.py.

Parameter names equal Hugging Face's GPT2LMHeadModel, so a hub state dict maps key for key.
Hugging Face stores the attention and MLP projections as Conv1D, (in, out); here they are
nn.Linear, (out, in): weights/ transposes them on the way in and out (CONV1D_SUFFIXES).
The LM head over `hidden`, the weight init and `new_cache` come from models/base.py (shared with Llama).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch.nn as nn
import torch.nn.functional as F

from posttrain.models.attention import KVCache, attention_mask, default_positions, scaled_dot_product
from posttrain.models.base import CausalLM, HFConfig

# Weights that Hugging Face keeps as Conv1D (transposed relative to nn.Linear).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPT2Config(HFConfig):
    # Field names equal the keys of Hugging Face's GPT-2 config.json.
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    model_type: str = "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_kv_heads(self) -> int:
        return self.n_head

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def max_length(self) -> int:
        return self.n_positions

    def to_hf(self) -> dict:
        return {**asdict(self), "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
                "n_inner": None, "tie_word_embeddings": True}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, mask, cache: KVCache | None, layer: int):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        y = scaled_dot_product(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache, layer):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(CausalLM):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in every GPT-2 checkpoint
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2 paper: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def hidden(self, input_ids, position_ids=None, document_ids=None, cache: KVCache | None = None):
        """Final-layer-normed hidden states (B, T, C); `forward` applies the LM head to them."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = default_positions(cache, B, T, input_ids.device)
        mask = attention_mask(document_ids, cache, B, T)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(position_ids)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.transformer.ln_f(x)
