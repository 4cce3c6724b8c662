"""Tokenized examples -> batches of tensors: padding, packed, or concat (best-fit decreasing).

Every batch is a dict of torch tensors:

- `input_ids` (B, T) long
- `targets` (B, T) long: already shifted, `targets[:, t]` is the token position t must predict
  when that token is trainable, else -100. A target never crosses a document: the last token of
  an example predicts nothing.
- `position_ids` (B, T) long: restart at 0 for every document of a row.
- `document_ids` (B, T) long, or None in padding mode: the model lets a token attend only to
  earlier tokens with the same id, so packed examples never see each other.
- `num_tokens` int: the real (non-pad) tokens of the batch; the loop counts tokens seen and
  tokens/s with it.

Modes:

- `padding`: one example per row, padded on the right to the longest in the batch (pads:
  `pad_id`, target -100, and since they come last, causal attention keeps real tokens from
  seeing them). Optional length-grouped sampling cuts padding.
- `packed`: all examples concatenated in order and cut into rows of exactly max_length. An
  example cut at a row boundary continues in the next row as a new document: its positions
  restart at 0 there and it cannot see its beginning (the price of zero padding). Its token at
  the end of the first row still predicts the first token of the next row, so every token of
  the stream is predicted exactly once.
- `concat`: whole examples placed into rows of max_length by best-fit decreasing
  (`pack_best_fit`); none is split, so the loss per example equals running it alone.

The tail of a row that examples do not fill is padding with its own document id and targets
-100. Examples longer than max_length must be truncated or dropped before (see
posttrain.data.tokenize: `overlong`); padding and concat modes refuse them, packed cuts them.

`BatchLoader` yields the batches of an epoch in a seeded order with `len()` known up front and
can start at any batch (resume).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
MODES = ("padding", "packed", "concat")


def example_targets(ids: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """Shifted targets of one example: ids[t + 1] where that token is trainable, else -100."""
    ids = np.asarray(ids, dtype=np.int64)
    targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    if len(ids) > 1:
        targets[:-1] = np.where(np.asarray(trainable[1:], dtype=bool), ids[1:], IGNORE_INDEX)
    return targets


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices by best-fit decreasing: longest first, each into the fullest bin
    that still has room (or a new bin). Every length must be <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row holds ({capacity}); "
                             f"truncate or drop over-long examples first")
        k = bisect.bisect_left(free, (n, -1))  # the bin with the least room that still fits
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


@dataclass
class Rows:
    """Pre-built rows (packed and concat modes) and which example pieces each row holds.

    segments[r]: (example index, start in row, start in example, length) of each document.
    """
    input_ids: np.ndarray
    targets: np.ndarray
    position_ids: np.ndarray
    document_ids: np.ndarray
    segments: list[list[tuple[int, int, int, int]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


def _row_layout(example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Document ids and positions of (R, T) rows from the example index of each slot (-1: pad)."""
    R, T = example.shape
    starts = np.ones((R, T), dtype=bool)
    starts[:, 1:] = example[:, 1:] != example[:, :-1]
    document_ids = np.cumsum(starts, axis=1) - 1
    cols = np.broadcast_to(np.arange(T), (R, T))
    start_col = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
    return document_ids, cols - start_col


def _segments(example: np.ndarray, offset_in_example: np.ndarray) -> list[list[tuple[int, int, int, int]]]:
    out = []
    for ex_row, off_row in zip(example, offset_in_example):
        change = np.flatnonzero(np.r_[True, ex_row[1:] != ex_row[:-1]])
        ends = np.r_[change[1:], len(ex_row)]
        out.append([(int(ex_row[a]), int(a), int(off_row[a]), int(b - a))
                    for a, b in zip(change, ends) if ex_row[a] >= 0])
    return out


def packed_rows(dataset, max_length: int, pad_id: int) -> Rows:
    """Packed mode: the examples as one stream cut into rows of max_length (see module doc)."""
    ids = np.asarray(dataset.ids, dtype=np.int64)
    trainable = np.asarray(dataset.trainable, dtype=bool)
    lengths = np.asarray(dataset.lengths)
    S = len(ids)
    example = np.repeat(np.arange(len(lengths)), lengths)
    offset = np.arange(S) - np.repeat(np.asarray(dataset.offsets[:-1]), lengths)
    targets = np.full(S, IGNORE_INDEX, dtype=np.int64)
    same = (example[1:] == example[:-1]) & trainable[1:]  # never predict across examples
    targets[:-1] = np.where(same, ids[1:], IGNORE_INDEX)

    R = -(-S // max_length)
    pad = R * max_length - S

    def shape(a, fill):
        return np.concatenate([a, np.full(pad, fill, dtype=a.dtype)]).reshape(R, max_length)

    example_rows = shape(example, -1)
    document_ids, position_ids = _row_layout(example_rows)
    return Rows(shape(ids, pad_id), shape(targets, IGNORE_INDEX), position_ids, document_ids,
                _segments(example_rows, shape(offset, 0)))


def concat_rows(dataset, max_length: int, pad_id: int) -> Rows:
    """Concat mode: whole examples in rows of max_length by best-fit decreasing."""
    bins = pack_best_fit([int(n) for n in dataset.lengths], max_length)
    R = len(bins)
    input_ids = np.full((R, max_length), pad_id, dtype=np.int64)
    targets = np.full((R, max_length), IGNORE_INDEX, dtype=np.int64)
    example = np.full((R, max_length), -1, dtype=np.int64)
    for r, members in enumerate(bins):
        col = 0
        for i in members:
            ids, trainable = dataset[i]
            n = len(ids)
            input_ids[r, col:col + n] = ids
            targets[r, col:col + n] = example_targets(ids, trainable)
            example[r, col:col + n] = i
            col += n
    document_ids, position_ids = _row_layout(example)
    return Rows(input_ids, targets, position_ids, document_ids, _segments(example, np.zeros_like(example)))


def pad_examples(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int,
                 pad_to_multiple_of: int | None = None, max_length: int | None = None) -> dict:
    """Padding mode: one example per row, right-padded to the longest (optionally rounded up)."""
    longest = max(len(ids) for ids, _ in examples)
    T = longest
    if pad_to_multiple_of:
        T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        if max_length is not None:
            T = max(longest, min(T, max_length))  # rounding up must not exceed the model's positions
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, trainable) in enumerate(examples):
        input_ids[r, :len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        targets[r, :len(ids)] = torch.from_numpy(example_targets(ids, trainable))
    position_ids = torch.arange(T).expand(len(examples), T).clone()
    return {"input_ids": input_ids, "targets": targets, "position_ids": position_ids, "document_ids": None,
            "num_tokens": sum(len(ids) for ids, _ in examples)}


class BatchLoader:
    """Batches of one epoch in a seeded order; `len()` is the number of batches per epoch.

    dataset: a TokenizedDataset (or anything with ids/trainable/offsets/lengths and [i]).
    mode: padding | packed | concat. Rows (packed/concat) are built once; epochs shuffle rows.
    group_by_length (padding): batches of similar lengths, drawn from shuffled mega-batches of
      50 batches (as Hugging Face's LengthGroupedSampler), batch order shuffled.
    rank/world_size: each rank takes every world_size-th batch; all ranks get len() batches.
    """

    def __init__(self, dataset, mode: str = "padding", batch_size: int = 8, max_length: int = 1024,
                 pad_id: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 group_by_length: bool = False, pad_to_multiple_of: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if mode not in MODES:
            raise ValueError(f"batching mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} of {world_size}")
        self.dataset, self.mode, self.batch_size, self.max_length = dataset, mode, batch_size, max_length
        self.pad_id, self.shuffle, self.seed, self.drop_last = pad_id, shuffle, seed, drop_last
        self.group_by_length, self.pad_to_multiple_of = group_by_length, pad_to_multiple_of
        self.rank, self.world_size = rank, world_size
        lengths = np.asarray(dataset.lengths)
        if mode != "packed" and len(lengths) and lengths.max() > max_length:
            worst = int(np.argmax(lengths))
            raise ValueError(f"example {worst} has {int(lengths[worst])} tokens > max_length {max_length} "
                             f"({int((lengths > max_length).sum())} such); tokenize with overlong='truncate' "
                             f"or 'drop', or use mode='packed'")
        self.rows = None
        if mode == "packed":
            self.rows = packed_rows(dataset, max_length, pad_id)
        elif mode == "concat":
            self.rows = concat_rows(dataset, max_length, pad_id)
        self.num_items = len(self.rows) if self.rows is not None else len(lengths)
        if self.num_items == 0:
            raise ValueError("no examples to batch")

    def __len__(self) -> int:
        n = self.num_items // self.batch_size if self.drop_last else -(-self.num_items // self.batch_size)
        return n // self.world_size

    @property
    def stats(self) -> dict:
        """Rows and how full they are (the share of slots holding real tokens)."""
        lengths = np.asarray(self.dataset.lengths)
        real = int(lengths.sum())
        if self.rows is not None:
            slots = self.rows.input_ids.size
        else:  # padding: every row of a batch is as long as its longest example (epoch 0's batches)
            slots = sum(len(b) * int(lengths[b].max()) for b in self.batch_order(0))
            real = sum(int(lengths[b].sum()) for b in self.batch_order(0))
        return {"mode": self.mode, "items": self.num_items, "batches": len(self), "fill": real / max(slots, 1)}

    def batch_order(self, epoch: int = 0) -> list[np.ndarray]:
        """Item (row or example) indices of this rank's batches in `epoch`."""
        rng = np.random.default_rng([self.seed, epoch])
        n, B = self.num_items, self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.mode == "padding" and self.group_by_length:
            lengths = np.asarray(self.dataset.lengths)
            mega = B * 50
            order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                    for chunk in np.split(order, list(range(mega, n, mega)))])
        batches = [order[i:i + B] for i in range(0, n, B)]
        if self.drop_last and batches and len(batches[-1]) < B:
            batches.pop()
        if self.mode == "padding" and self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[self.rank::self.world_size][:len(self)]

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        """The batches of `epoch` from batch `start` on (to resume after `start` batches)."""
        for idx in self.batch_order(epoch)[start:]:
            yield self.collate(idx)

    def __iter__(self) -> Iterator[dict]:
        return self.epoch(0)

    def collate(self, idx: np.ndarray) -> dict:
        if self.rows is None:
            return pad_examples([self.dataset[int(i)] for i in idx], self.pad_id, self.pad_to_multiple_of,
                                self.max_length)
        r = self.rows
        return {"input_ids": torch.from_numpy(r.input_ids[idx]), "targets": torch.from_numpy(r.targets[idx]),
                "position_ids": torch.from_numpy(r.position_ids[idx]),
                "document_ids": torch.from_numpy(r.document_ids[idx]),
                "num_tokens": sum(seg[3] for i in idx for seg in r.segments[int(i)])}
