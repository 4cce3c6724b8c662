"""Classification heads: the LM head replaced (GPT-2 untied from its embedding), the freezing policies
checked by training (which parameters change, which stay bit-identical), and each pooling choosing the
right positions under left and right padding, with padded rows giving the same logits as unpadded ones."""

import numpy as np
import pytest
import torch

from posttrain.models.heads import (add_classification_head, classifier_logits, last_real_index, pool,
                                    register_trainable_policy, trainable_parameters, TRAINABLE_POLICIES)
from posttrain.train.classify import ClassificationBatches, classification_loss, collate
from posttrain.train.loop import TrainConfig, train


def test_head_replaces_the_lm_head(make_tiny_model):
    for kind in ("gpt2", "llama", "llama3"):
        model = make_tiny_model(kind)
        embedding = (model.transformer.wte if kind == "gpt2" else model.model.embed_tokens).weight
        before = embedding.detach().clone()
        ids = torch.randint(0, 256, (2, 7))
        hidden = model.hidden(ids)
        head = add_classification_head(model, 3)
        assert model.lm_head is head and tuple(head.weight.shape) == (3, 64) and head.bias is None
        assert head.weight.data_ptr() != embedding.data_ptr()  # untied: training the head leaves wte alone
        assert torch.equal(embedding, before) and torch.equal(model.hidden(ids), hidden)
        assert tuple(model(ids).shape) == (2, 7, 3)
        assert 0.005 < head.weight.std().item() < 0.05  # the models' own init (std 0.02)
    assert add_classification_head(make_tiny_model("gpt2"), 2, bias=True).bias.abs().sum() == 0
    with pytest.raises(ValueError, match="at least 2 classes"):
        add_classification_head(make_tiny_model("gpt2"), 1)


def names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_policies_select_the_documented_parameters(make_tiny_model):
    gpt2 = make_tiny_model("gpt2")
    add_classification_head(gpt2, 2)
    assert names(gpt2, trainable_parameters(gpt2, "head")) == {"lm_head.weight"}
    last1 = names(gpt2, trainable_parameters(gpt2, "last-k", 1))
    assert last1 == {n for n, _ in gpt2.named_parameters() if n.startswith(("transformer.h.1.", "transformer.ln_f."))} \
        | {"lm_head.weight"}
    assert len(last1) == 12 + 2 + 1
    assert {n for n in names(gpt2, trainable_parameters(gpt2, "last-k", 2))} >= {"transformer.h.0.attn.c_attn.weight"}
    assert names(gpt2, trainable_parameters(gpt2, "last-k", 0)) == {"transformer.ln_f.weight", "transformer.ln_f.bias",
                                                                     "lm_head.weight"}
    assert names(gpt2, trainable_parameters(gpt2, "all")) == {n for n, _ in gpt2.named_parameters()}

    llama = make_tiny_model("llama")
    add_classification_head(llama, 2)
    assert names(llama, trainable_parameters(llama, "last-k", 1)) == {
        n for n, _ in llama.named_parameters() if n.startswith(("model.layers.1.", "model.norm.", "lm_head."))}
    with pytest.raises(ValueError, match="last_k must be between 0 and the model's 2 blocks"):
        trainable_parameters(llama, "last-k", 3)
    with pytest.raises(ValueError, match="trainable 'bitfit' is unknown; choose one of: head, last-k, all, lora"):
        trainable_parameters(llama, "bitfit")
    # Without adapters "lora" is refused: by the placeholder, or by posttrain.lora once it registered itself.
    with pytest.raises((NotImplementedError, ValueError), match=r"posttrain\.lora|no adapters"):
        trainable_parameters(llama, "lora")


def test_the_lora_hook_can_be_registered(make_tiny_model):
    model = make_tiny_model("llama")
    add_classification_head(model, 2)
    saved = TRAINABLE_POLICIES["lora"]
    try:
        register_trainable_policy("lora", lambda m, k: [m.model.norm.weight, *m.lm_head.parameters()])
        assert names(model, trainable_parameters(model, "lora")) == {"model.norm.weight", "lm_head.weight"}
    finally:
        register_trainable_policy("lora", saved)


def tiny_batches(seed: int = 0) -> ClassificationBatches:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, 256, size=rng.integers(3, 12)) for _ in range(16)]
    labels = [int(x[0] % 2) for x in ids]
    return ClassificationBatches(ids, labels, 8, pad_id=256, shuffle=True, seed=0)


@pytest.mark.parametrize("kind, policy", [("gpt2", "head"), ("gpt2", "last-k"), ("gpt2", "all"), ("llama", "last-k")])
def test_training_changes_exactly_the_trainable_parameters(make_tiny_model, tmp_path, kind, policy):
    model = make_tiny_model(kind)
    add_classification_head(model, 2)
    params = trainable_parameters(model, policy, last_k=1)
    trained = names(model, params)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(lr=1e-2, weight_decay=0.1, max_steps=3, progress=False, tensorboard=False, device="cpu")
    train(model, config, tiny_batches(), classification_loss("last-nonpad"), tmp_path / "run",
          trainable_params=params)
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), f"{n} should have trained"
        else:
            assert torch.equal(p, before[n]), f"{n} should be frozen (bit-identical)"
    assert len(trained) < len(before) or policy == "all"


# -- pooling ------------------------------------------------------------------------------------

def test_pool_picks_the_right_positions():
    B, T, C = 3, 5, 2
    hidden = torch.arange(B * T, dtype=torch.float32).view(B, T, 1).expand(B, T, C)  # value = row * T + slot
    lengths = [5, 3, 1]
    right = torch.tensor([[t < n for t in range(T)] for n in lengths])
    left = torch.tensor([[t >= T - n for t in range(T)] for n in lengths])
    assert last_real_index(right).tolist() == [4, 2, 0] and last_real_index(left).tolist() == [4, 4, 4]
    assert pool(hidden, right, "last-nonpad")[:, 0].tolist() == [4, 7, 10]
    assert pool(hidden, left, "last-nonpad")[:, 0].tolist() == [4, 9, 14]
    assert pool(hidden, right, "last")[:, 0].tolist() == [4, 9, 14]  # the last slot, pad or not
    assert pool(hidden, left, "last")[:, 0].tolist() == [4, 9, 14]
    assert pool(hidden, right, "mean")[:, 0].tolist() == pytest.approx([2.0, 6.0, 10.0])  # mean of 5..7 = 6
    assert pool(hidden, left, "mean")[:, 0].tolist() == pytest.approx([2.0, 8.0, 14.0])  # mean of 7..9 = 8
    with pytest.raises(ValueError, match="pooling 'max' is unknown"):
        pool(hidden, right, "max")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", ["last-nonpad", "mean"])
def test_padded_rows_give_the_logits_of_the_text_alone(make_tiny_model, kind, side, pooling):
    """Pads are invisible: positions start at each text's first token, no real token attends to a pad."""
    model = make_tiny_model(kind)
    add_classification_head(model, 3)
    rng = np.random.default_rng(1)
    texts = [rng.integers(0, 256, size=n) for n in (9, 4, 1, 6)]
    batch = collate(texts, pad_id=256, padding_side=side)
    assert batch["input_ids"].shape == (4, 9)
    if side == "left":
        assert batch["position_ids"][1].tolist() == [0, 0, 0, 0, 0, 0, 1, 2, 3]
        assert batch["document_ids"][1].tolist() == [-1] * 5 + [0] * 4
    with torch.no_grad():
        padded = classifier_logits(model, batch, pooling)
        alone = torch.cat([classifier_logits(model, collate([t], 256, side), pooling) for t in texts])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_last_pooling_under_left_padding_equals_last_nonpad(make_tiny_model):
    model = make_tiny_model("gpt2")
    add_classification_head(model, 2)
    texts = [np.arange(1, 8), np.arange(3, 6)]
    batch = collate(texts, pad_id=256, padding_side="left")
    with torch.no_grad():
        torch.testing.assert_close(classifier_logits(model, batch, "last"),
                                   classifier_logits(model, batch, "last-nonpad"))
        right = collate(texts, pad_id=256, padding_side="right")
        # with right padding `last` reads a pad slot for the short row: not the text's last token
        last, last_real = classifier_logits(model, right, "last"), classifier_logits(model, right, "last-nonpad")
        assert not torch.allclose(last[1], last_real[1])
