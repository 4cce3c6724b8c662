"""A causal LM as a sequence classifier: its LM head replaced by a linear classification head, the
final hidden states pooled to one vector per text, and the policy of which parameters train.

    add_classification_head(model, n_classes)      # model.lm_head becomes Linear(d_model, n_classes)
    params = trainable_parameters(model, "last-k", last_k=1)
    logits = classifier_logits(model, batch, "last-nonpad")   # (B, n_classes), fp32

The head sits where the LM head was (`model.lm_head`), as in Raschka's LLMs-from-scratch ch. 6:
`model(input_ids)` then gives per-position class logits, and checkpoints keep the model's own
parameter names. GPT-2 ties its LM head to the token embedding; the new head unties them (the
embedding stays as it was). Exported, the head is Hugging Face's `score` (see posttrain.predict).

Pooling (`pool`): which hidden state of a text feeds the head.
  last         the last position of the row (with right padding: a pad token that, under causal
               attention, has seen the whole text; the setting of LLMs-from-scratch, whose rows are
               all padded to one length, as posttrain.train.classify then pads them too);
  last-nonpad  the last real token of each row, found from the attention mask: right for either
               padding side (Hugging Face's *ForSequenceClassification does the same from pad ids);
  mean         the mean over the real tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from posttrain.models.gpt2 import GPT2Config

POOLINGS = ("last", "last-nonpad", "mean")
TRAINABLE = ("head", "last-k", "all", "lora")


def backbone_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Embedding]:
    """(transformer blocks, final norm, token embedding) of a GPT-2 or Llama-family model."""
    if isinstance(model.config, GPT2Config):
        t = model.transformer
        return t.h, t.ln_f, t.wte
    m = model.model
    return m.layers, m.norm, m.embed_tokens


def hidden_size(model: nn.Module) -> int:
    return backbone_parts(model)[2].embedding_dim


def add_classification_head(model: nn.Module, n_classes: int, bias: bool = False, std: float = 0.02) -> nn.Linear:
    """Replace `model.lm_head` (d_model -> vocab) with a fresh Linear(d_model, n_classes); return it.

    Initialised like the models' own linear layers (normal, std 0.02; zero bias), in the dtype and on
    the device of the embedding. No bias by default: Hugging Face's `score` head has none, so an
    exported classifier loads in transformers' *ForSequenceClassification unchanged.
    """
    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    embedding = backbone_parts(model)[2]
    head = nn.Linear(embedding.embedding_dim, n_classes, bias=bias, device=embedding.weight.device,
                     dtype=embedding.weight.dtype)
    with torch.no_grad():
        nn.init.normal_(head.weight, mean=0.0, std=std)
        if bias:
            nn.init.zeros_(head.bias)
    model.lm_head = head  # a new module: GPT-2's tie to wte is gone, wte itself untouched
    return head


def num_classes(model: nn.Module) -> int:
    return model.lm_head.out_features


# -- which parameters train ----------------------------------------------------------------------

def _head(model: nn.Module, last_k: int) -> list[nn.Parameter]:
    return list(model.lm_head.parameters())


def _last_k(model: nn.Module, last_k: int) -> list[nn.Parameter]:
    blocks, norm, _ = backbone_parts(model)
    if not 0 <= last_k <= len(blocks):
        raise ValueError(f"last_k must be between 0 and the model's {len(blocks)} blocks, got {last_k}")
    chosen = list(blocks[len(blocks) - last_k:]) if last_k else []
    return [p for m in (*chosen, norm, model.lm_head) for p in m.parameters()]


def _all(model: nn.Module, last_k: int) -> list[nn.Parameter]:
    return list(model.parameters())


def _lora(model: nn.Module, last_k: int) -> list[nn.Parameter]:
    raise NotImplementedError(
        "trainable='lora' is not available yet: LoRA arrives with posttrain.lora (peft on the native "
        "modules), which registers itself here with register_trainable_policy('lora', fn), fn(model, last_k) "
        "returning the adapter parameters plus the head's. Until then use head, last-k or all")


# Policy name -> fn(model, last_k) -> parameters to train (every other parameter is frozen by the loop).
# The hook for LoRA: posttrain.lora replaces the "lora" entry (it must wrap the modules first and
# return the adapter weights and model.lm_head's parameters).
TRAINABLE_POLICIES: dict[str, Callable[[nn.Module, int], list[nn.Parameter]]] = {
    "head": _head, "last-k": _last_k, "all": _all, "lora": _lora}


def register_trainable_policy(name: str, fn: Callable[[nn.Module, int], list[nn.Parameter]]) -> None:
    """Add or replace a freezing policy (LoRA's hook)."""
    TRAINABLE_POLICIES[name] = fn


def trainable_parameters(model: nn.Module, policy: str = "last-k", last_k: int = 1) -> list[nn.Parameter]:
    """The parameters a policy trains; each shared tensor once.

    head: the classification head only. last-k: the last `last_k` transformer blocks, the final norm
    and the head (LLMs-from-scratch ch. 6 with k = 1). all: every parameter, the embedding included.
    lora: low-rank adapters plus the head (posttrain.lora registers it).
    """
    if policy not in TRAINABLE_POLICIES:
        raise ValueError(f"trainable {policy!r} is unknown; choose one of: {', '.join(TRAINABLE_POLICIES)}")
    seen, out = set(), []
    for p in TRAINABLE_POLICIES[policy](model, last_k):
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


# -- pooling -------------------------------------------------------------------------------------

def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the rightmost real (True) slot of each row; 0 for a row without any."""
    T = attention_mask.shape[1]
    slots = torch.arange(T, device=attention_mask.device)
    return (slots * attention_mask.long()).argmax(dim=1)  # max index among real slots


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str = "last-nonpad") -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C), one vector per row (see the module docstring)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling {pooling!r} is unknown; choose one of: {', '.join(POOLINGS)}")
    B, T, C = hidden.shape
    if pooling == "last" or attention_mask is None:
        if pooling == "mean":
            return hidden.mean(dim=1)
        return hidden[:, -1]
    if pooling == "last-nonpad":
        index = last_real_index(attention_mask)  # (B,)
        return hidden[torch.arange(B, device=hidden.device), index]
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def classifier_logits(model: nn.Module, batch: dict, pooling: str = "last-nonpad") -> torch.Tensor:
    """Class logits (B, n_classes) in fp32 for a batch of `input_ids`, `attention_mask` and (for left
    padding) `position_ids` / `document_ids`. The head runs on the B pooled vectors only."""
    hidden = model.hidden(batch["input_ids"], position_ids=batch.get("position_ids"),
                          document_ids=batch.get("document_ids"))  # (B, T, C)
    pooled = pool(hidden, batch.get("attention_mask"), pooling)  # (B, C)
    return model.lm_head(pooled).float()  # fp32 so the softmax is accurate under bf16
