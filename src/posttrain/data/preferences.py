"""Preference pairs -> token ids with response masks -> batches for DPO and its relatives.

    data = prepare_preference_data("instruction-data-with-preference.json", tokenizer, style="alpaca")
    loader = PairLoader(data.train, mode="padding", batch_size=8, max_length=1024, pad_id=tokenizer.pad_id)

Records (posttrain.data.formats.to_preference): instruction/input(/output)/chosen/rejected (the
prompt rendered with the run's prompt style), prompt/chosen/rejected, or chat form (`messages` as
the prompt, `chosen`/`rejected` as assistant turns: strings or lists of assistant messages). Pairs
whose chosen equals rejected carry no preference signal and are dropped and counted.

Tokenizing. A pair becomes two sequences, prompt + chosen and prompt + rejected, each rendered by
the prompt style as a whole conversation; the prompt rendered alone (with the generation prompt)
must be a prefix of both, and the response mask is the style's trainable flags after that prefix
(the reply and its end-of-turn token; never the prompt). Over-long sequences: `truncate` cuts the
response to fit, `drop` drops the pair; a prompt that leaves no room for a single response token
is an error naming the record, or a counted skip with `skip_invalid` or `overlong="drop"`.
Sequences are stored interleaved in one `TokenizedDataset` (2i: chosen, 2i + 1: rejected), cached
on disk like SFT data.

Batches (`collate_pairs`): the chosen and rejected sequences of P pairs go through the model in ONE
forward pass:

- `input_ids`, `targets` (shifted; -100 off the response), `position_ids` (R, T) long;
  `document_ids` (R, T) long in packed mode, None in padding mode;
- `sequence_ids` (R, T) long: at every target, which sequence it belongs to: j for the chosen
  response of the batch's pair j, P + j for its rejected one; -1 elsewhere;
- `pair_ids` (P,) long: the pairs' indices in the dataset (the loss counts pairs by it);
- `reference_logps` (P, 2) float, when the loader holds cached reference log-probs: summed
  log-probs of the (chosen, rejected) responses under the reference model.

Modes: `padding`, one sequence per row (2P rows, right padding; causal attention keeps real tokens
from seeing the pads), and `packed`, whole pairs (chosen then rejected, two documents) placed into
rows by best-fit decreasing, with per-document positions and document ids so that nothing attends
across sequences: the same log-probs as padding mode with less padding.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from posttrain.data.batching import IGNORE_INDEX, example_targets, pack_best_fit
from posttrain.data.formats import FormatStats, InvalidRecord, Messages, Preference, to_preference
from posttrain.data.sources import DEFAULT_SPLIT, DataError, Record, load_records, split_records
from posttrain.data.tokenize import TokenizedDataset, _content_hash, cached, tokenizer_fingerprint
from posttrain.prompts import PromptStyle, get_style

PAIR_OVERLONG = ("truncate", "drop")
PAIR_MODES = ("padding", "packed")


@dataclass
class PreferencePairs:
    """Tokenized pairs: `sequences` holds 2 N examples, 2i the chosen and 2i + 1 the rejected sequence
    of pair i, each with trainable = response token. `prompts`: the split's prompt messages (samples)."""
    sequences: TokenizedDataset
    prompts: list[Messages] = field(default_factory=list)
    references: list[str] = field(default_factory=list)  # the chosen replies, beside samples

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def chosen(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sequences[2 * i]

    def rejected(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sequences[2 * i + 1]

    @property
    def lengths(self) -> np.ndarray:
        """(N, 2): tokens of the chosen and rejected sequence of each pair (prompt included)."""
        return self.sequences.lengths.reshape(-1, 2)

    @property
    def stats(self) -> dict:
        return self.sequences.stats

    def num_response_tokens(self) -> int:
        return int(self.sequences.trainable.sum())


# ----------------------------------------------------------------------------------------------
# Records -> preference triples (with where they came from)

def records_to_pairs(records: Sequence[Record], skip_invalid: bool = False
                     ) -> tuple[list[Preference], list[str], FormatStats]:
    """Preference triples, where each came from (for later errors), and counts.

    As posttrain.data.formats.records_to_preferences, keeping each pair's record location:
    missing or empty chosen/rejected raise InvalidRecord naming the record (or, with
    `skip_invalid`, are counted); pairs with chosen == rejected are dropped and counted.
    """
    stats, pairs, where = FormatStats(), [], []
    for record in records:
        stats.records += 1
        try:
            pref = to_preference(record)
        except InvalidRecord as e:
            if not skip_invalid:
                raise
            stats.skipped[e.reason] += 1
            continue
        if [m["content"] for m in pref.chosen] == [m["content"] for m in pref.rejected]:
            stats.identical_pairs += 1  # no preference signal: every DPO-style loss is constant on it
            continue
        pairs.append(pref)
        where.append(record.where())
    stats.examples = len(pairs)
    if not pairs:
        source = records[0].source if records else "the dataset"
        raise DataError(f"{source}: no preference pairs left ({stats.summary()}); expected records with "
                        f"chosen and rejected plus instruction, prompt or messages")
    return pairs, where, stats


# ----------------------------------------------------------------------------------------------
# Tokenizing

def render_pair(pref: Preference, style: PromptStyle) -> tuple[int, list[tuple[list[int], list[bool]]]]:
    """(prompt length, [(ids, response mask) of prompt + chosen, of prompt + rejected])."""
    prompt_ids, _ = style.render(pref.prompt, add_generation_prompt=True)
    out = []
    for reply in (pref.chosen, pref.rejected):
        ids, trainable = style.render(pref.prompt + reply)
        if list(ids[:len(prompt_ids)]) != list(prompt_ids):
            raise ValueError(f"prompt style {style.name!r} renders the prompt differently alone and before a "
                             f"reply, so the response cannot be located by tokens; use another style")
        mask = [False] * len(prompt_ids) + [bool(t) for t in trainable[len(prompt_ids):]]
        out.append((list(ids), mask))
    return len(prompt_ids), out


def tokenize_pairs(pairs: Sequence[Preference], style: PromptStyle, max_length: int | None = None,
                   overlong: str = "truncate", skip_invalid: bool = False,
                   where: Sequence[str] | None = None) -> TokenizedDataset:
    """Both sequences of every pair, interleaved (2i chosen, 2i + 1 rejected), response-masked.

    Over max_length: `truncate` cuts the responses, `drop` drops the pair; both counted. A prompt
    of max_length tokens or more leaves no room for a response: DataError naming the record, or
    counted as `skipped_prompt_too_long` with skip_invalid / overlong="drop".
    """
    if overlong not in PAIR_OVERLONG:
        raise ValueError(f"overlong must be one of {PAIR_OVERLONG} for preference pairs, got {overlong!r}")
    if style.loss_on != "response":
        style = get_style(style.name, style.tokenizer, "response")  # trainable flags = the reply only
    out, counts = [], Counter()
    for i, pref in enumerate(pairs):
        prompt_len, seqs = render_pair(pref, style)
        if max_length is not None and prompt_len >= max_length:
            if skip_invalid or overlong == "drop":
                counts["skipped_prompt_too_long"] += 1
                continue
            at = where[i] if where is not None else f"pair {i}"
            raise DataError(f"{at}: the prompt has {prompt_len} tokens, which leaves no room for a response "
                            f"within max_length {max_length}. Raise max_length, shorten the prompt, or pass "
                            f"skip_invalid=True (CLI: --data.skip_invalid true) to skip and count such pairs")
        if max_length is not None and any(len(ids) > max_length for ids, _ in seqs):
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
            seqs = [(ids[:max_length], mask[:max_length]) for ids, mask in seqs]
        out.extend(seqs)
    stats = {"pairs": len(out) // 2, **counts}
    if not out:
        raise DataError(f"no preference pairs left after tokenizing ({stats}); raise max_length")
    return TokenizedDataset.from_examples(out, stats)


def tokenize_pairs_cached(pairs: Sequence[Preference], style: PromptStyle, max_length: int | None,
                          overlong: str = "truncate", skip_invalid: bool = False,
                          where: Sequence[str] | None = None, cache: str | Path | bool | None = True
                          ) -> TokenizedDataset:
    key = {"kind": "preferences", "data": _content_hash([asdict(p) for p in pairs]),
           "tokenizer": tokenizer_fingerprint(style.tokenizer), "style": style.name, "max_length": max_length,
           "overlong": overlong, "skip_invalid": skip_invalid}
    return cached(key, lambda: tokenize_pairs(pairs, style, max_length, overlong, skip_invalid, where), cache)


# ----------------------------------------------------------------------------------------------
# The pipeline: source -> records -> pairs -> tokens, per split

@dataclass
class PreferenceData:
    """Tokenized train/val/test pairs, the style that rendered them, and what happened to the records."""
    train: PreferencePairs
    val: PreferencePairs | None
    test: PreferencePairs | None
    style: PromptStyle
    report: dict

    def summary(self) -> str:
        lines = []
        for name in ("train", "val", "test"):
            pairs = getattr(self, name)
            if pairs is not None:
                extra = ", ".join(f"{k} {v}" for k, v in self.report.get(name, {}).items() if k != "pairs" and v)
                lines.append(f"{name}: {len(pairs)} pairs, {int(pairs.lengths.sum())} tokens, "
                             f"{pairs.num_response_tokens()} response tokens{'; ' + extra if extra else ''}")
        return "\n".join(lines)


def _tokenize_split(records, style: PromptStyle, max_length: int, overlong: str, skip_invalid: bool,
                    cache) -> tuple[PreferencePairs, dict]:
    pairs, where, fstats = records_to_pairs(records, skip_invalid)
    sequences = tokenize_pairs_cached(pairs, style, max_length, overlong, skip_invalid, where, cache)
    report = {"records": fstats.records, **sequences.stats}
    if fstats.identical_pairs:
        report["dropped_identical"] = fstats.identical_pairs
    if fstats.skipped:
        report["skipped_invalid"] = dict(fstats.skipped)
    references = [" ".join(m["content"] for m in p.chosen) for p in pairs]
    return PreferencePairs(sequences, [p.prompt for p in pairs], references), report


def prepare_preference_data(data: str, tokenizer, style: str | PromptStyle = "alpaca", max_length: int = 1024,
                            val_data: str | None = None, test_data: str | None = None,
                            split: tuple[float, float, float] = DEFAULT_SPLIT, shuffle: bool = False,
                            seed: int = 0, skip_invalid: bool = False, overlong: str = "truncate",
                            cache: str | Path | bool | None = True) -> PreferenceData:
    """Load, split, check and tokenize a preference dataset.

    data: local file/folder, http(s) URL or hub dataset id. val_data/test_data: separate files (then
    `data` is all training data); otherwise `data` is split by `split` (train, test, val fractions,
    in order unless `shuffle`). style: a prompt style name (or a ready PromptStyle). A style may add
    special tokens (chatml on GPT-2): resize the model afterwards (prompts.resize_model_for_tokenizer).
    """
    if overlong not in PAIR_OVERLONG:
        raise ValueError(f"overlong must be one of {PAIR_OVERLONG} for preference pairs, got {overlong!r}")
    style = (style if isinstance(style, PromptStyle) and style.loss_on == "response"
             else get_style(style.name if isinstance(style, PromptStyle) else style, tokenizer, "response"))
    records = load_records(data)
    if val_data is not None or test_data is not None:
        splits = {"train": records,
                  "val": load_records(val_data, split="validation") if val_data else [],
                  "test": load_records(test_data, split="test") if test_data else []}
    else:
        splits = split_records(records, split, shuffle, seed)
    out, report = {}, {}
    for name, recs in splits.items():
        if not recs:
            out[name] = None
            continue
        try:
            out[name], report[name] = _tokenize_split(recs, style, max_length, overlong, skip_invalid, cache)
        except DataError as e:
            raise DataError(f"{name} split: {e}") from None
    if out.get("train") is None:
        raise DataError(f"{data}: the train split is empty; check the data and the split fractions {split}")
    return PreferenceData(out["train"], out.get("val"), out.get("test"), style, report)


# ----------------------------------------------------------------------------------------------
# Batching

def collate_pairs(pairs: PreferencePairs, idx: Sequence[int], pad_id: int, mode: str = "padding",
                  row_capacity: int | None = None, reference_logps: torch.Tensor | None = None,
                  pad_to_multiple_of: int | None = None) -> dict:
    """One batch holding both sequences of the pairs `idx` (see the module doc for the layout).

    packed: pairs go whole (chosen, then rejected) into rows of `row_capacity` tokens (default:
    the longest pair) by best-fit decreasing. Rows are as long as the fullest one, rounded up to
    `pad_to_multiple_of` when given (fewer distinct shapes for compiled kernels).
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"preference batching must be one of {PAIR_MODES}, got {mode!r}")
    idx = [int(i) for i in idx]
    P = len(idx)
    seqs = [pairs.chosen(i) for i in idx] + [pairs.rejected(i) for i in idx]  # sequence k < P: chosen of pair k
    if mode == "padding":
        rows = [[k] for k in range(2 * P)]
    else:
        sizes = [len(seqs[j][0]) + len(seqs[P + j][0]) for j in range(P)]
        bins = pack_best_fit(sizes, max(row_capacity or 0, max(sizes)))
        rows = [[k for j in members for k in (j, P + j)] for members in bins]
    R, T = len(rows), max(sum(len(seqs[k][0]) for k in row) for row in rows)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((R, T), pad_id, dtype=np.int64)
    targets = np.full((R, T), IGNORE_INDEX, dtype=np.int64)
    sequence_ids = np.full((R, T), -1, dtype=np.int64)
    position_ids = np.zeros((R, T), dtype=np.int64)
    document_ids = np.zeros((R, T), dtype=np.int64)
    for r, row in enumerate(rows):
        col = 0
        for d, k in enumerate(row):
            ids, trainable = seqs[k]
            n = len(ids)
            t = example_targets(ids, trainable)
            input_ids[r, col:col + n] = ids
            targets[r, col:col + n] = t
            sequence_ids[r, col:col + n] = np.where(t != IGNORE_INDEX, k, -1)
            position_ids[r, col:col + n] = np.arange(n)
            document_ids[r, col:col + n] = d
            col += n
        document_ids[r, col:] = len(row)  # the pad tail is a document of its own; its positions stay 0
    batch = {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets),
             "sequence_ids": torch.from_numpy(sequence_ids), "pair_ids": torch.tensor(idx, dtype=torch.long),
             "num_tokens": sum(len(ids) for ids, _ in seqs)}
    if mode == "padding":  # pads come last in every row: causal attention already keeps them unseen
        batch["position_ids"] = torch.arange(T).expand(R, T).clone()
        batch["document_ids"] = None
    else:
        batch["position_ids"] = torch.from_numpy(position_ids)
        batch["document_ids"] = torch.from_numpy(document_ids)
    if reference_logps is not None:
        batch["reference_logps"] = reference_logps[torch.tensor(idx, dtype=torch.long)].float()
    return batch


class PairLoader:
    """Batches of `batch_size` pairs, in a seeded order per epoch; a BatchSource for train/loop.py.

    `reference_logps` ((N, 2) summed log-probs of each pair's chosen and rejected response under
    the reference model) is attached to every batch once set. rank/world_size: each rank takes every
    world_size-th batch. pad_to_multiple_of: round row lengths up (see collate_pairs).
    """

    def __init__(self, pairs: PreferencePairs, mode: str = "padding", batch_size: int = 8, max_length: int = 1024,
                 pad_id: int = 0, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, pad_to_multiple_of: int | None = None):
        if mode not in PAIR_MODES:
            raise ValueError(f"preference batching must be one of {PAIR_MODES}, got {mode!r}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size {batch_size} / rank {rank} of {world_size}")
        if len(pairs) == 0:
            raise ValueError("no preference pairs to batch")
        self.pairs, self.mode, self.batch_size, self.max_length = pairs, mode, batch_size, max_length
        self.pad_id, self.shuffle, self.seed, self.drop_last = pad_id, shuffle, seed, drop_last
        self.rank, self.world_size, self.pad_to_multiple_of = rank, world_size, pad_to_multiple_of
        self.reference_logps: torch.Tensor | None = None

    def __len__(self) -> int:
        n = len(self.pairs)
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches // self.world_size

    def batch_order(self, epoch: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.pairs)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches = [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches[self.rank::self.world_size][:len(self)]

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        for idx in self.batch_order(epoch)[start:]:
            yield self.collate(idx)

    def __iter__(self) -> Iterator[dict]:
        return self.epoch(0)

    def collate(self, idx) -> dict:
        # Packed rows hold up to two max-length sequences: a pair never has to be split.
        return collate_pairs(self.pairs, idx, self.pad_id, self.mode, 2 * self.max_length, self.reference_logps,
                             self.pad_to_multiple_of)

    @property
    def stats(self) -> dict:
        """Batches and fill (real tokens / slots) over epoch 0, from lengths alone (nothing collated)."""
        lengths = self.pairs.lengths
        real = slots = 0
        for idx in self.batch_order(0):
            sizes = lengths[idx].sum(axis=1)
            real += int(sizes.sum())
            if self.mode == "padding":
                slots += 2 * len(idx) * int(lengths[idx].max())
            else:
                rows = pack_best_fit(sizes.tolist(), max(2 * self.max_length, int(sizes.max())))
                slots += len(rows) * max(int(sizes[r].sum()) for r in rows)
        return {"mode": self.mode, "pairs": len(self.pairs), "batches": len(self), "fill": real / max(slots, 1)}
