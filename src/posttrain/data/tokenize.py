"""Examples -> token ids + trainable flags, cached on disk; and the whole SFT data pipeline.

    data = prepare_sft_data("instruction-data.json", tokenizer, style="alpaca", max_length=1024)
    train = BatchLoader(data.train, mode="packed", batch_size=8, max_length=1024, pad_id=tokenizer.pad_id)

A `TokenizedDataset` keeps every example's ids and flags in two flat arrays plus offsets: small,
fast to slice, and saved as safetensors (no pickle). The cache key hashes the data content, the
tokenizer (its saved files), the prompt style, loss mode, max length and over-length policy, so a
change to any of them re-tokenizes. Over-long examples are truncated or dropped, and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import SafetensorError

from posttrain.data.formats import FormatStats, Messages, dataset_kind, records_to_messages, records_to_texts
from posttrain.data.sources import DEFAULT_SPLIT, DataError, cache_dir, load_records, split_records
from posttrain.prompts import PromptStyle, get_style

OVERLONG = ("truncate", "drop", "keep")  # keep: only for packed batching, which cuts across rows
CACHE_VERSION = 1  # bump when the tokenized layout or rendering changes


@dataclass
class TokenizedDataset:
    """Tokenized examples: flat `ids` (int32), `trainable` (bool) and `offsets` (N + 1)."""
    ids: np.ndarray
    trainable: np.ndarray
    offsets: np.ndarray
    stats: dict = field(default_factory=dict)  # how it was made: counts for the run's report

    @classmethod
    def from_examples(cls, examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
                      stats: dict | None = None) -> "TokenizedDataset":
        lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.fromiter((t for e, _ in examples for t in e), dtype=np.int32, count=int(offsets[-1]))
        flags = np.fromiter((bool(f) for _, fl in examples for f in fl), dtype=bool, count=int(offsets[-1]))
        return cls(ids, flags, offsets, dict(stats or {}))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.trainable[a:b]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def num_targets(self) -> int:
        """Tokens that carry a loss: trainable tokens that are not their example's first token."""
        first = np.zeros(len(self.ids), dtype=bool)
        first[self.offsets[:-1][self.lengths > 0]] = True
        return int((self.trainable & ~first).sum())

    def select(self, indices: Sequence[int]) -> "TokenizedDataset":
        return TokenizedDataset.from_examples([self[int(i)] for i in indices], self.stats)

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors; stats go into the metadata."""
        from safetensors.numpy import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"ids": self.ids, "trainable": self.trainable.astype(np.uint8), "offsets": self.offsets},
                      tmp, metadata={"stats": json.dumps(self.stats)})
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> "TokenizedDataset":
        from safetensors import safe_open
        with safe_open(str(path), framework="np") as f:
            stats = json.loads((f.metadata() or {}).get("stats", "{}"))
            return cls(f.get_tensor("ids"), f.get_tensor("trainable").astype(bool), f.get_tensor("offsets"), stats)


# ----------------------------------------------------------------------------------------------
# Tokenizing

def apply_overlong(ids: list[int], trainable: list[bool], max_length: int | None, overlong: str
                   ) -> tuple[list[int], list[bool]] | None:
    """The example cut to max_length ("truncate"), None ("drop"), or as it is ("keep")."""
    if max_length is None or len(ids) <= max_length or overlong == "keep":
        return ids, trainable
    if overlong == "truncate":
        return ids[:max_length], trainable[:max_length]
    if overlong == "drop":
        return None
    raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")


def tokenize_messages(examples: Sequence[Messages], style: PromptStyle, max_length: int | None = None,
                      overlong: str = "truncate") -> TokenizedDataset:
    """Render every example with the prompt style; handle over-long ones; count what happened.

    Examples left without a single trainable target (e.g. truncated before the response under
    loss_on="response") are dropped and counted: they would only cost compute.
    """
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    out, counts = [], Counter()
    for messages in examples:
        ids, trainable = style.render(messages)
        if max_length is not None and len(ids) > max_length:
            counts["truncated" if overlong == "truncate" else "dropped_overlong" if overlong == "drop"
                   else "overlong_kept"] += 1
        cut = apply_overlong(ids, trainable, max_length, overlong)
        if cut is None:
            continue
        if not any(cut[1][1:]):
            counts["dropped_no_targets"] += 1
            continue
        out.append(cut)
    stats = {"examples": len(out), **counts}
    if not out:
        raise DataError(f"no examples left after tokenizing ({stats}); raise max_length or use overlong='truncate'")
    return TokenizedDataset.from_examples(out, stats)


def text_blocks(texts: Sequence[str], tokenizer, block_size: int) -> TokenizedDataset:
    """Continued pre-training: each text tokenized and cut into blocks of at most `block_size`
    tokens, every block ending with EOS (block_size - 1 text tokens + EOS); all trainable."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    blocks = []
    for text in texts:
        ids = tokenizer.encode(text, bos=getattr(tokenizer, "add_bos", False))
        step = block_size - 1
        for start in range(0, len(ids), step):
            block = ids[start:start + step] + [tokenizer.eos_id]
            blocks.append((block, [True] * len(block)))
    if not blocks:
        raise DataError("no text to tokenize: every text is empty")
    return TokenizedDataset.from_examples(blocks, {"examples": len(blocks), "texts": len(texts)})


# ----------------------------------------------------------------------------------------------
# Caching

_fingerprints: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's saved files (vocabulary, merges, added tokens, template)."""
    state = (len(tokenizer), getattr(tokenizer, "chat_template", None))  # what can change in place
    cached = _fingerprints.get(tokenizer)
    if cached is not None and cached[0] == state:
        return cached[1]
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        for path in sorted(Path(tmp).iterdir()):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    digest = h.hexdigest()
    _fingerprints[tokenizer] = (state, digest)
    return digest


def _content_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cached(key: dict, build, cache: str | Path | bool | None = True) -> TokenizedDataset:
    """`build()` once per distinct `key`, stored under the cache folder (None/False: no caching)."""
    if cache is None or cache is False:
        return build()
    folder = cache_dir("tokenized") if cache is True else Path(cache)
    path = folder / f"{_content_hash({'v': CACHE_VERSION, **key})[:32]}.safetensors"
    if path.is_file():
        try:
            return TokenizedDataset.load(path)
        except Exception:  # a corrupt cache file (disk full, older format): rebuild it
            path.unlink(missing_ok=True)
    dataset = build()
    try:
        dataset.save(path)
    except (OSError, SafetensorError) as e:  # a read-only or full cache must not stop a run
        warnings.warn(f"could not cache tokenized data in {folder} ({e}); continuing without the cache "
                      f"(set POSTTRAIN_CACHE to a writable folder, or data.cache false)")
    return dataset


def tokenize_messages_cached(examples: Sequence[Messages], style: PromptStyle, max_length: int | None,
                             overlong: str = "truncate", cache: str | Path | bool | None = True
                             ) -> TokenizedDataset:
    key = {"kind": "messages", "data": _content_hash(list(examples)),
           "tokenizer": tokenizer_fingerprint(style.tokenizer), "style": style.name,
           "loss_on": style.loss_on, "max_length": max_length, "overlong": overlong}
    return cached(key, lambda: tokenize_messages(examples, style, max_length, overlong), cache)


def text_blocks_cached(texts: Sequence[str], tokenizer, block_size: int,
                       cache: str | Path | bool | None = True) -> TokenizedDataset:
    key = {"kind": "text", "data": _content_hash(list(texts)), "tokenizer": tokenizer_fingerprint(tokenizer),
           "block_size": block_size}
    return cached(key, lambda: text_blocks(texts, tokenizer, block_size), cache)


# ----------------------------------------------------------------------------------------------
# Mixing

def mix_datasets(primary: TokenizedDataset, secondary: TokenizedDataset, ratio: float, seed: int = 0
                 ) -> TokenizedDataset:
    """Blend `secondary` in so that it makes up `ratio` of the examples (replay against forgetting).

    With n primary examples the mix holds round(n * ratio / (1 - ratio)) secondary ones, drawn
    without replacement while they last (then cycled). The order is primary then secondary; the
    batch loader shuffles.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"mix ratio is the secondary share of the examples, in [0, 1); got {ratio}")
    n_extra = round(len(primary) * ratio / (1 - ratio))
    rng = np.random.default_rng(seed)
    picks = np.concatenate([rng.permutation(len(secondary)) for _ in range(-(-n_extra // max(len(secondary), 1)))]
                           or [np.zeros(0, dtype=np.int64)])[:n_extra]
    examples = [primary[i] for i in range(len(primary))] + [secondary[int(i)] for i in picks]
    stats = {**primary.stats, "mixed_in": int(n_extra), "mix_ratio": ratio}
    return TokenizedDataset.from_examples(examples, stats)


# ----------------------------------------------------------------------------------------------
# The pipeline: source -> records -> messages (or text) -> tokens, per split

@dataclass
class SFTData:
    """Tokenized splits for supervised fine-tuning, the style that rendered them, and a report."""
    train: TokenizedDataset
    val: TokenizedDataset | None
    test: TokenizedDataset | None
    style: PromptStyle
    report: dict
    val_messages: list[Messages] | None = None   # the val split's conversations (for samples/eval)
    test_messages: list[Messages] | None = None  # None for plain-text data

    def summary(self) -> str:
        lines = []
        for name in ("train", "val", "test"):
            ds = getattr(self, name)
            if ds is not None:
                r = self.report.get(name, {})
                extra = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("examples",) and v)
                lines.append(f"{name}: {len(ds)} examples, {int(ds.lengths.sum())} tokens, "
                             f"{ds.num_targets()} targets{'; ' + extra if extra else ''}")
        return "\n".join(lines)


def _tokenize_records(records, style: PromptStyle, max_length: int, overlong: str, skip_invalid: bool,
                      cache) -> tuple[TokenizedDataset, dict, list[Messages] | None]:
    """Tokenized examples, their report, and the conversations (None for plain text)."""
    if dataset_kind(records) == "text":
        texts, fstats = records_to_texts(records, skip_invalid)
        ds = text_blocks_cached(texts, style.tokenizer, max_length, cache)
        return ds, _report(fstats, ds), None
    examples, fstats = records_to_messages(records, skip_invalid)
    ds = tokenize_messages_cached(examples, style, max_length, overlong, cache)
    return ds, _report(fstats, ds), examples


def _report(fstats: FormatStats, ds: TokenizedDataset) -> dict:
    report = {"records": fstats.records, **ds.stats}
    if fstats.skipped:
        report["skipped_invalid"] = dict(fstats.skipped)
    return report


def prepare_sft_data(data: str, tokenizer, style: str | PromptStyle = "alpaca", loss_on: str = "all",
                     max_length: int = 1024, val_data: str | None = None, test_data: str | None = None,
                     split: tuple[float, float, float] = DEFAULT_SPLIT, shuffle: bool = False, seed: int = 0,
                     skip_invalid: bool = False, overlong: str = "truncate", mix_data: str | None = None,
                     mix_ratio: float = 0.0, cache: str | Path | bool | None = True) -> SFTData:
    """Load, split, format and tokenize a dataset for SFT.

    data: a local file/folder, an http(s) URL, a hub dataset id, or `demo`.
    val_data/test_data: separate files; when either is given, `data` is all training data,
      otherwise `data` is split by `split` (train, test, val fractions; in order unless `shuffle`).
    style/loss_on: prompt style name and "all"/"response" (or a ready PromptStyle, loss_on ignored).
      A style may add special tokens (chatml on GPT-2): call
      posttrain.prompts.resize_model_for_tokenizer(model, tokenizer) afterwards.
    overlong: "truncate" (counted), "drop" (counted) or "keep" (packed batching only).
    mix_data/mix_ratio: a second dataset (e.g. pre-training text) blended into train only, as
      `mix_ratio` of the training examples.
    cache: True (posttrain's cache folder), a folder, or None/False for no cache.
    Plain-text data (.txt files, `text` records) becomes EOS-terminated blocks of max_length.
    """
    style = style if isinstance(style, PromptStyle) else get_style(style, tokenizer, loss_on)
    if data in ("demo", "demo:train") and val_data is None and test_data is None:
        val_data = "demo:heldout"  # the demo set has its own held-out split
    records = load_records(data)
    if val_data is not None or test_data is not None:
        splits = {"train": records,
                  "val": load_records(val_data, split="validation") if val_data else [],
                  "test": load_records(test_data, split="test") if test_data else []}
    elif dataset_kind(records) == "text":
        splits = None  # text is split after cutting into blocks: a single file is one record
    else:
        splits = split_records(records, split, shuffle, seed)

    report: dict = {}
    out: dict[str, TokenizedDataset | None] = {}
    messages: dict[str, list[Messages] | None] = {}
    if splits is None:
        whole, report["all"], _ = _tokenize_records(records, style, max_length, overlong, skip_invalid, cache)
        parts = split_records(range(len(whole)), split, shuffle, seed)
        for name, idx in parts.items():
            out[name] = whole.select(list(idx)) if len(idx) else None
            report[name] = {"examples": len(idx)}
    else:
        for name, recs in splits.items():
            if not recs:
                out[name] = None
                continue
            try:
                out[name], report[name], messages[name] = _tokenize_records(
                    recs, style, max_length, overlong, skip_invalid, cache)
            except DataError as e:
                raise DataError(f"{name} split: {e}") from None
    if out.get("train") is None:
        raise DataError(f"{data}: the train split is empty; check the data and the split fractions {split}")
    if mix_data is not None and mix_ratio > 0:
        extra, report["mix"], _ = _tokenize_records(load_records(mix_data), style, max_length, overlong,
                                                    skip_invalid, cache)
        out["train"] = mix_datasets(out["train"], extra, mix_ratio, seed)
        report["train"]["mixed_in"] = out["train"].stats["mixed_in"]
    return SFTData(out["train"], out.get("val"), out.get("test"), style, report,
                   messages.get("val"), messages.get("test"))
