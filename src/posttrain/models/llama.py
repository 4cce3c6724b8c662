"""The Llama family (Llama 3.x, SmolLM2, Qwen2/2.5) in plain PyTorch.

RMSNorm, rotary position embeddings (with Llama 3's frequency scaling), grouped-query attention,
SwiGLU, optional q/k/v bias (Qwen2), tied or untied embeddings. Parameter names equal Hugging
Face's LlamaForCausalLM / Qwen2ForCausalLM, so a hub state dict loads key for key.
The LM head over `hidden`, the weight init and `new_cache` come from models/base.py (shared with GPT-2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain.models.attention import KVCache, attention_mask, default_positions, scaled_dot_product
from posttrain.models.base import CausalLM, HFConfig


@dataclass
class LlamaConfig(HFConfig):
    # Field names equal the keys of Hugging Face's config.json for Llama and Qwen2.
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"  # "qwen2": bias on q, k, v only

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self) -> bool:
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def max_length(self) -> int:
        return self.max_position_embeddings

    def to_hf(self) -> dict:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        cfg = {**asdict(self), "architectures": [arch], "hidden_act": "silu"}
        if self.model_type == "qwen2":
            cfg.pop("attention_bias")  # Qwen2's bias is implied by its type
        return cfg

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        cfg = dict(cfg)
        rope = cfg.pop("rope_parameters", None)  # transformers 5 nests rope settings here
        if rope:
            cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                cfg.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        if cfg.get("rope_scaling") and cfg["rope_scaling"].get("rope_type", cfg["rope_scaling"].get("type")) in (None, "default"):
            cfg["rope_scaling"] = None
        return super().from_hf(cfg)


def rope_frequencies(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), with Llama 3's long-context scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (supported: llama3)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return torch.where(medium, smoothed, scaled).float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalise in fp32 as Hugging Face does, then cast back before the weight.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        C = config.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(C, self.n_kv * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=config.o_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        # cos/sin follow q's dtype: under autocast q is bf16, and fp32 cos would upcast q and k
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.append(layer, k, v)
        y = scaled_dot_product(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)
        self.apply(self._init_weights)

    def rotary(self, position_ids, dtype):
        """cos and sin (B, 1, T, D) for each token's position."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, input_ids, position_ids=None, document_ids=None, cache: KVCache | None = None):
        """Final-normed hidden states (B, T, C); `forward` applies the LM head to them."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = default_positions(cache, B, T, input_ids.device)
        mask = attention_mask(document_ids, cache, B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(x)
