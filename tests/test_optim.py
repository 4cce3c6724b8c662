"""Weight-decay groups and the learning-rate schedule, against hand-computed values."""

import math

import pytest
import torch

from posttrain.models.gpt2 import GPT2Config
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import build_model
from posttrain.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def tiny_gpt2():
    torch.manual_seed(0)
    return build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64))


def tiny_llama_untied():
    torch.manual_seed(0)
    return build_model(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, attention_bias=True))


def test_gpt2_groups_decay_only_linear_matrices():
    model = tiny_gpt2()
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert set(decay["names"]) == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                                   for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    # tied lm_head is the token embedding: listed once, not decayed
    assert "transformer.wte.weight" in no_decay["names"] and "lm_head.weight" not in decay["names"] + no_decay["names"]
    assert {"transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "transformer.h.0.attn.c_attn.bias", "transformer.h.1.ln_2.weight"} <= set(no_decay["names"])
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique


def test_llama_groups_untied_head_decayed_embedding_not():
    model = tiny_llama_untied()
    decay, no_decay = param_groups(model, weight_decay=0.01)
    assert "lm_head.weight" in decay["names"]
    assert "model.embed_tokens.weight" in no_decay["names"]
    assert all(n.endswith("norm.weight") or n.endswith(".bias") or n == "model.embed_tokens.weight"
               for n in no_decay["names"])
    assert all(p.ndim == 2 for p in decay["params"])


def test_trainable_params_and_frozen_params_are_respected():
    model = tiny_gpt2()
    head = list(model.transformer.h[1].mlp.parameters())
    groups = param_groups(model, 0.1, trainable_params=head)
    assert sorted(n for g in groups for n in g["names"]) == [
        "transformer.h.1.mlp.c_fc.bias", "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.bias", "transformer.h.1.mlp.c_proj.weight"]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, 0.1)


def test_adamw_decays_exactly_the_decay_group():
    """With zero gradients AdamW's only effect is decoupled decay: p *= 1 - lr * wd on matrices only."""
    model = tiny_gpt2()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(param_groups(model, weight_decay=0.5), lr=0.1)
    assert not opt.defaults.get("fused")  # fused only on CUDA
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n.endswith("weight") and p.ndim == 2 and "wte" not in n \
            and "wpe" not in n else before[n]
        assert torch.allclose(p.detach(), expected, atol=1e-7), n


def test_schedule_values_by_hand():
    # warmup 2 of 10 steps, decay to 0.1 over steps 2..10
    assert lr_factor(0, 2, 10, "cosine", 0.1) == pytest.approx(0.5)
    assert lr_factor(1, 2, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(2, 2, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(6, 2, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5)        # half way: cos = 0
    assert lr_factor(4, 2, 10, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(10, 2, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(4, 2, 10, "linear", 0.1) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_factor(9, 2, 10, "linear", 0.0) == pytest.approx(1 / 8)
    assert lr_factor(7, 0, 10, "constant") == 1.0
    assert lr_factor(0, 0, 10, "linear") == 1.0  # no warmup: the first step at the peak
    with pytest.raises(ValueError, match="schedule 'step' is unknown"):
        lr_factor(0, 0, 10, "step")


def test_scheduler_drives_optimizer_lr():
    model = tiny_gpt2()
    opt = build_optimizer(param_groups(model, 0.0), lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=12, schedule="linear", min_lr_ratio=0.0)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert seen[4:] == pytest.approx([1e-3 * (1 - k / 8) for k in range(8)])
