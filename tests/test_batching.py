"""Batching: hand-computed rows for every mode, the epoch loader, and the key property: packed
and concat rows give every example the loss it has when run alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from posttrain.data.batching import (IGNORE_INDEX, BatchLoader, concat_rows, example_targets, pack_best_fit,
                                     packed_rows, pad_examples)
from posttrain.data.tokenize import TokenizedDataset
from posttrain.models.gpt2 import GPT2Config
from posttrain.models.llama import LlamaConfig
from posttrain.models.registry import build_model

X = IGNORE_INDEX
PAD = 0


def dataset(*examples):
    """Examples as (ids, trainable) with trainable given as a string of 0/1."""
    return TokenizedDataset.from_examples([(ids, [c == "1" for c in flags]) for ids, flags in examples])


# Three examples: a 2-token prompt then a response (trainable), lengths 4, 3, 5.
SMALL = dataset(([11, 12, 13, 14], "0011"), ([21, 22, 23], "011"), ([31, 32, 33, 34, 35], "00111"))


def test_example_targets_are_shifted_and_masked():
    assert example_targets(np.array([11, 12, 13, 14]), np.array([0, 0, 1, 1], bool)).tolist() == [X, 13, 14, X]
    assert example_targets(np.array([5]), np.array([True])).tolist() == [X]


def test_padding_batch_by_hand():
    batch = pad_examples([SMALL[0], SMALL[1]], pad_id=PAD)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, 23, PAD]]
    assert batch["targets"].tolist() == [[X, 13, 14, X], [22, 23, X, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert batch["document_ids"] is None
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "targets", "position_ids"))
    assert pad_examples([SMALL[1]], PAD, pad_to_multiple_of=8, max_length=6)["input_ids"].shape == (1, 6)


def test_packed_rows_by_hand():
    rows = packed_rows(SMALL, max_length=5, pad_id=PAD)
    # stream: 11 12 13 14 | 21 22 23 | 31 32 33 34 35  (12 tokens -> 3 rows of 5, 3 pads)
    assert rows.input_ids.tolist() == [[11, 12, 13, 14, 21], [22, 23, 31, 32, 33], [34, 35, PAD, PAD, PAD]]
    # never a target across examples: 14 -> 21 is not predicted; 21 (end of row 0) predicts 22,
    # which opens row 1 (the cut example continues there)
    assert rows.targets.tolist() == [[X, 13, 14, X, 22], [23, X, X, 33, 34], [35, X, X, X, X]]
    assert rows.document_ids.tolist() == [[0, 0, 0, 0, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert rows.segments == [[(0, 0, 0, 4), (1, 4, 0, 1)], [(1, 0, 1, 2), (2, 2, 0, 3)], [(2, 0, 3, 2)]]


def test_concat_rows_by_hand():
    rows = concat_rows(SMALL, max_length=8, pad_id=PAD)
    # best-fit decreasing: 5 opens row 0, 4 opens row 1 (5 + 4 > 8), 3 fits best into row 0 (3 left)
    assert rows.input_ids.tolist() == [[31, 32, 33, 34, 35, 21, 22, 23], [11, 12, 13, 14, PAD, PAD, PAD, PAD]]
    assert rows.targets.tolist() == [[X, 33, 34, 35, X, 22, 23, X], [X, 13, 14, X, X, X, X, X]]
    assert rows.document_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3]]


def test_pack_best_fit():
    bins = pack_best_fit([5, 4, 3, 3, 2, 1], 8)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert bins == [[0, 2], [1, 3, 5], [4]]  # 5+3 | 4+3+1 | 2: BFD order, each to the fullest fitting bin
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    bins = pack_best_fit(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.1 * sum(lengths) / 128 + 1  # BFD is within ~11/9 OPT; in practice near full
    with pytest.raises(ValueError, match="more than a row holds"):
        pack_best_fit([3, 9], 8)


def test_overlong_examples_are_refused_unless_packed():
    with pytest.raises(ValueError, match="example 2 has 5 tokens > max_length 4"):
        BatchLoader(SMALL, mode="padding", max_length=4)
    with pytest.raises(ValueError, match="truncate"):
        BatchLoader(SMALL, mode="concat", max_length=4)
    assert len(BatchLoader(SMALL, mode="packed", max_length=4, batch_size=1)) == 3


# -- the epoch loader --------------------------------------------------------------------------

def random_dataset(n=40, seed=0, low=3, high=20, vocab=100):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        prompt = int(rng.integers(1, length))
        examples.append((rng.integers(1, vocab, size=length).tolist(), [False] * prompt + [True] * (length - prompt)))
    return TokenizedDataset.from_examples(examples)


@pytest.mark.parametrize("mode", ["padding", "packed", "concat"])
def test_loader_len_order_resume(mode):
    ds = random_dataset()
    loader = BatchLoader(ds, mode=mode, batch_size=4, max_length=32, pad_id=PAD, seed=1)
    epoch0 = list(loader.epoch(0))
    assert len(epoch0) == len(loader) > 0
    again = list(loader.epoch(0))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(epoch0, again))
    epoch1 = list(loader.epoch(1))
    assert len(epoch1) == len(loader)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) or a["input_ids"].shape != b["input_ids"].shape
               for a, b in zip(epoch0, epoch1))  # a new order each epoch
    resumed = list(loader.epoch(0, start=3))
    assert len(resumed) == len(loader) - 3
    assert all(torch.equal(a["targets"], b["targets"]) for a, b in zip(epoch0[3:], resumed))
    # every item exactly once per epoch
    order = loader.batch_order(0)
    assert sorted(np.concatenate(order).tolist()) == list(range(loader.num_items))
    # padding never counts: the targets of an epoch are exactly the dataset's trainable next tokens
    assert sum(int((b["targets"] != X).sum()) for b in epoch0) == ds.num_targets()


def test_loader_shards_ranks_and_drop_last():
    ds = random_dataset(n=22)
    full = BatchLoader(ds, batch_size=4, max_length=32, shuffle=False)
    assert len(full) == 6
    assert len(BatchLoader(ds, batch_size=4, max_length=32, drop_last=True)) == 5
    r0 = BatchLoader(ds, batch_size=4, max_length=32, rank=0, world_size=2)
    r1 = BatchLoader(ds, batch_size=4, max_length=32, rank=1, world_size=2)
    assert len(r0) == len(r1) == 3
    seen0 = np.concatenate(r0.batch_order(0)).tolist()
    seen1 = np.concatenate(r1.batch_order(0)).tolist()
    assert not set(seen0) & set(seen1)


def test_group_by_length_cuts_padding():
    ds = random_dataset(n=400, low=2, high=60)
    plain = BatchLoader(ds, batch_size=8, max_length=64, seed=0)
    grouped = BatchLoader(ds, batch_size=8, max_length=64, seed=0, group_by_length=True)
    assert len(plain) == len(grouped)
    assert grouped.stats["fill"] > plain.stats["fill"] + 0.1
    assert sorted(np.concatenate(grouped.batch_order(0)).tolist()) == list(range(400))


# -- the key property: per-example losses equal those of examples run alone --------------------

def tiny_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    else:
        config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return build_model(config).eval()


def loss_alone(model, ids, targets) -> torch.Tensor:
    logits = model(torch.as_tensor(np.asarray(ids, dtype=np.int64))[None])
    return F.cross_entropy(logits[0], torch.as_tensor(targets), ignore_index=X, reduction="sum")


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["concat", "packed"])
@torch.no_grad()
def test_packed_losses_equal_examples_run_one_by_one(kind, mode):
    model = tiny_model(kind)
    ds = random_dataset(n=24, seed=1, low=3, high=24)
    loader = BatchLoader(ds, mode=mode, batch_size=3, max_length=32, pad_id=PAD, seed=0)
    rows = loader.rows

    # Per-example losses from the packed batches (in the loader's shuffled order).
    packed = torch.zeros(len(ds), dtype=torch.float64)
    for idx in loader.batch_order(0):
        batch = loader.collate(idx)
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], document_ids=batch["document_ids"])
        token_loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=X,
                                     reduction="none").view(batch["targets"].shape)
        for b, r in enumerate(idx):
            for example, start, _, n in rows.segments[r]:
                packed[example] += token_loss[b, start:start + n].sum().double()

    # The same examples one by one. In packed mode an example cut at a row boundary is, by
    # design, two documents: its second piece starts a row without seeing the first.
    alone = torch.zeros(len(ds), dtype=torch.float64)
    whole = torch.zeros(len(ds), dtype=torch.float64)
    for i in range(len(ds)):
        ids, trainable = ds[i]
        targets = example_targets(ids, trainable)
        whole[i] = loss_alone(model, ids, targets).double()
    for segs in rows.segments:
        for example, _, offset, n in segs:
            ids, trainable = ds[example]
            targets = example_targets(ids, trainable)
            if n < len(ids):  # the piece predicts the next token of its example, even across the cut
                targets = targets.copy()
                if offset + n < len(ids) and trainable[offset + n]:
                    targets[offset + n - 1] = ids[offset + n]
            alone[example] += loss_alone(model, ids[offset:offset + n], targets[offset:offset + n]).double()

    assert torch.allclose(packed, alone, atol=1e-5, rtol=0)
    cut = {ex for segs in rows.segments for ex, _, _, n in segs if n < len(ds[ex][0])}
    if mode == "concat":
        assert not cut  # concat never splits an example: identical to the examples alone
    else:
        assert cut  # this data does cut some examples
    uncut = [i for i in range(len(ds)) if i not in cut]
    assert torch.allclose(packed[uncut], whole[uncut], atol=1e-5, rtol=0)
    n_targets = sum(int((loader.collate(idx)["targets"] != X).sum()) for idx in loader.batch_order(0))
    assert n_targets == ds.num_targets()  # packing loses no target and adds none


@torch.no_grad()
def test_padding_losses_equal_examples_run_one_by_one():
    model = tiny_model("llama")
    ds = random_dataset(n=10, seed=2)
    loader = BatchLoader(ds, mode="padding", batch_size=4, max_length=32, pad_id=PAD, group_by_length=True)
    for idx in loader.batch_order(0):
        batch = loader.collate(idx)
        logits = model(batch["input_ids"], position_ids=batch["position_ids"])
        token_loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=X,
                                     reduction="none").view(batch["targets"].shape)
        for b, i in enumerate(idx):
            ids, trainable = ds[int(i)]
            assert abs(token_loss[b].sum() - loss_alone(model, ids, example_targets(ids, trainable))) < 1e-5
