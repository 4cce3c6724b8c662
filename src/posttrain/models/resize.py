"""Growing a model's vocabulary after tokens were added to its tokenizer."""

from __future__ import annotations

import torch
import torch.nn as nn

from posttrain.models.gpt2 import GPT2Config


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding of a native model (GPT-2's wte, Llama's embed_tokens)."""
    return model.transformer.wte if isinstance(model.config, GPT2Config) else model.model.embed_tokens


def _grown(weight: torch.Tensor, rows: int) -> nn.Parameter:
    """`weight` with rows appended, each the mean of the existing rows.

    The mean keeps the new tokens' logits and hidden states in the range the model already knows,
    where random rows would make them large and the first steps noisy (Hewitt, "Initializing new
    word embeddings for pretrained language models", 2021).
    """
    with torch.no_grad():
        mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
        new = torch.cat([weight, mean.expand(rows - weight.shape[0], -1)], dim=0)
    return nn.Parameter(new, requires_grad=weight.requires_grad)


def resize_token_embeddings(model: nn.Module, new_size: int, multiple_of: int = 64) -> int:
    """Grow the token embedding (and an untied lm_head) to at least `new_size` rows; return the size.

    The size is rounded up to a multiple of `multiple_of` (tensor-core friendly matmuls). New rows
    are the mean of the existing ones. Shrinking is refused: it would drop trained tokens.
    """
    embedding = input_embedding(model)
    old_size = embedding.num_embeddings
    size = -(-new_size // multiple_of) * multiple_of if multiple_of > 1 else new_size
    if new_size <= old_size:
        return old_size  # already large enough (rounding never shrinks)
    tied = model.lm_head.weight is embedding.weight
    embedding.weight = _grown(embedding.weight, size)
    embedding.num_embeddings = size
    if tied:
        model.lm_head.weight = embedding.weight
    else:
        model.lm_head.weight = _grown(model.lm_head.weight, size)
    model.lm_head.out_features = size
    model.config.vocab_size = size
    return size
