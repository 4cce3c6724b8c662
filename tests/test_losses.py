"""The SFT loss against full-logit cross-entropy and a hand computation; the unit-count contract."""

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.models.gpt2 import GPT2Config
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import build_model
from posttrain.train.losses import IGNORE_INDEX, count_targets, count_units, counts, sft_loss

VOCAB = 97


def tiny(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        return build_model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64))
    return build_model(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False))


def packed_batch():
    """Two rows; row 0 packs two documents with their own positions; prompts and padding are -100."""
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12))
    targets = torch.randint(0, VOCAB, (2, 12))
    targets[0, :3] = IGNORE_INDEX      # prompt of document 0
    targets[0, 6:8] = IGNORE_INDEX     # prompt of document 1
    targets[1, :5] = IGNORE_INDEX
    targets[1, 10:] = IGNORE_INDEX     # padding
    document_ids = torch.tensor([[0] * 6 + [1] * 6, [0] * 10 + [1] * 2])
    position_ids = torch.tensor([list(range(6)) * 2, list(range(10)) + [0, 1]])
    return {"input_ids": ids, "targets": targets, "position_ids": position_ids, "document_ids": document_ids}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sft_loss_equals_full_logit_cross_entropy(family):
    model, batch = tiny(family), packed_batch()
    loss_sum, n, metrics = sft_loss(model, batch)
    logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])  # (B, T, V)
    full = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    assert int(n) == 7 + 5 == count_targets(batch)  # 7 trained in row 0, 5 in row 1
    assert torch.allclose(loss_sum, full, rtol=1e-6, atol=1e-5)
    assert metrics == {}
    # gradients agree too: the masked head is the same function, only cheaper
    g_masked = torch.autograd.grad(loss_sum, model.lm_head.weight)[0]
    logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"])
    full = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    g_full = torch.autograd.grad(full, model.lm_head.weight)[0]
    assert torch.allclose(g_masked, g_full, atol=1e-6)


def test_sft_loss_by_hand():
    """-log softmax(logits)[target] summed over trained positions, written out with math.exp."""
    model, batch = tiny("gpt2"), packed_batch()
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch["document_ids"]).double()
        loss_sum, n, _ = sft_loss(model, batch)
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(12):
            y = int(batch["targets"][b, t])
            if y == IGNORE_INDEX:
                continue
            row = logits[b, t].tolist()
            m = max(row)
            expected += m + math.log(sum(math.exp(v - m) for v in row)) - row[y]
            count += 1
    assert int(n) == count == 12
    assert abs(loss_sum.item() - expected) < 1e-4


def test_count_units_defaults_to_targets_and_follows_counts_decorator():
    batch = packed_batch()
    assert count_units(sft_loss, batch) == 12

    @counts(lambda b: b["input_ids"].shape[0])
    def per_example(model, b):
        return torch.zeros(()), b["input_ids"].shape[0], {}

    assert count_units(per_example, batch) == 2
