"""What GPT-2 and the Llama family share: config.json round trips, the LM head, init, the KV cache.

A config dataclass (fields = Hugging Face config.json keys) must also answer to the family-neutral
names the rest of posttrain uses: `num_layers`, `num_kv_heads`, `head_dim`, `hidden_size`,
`max_length`, `vocab_size`, `model_type`, `bos_token_id`, `eos_token_id` (each family defines them).

A model subclasses `CausalLM`, sets `self.config` and `self.lm_head`, and defines `hidden`
(token ids -> final-normed hidden states); `forward` and `new_cache` follow from those.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from posttrain.models.attention import KVCache


class HFConfig:
    """Mixin for config dataclasses whose fields are the keys of Hugging Face's config.json."""

    @classmethod
    def from_hf(cls, cfg: dict):
        """The config from a config.json dictionary: unknown keys ignored, null values left at their default."""
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in cfg.items() if k in known and v is not None})


class CausalLM(nn.Module):
    """A decoder-only language model: `hidden` runs the transformer, `lm_head` maps to the vocabulary."""

    config: HFConfig
    lm_head: nn.Linear

    def hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
               document_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) of token ids (B, T)."""
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden(input_ids, position_ids, document_ids, cache))  # (B, T, V)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` tokens, in the model's dtype and device."""
        c, p = self.config, self.lm_head.weight
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, p.dtype, p.device)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2's initialisation, which Llama-family checkpoints also use: N(0, 0.02), zero biases."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
