"""GGUF files (llama.cpp's format) into the native models, dequantized.

The config comes from the file's metadata ({arch}.block_count, .embedding_length, ...); tensor
names map from llama.cpp's (blk.N.attn_q.weight) to Hugging Face's
(model.layers.N.self_attn.q_proj.weight). llama.cpp's converter permutes the rows of Llama's
q and k projections (interleaved rotary halves); that is undone here exactly as transformers' GGUF
loader does (LlamaTensorProcessor._reverse_permute_weights). Qwen2 files are not permuted, and
GPT-2 files store the projections already transposed to nn.Linear's (out, in).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from posttrain.models.gpt2 import GPT2Config
from posttrain.models.llama import LlamaConfig, rope_frequencies
from posttrain.models.registry import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")

_LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_LAYER = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_GPT2_GLOBAL = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                "output_norm": "transformer.ln_f", "output": "lm_head"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")


def open_gguf(path: Path):
    """A gguf.GGUFReader, with a clear error for truncated or foreign files."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # numpy reshape/memmap errors when the file is cut short
        raise ValueError(f"{path}: not a readable GGUF file, probably truncated or corrupt "
                         f"({type(e).__name__}: {e}). Reinstall or re-download it") from e


def field(reader, key: str, default=None):
    """A metadata value (scalar, string or list), or `default` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    if isinstance(value, float):  # float32 in the file: 1e-5 reads back as 9.999999747378752e-06
        value = float(str(np.float32(value)))
    return value


def gguf_hf_name(name: str, arch: str) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor name (None for tensors with no parameter)."""
    layer_map, global_map = (_GPT2_LAYER, _GPT2_GLOBAL) if arch == "gpt2" else (_LLAMA_LAYER, _LLAMA_GLOBAL)
    prefix = "transformer.h" if arch == "gpt2" else "model.layers"
    m = _BLOCK.match(name)
    if m and m.group(2) in layer_map:
        return f"{prefix}.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"
    m = _GLOBAL.match(name)
    if m and m.group(1) in global_map:
        return f"{global_map[m.group(1)]}.{m.group(2)}"
    return None


def reverse_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a q/k projection (weight or bias) with `n_head` heads."""
    dim = weights.shape[0] // n_head // 2
    w = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (convert_hf_to_gguf.py LlamaModel.permute); its inverse is reverse_permute."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims fastest-first


def gguf_config(reader, path: Path) -> ModelConfig:
    """Our config dataclass from the GGUF metadata."""
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    vocab_size = _shape(tensors["token_embd.weight"])[0]
    tied = "output.weight" not in tensors
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = field(reader, "tokenizer.ggml.eos_token_id")

    def meta(key, default=None):
        value = field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF metadata {arch}.{key} is missing")
        return value

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_positions=meta("context_length"), n_embd=meta("embedding_length"),
                          n_layer=meta("block_count"), n_head=meta("attention.head_count"),
                          layer_norm_epsilon=meta("attention.layer_norm_epsilon", 1e-5),
                          bos_token_id=bos if bos is not None else 50256,
                          eos_token_id=eos if eos is not None else 50256)
    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    head_dim = field(reader, f"{arch}.attention.key_length") or field(reader, f"{arch}.rope.dimension_count") \
        or hidden // heads
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"), num_attention_heads=heads,
        num_key_value_heads=field(reader, f"{arch}.attention.head_count_kv") or heads, head_dim=head_dim,
        max_position_embeddings=meta("context_length"), rms_norm_eps=meta("attention.layer_norm_rms_epsilon"),
        rope_theta=field(reader, f"{arch}.rope.freq_base", 10000.0), tie_word_embeddings=tied,
        attention_bias=arch == "llama" and "blk.0.attn_q.bias" in tensors,
        bos_token_id=bos, eos_token_id=eos, model_type=arch)
    if "rope_freqs.weight" in tensors:
        config.rope_scaling = _llama3_scaling(config, tensors["rope_freqs.weight"], path)
    return config


def _llama3_scaling(config: LlamaConfig, rope_freqs, path: Path) -> dict:
    """Llama 3.1+ GGUFs store the rope scaling as per-frequency divisors (rope_freqs.weight) rather
    than as parameters. Recover Meta's parameters (factor = largest divisor; the other three are
    the same in every Llama 3.x release) and check that they reproduce the stored divisors."""
    from gguf.quants import dequantize

    divisors = torch.from_numpy(np.asarray(dequantize(rope_freqs.data, rope_freqs.tensor_type), dtype=np.float64))
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base, scaled = replace(config, rope_scaling=None), replace(config, rope_scaling=scaling)
    implied = rope_frequencies(base).double() / rope_frequencies(scaled).double()
    if implied.shape != divisors.shape or not torch.allclose(implied, divisors, rtol=1e-3):
        raise ValueError(f"{path}: rope_freqs.weight holds a rope scaling other than Llama 3's; "
                         "load the model from its Hugging Face checkpoint instead")
    return scaling


def read_gguf_tensors(reader, config: ModelConfig, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(native key, float32 tensor) for each weight, dequantized and un-permuted, one at a time."""
    from gguf.quants import dequantize

    arch = config.model_type
    for tensor in reader.tensors:
        hf_name = gguf_hf_name(tensor.name, arch)
        if hf_name is None:
            if tensor.name == "rope_freqs.weight":
                continue  # folded into config.rope_scaling
            raise ValueError(f"{path}: tensor {tensor.name!r} has no counterpart in the {arch} model")
        try:
            weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize tensor {tensor.name!r} "
                             f"({tensor.tensor_type.name}): {e}") from e
        if arch == "llama" and ".attn_q." in tensor.name:
            weights = reverse_permute(weights, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in tensor.name:
            weights = reverse_permute(weights, config.num_key_value_heads)
        if not weights.flags.writeable:  # F32/F16 tensors come back as views of the read-only memmap
            weights = weights.copy()
        yield hf_name, torch.from_numpy(np.ascontiguousarray(weights))


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                    ) -> nn.Module:
    """A native model from a GGUF file (any quantization the gguf package dequantizes)."""
    from posttrain.weights.hub import assign_weights, empty_model

    path = Path(path)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    model = empty_model(config, dtype, device)
    assign_weights(model, read_gguf_tensors(reader, config, path), source=str(path))
    return model.eval()
