"""Labelled text for classification: (text, label) examples from CSV/TSV/JSONL/JSON/parquet files, URLs
or hub datasets, label names mapped to ids, class balancing, seeded splits, and the SMS Spam
Collection as a named dataset.

    data = load_labelled("reviews.csv", text_column="review", label_column="sentiment")
    data = load_labelled("sms-spam")          # downloaded once from UCI (or a mirror), cached
    data.labels                                # ["ham", "spam"]: label id i is data.labels[i]
    data.train[0]                              # LabelledExample(text, label=id, where="file: record 3, line 5")

Every error names the file and row (`Record.where()`) and says what to do.

Labels: given in order (`labels=[...]`), or the distinct labels of the data sorted (numerically when
they are all integers, so 0/1 labels keep their ids). A label outside the known set, a missing or
empty text, a single class or an empty file is an error.

The SMS Spam Collection (Almeida, Gomez Hidalgo & Yamakami 2011; UCI ML repository #228): a zip
holding `SMSSpamCollection`, 5574 lines `label<TAB>text` (4827 ham, 747 spam). It is read as raw
tab-separated text: quotes are part of the messages (a CSV reader would join lines at an
unbalanced quote and lose messages). Balanced by undersampling ham to the 747 spam messages
(seed 123) and split 70/10/20 after a seeded shuffle, as in Raschka's LLMs-from-scratch ch. 6.
"""

from __future__ import annotations

import csv
import random
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.data.sources import DataError, Record, atomic_write_bytes, cache_dir, download, load_records

SMS_SPAM = "sms-spam"
SMS_SPAM_FILE = "SMSSpamCollection"
# The UCI archive, then the copy LLMs-from-scratch keeps for when UCI is down.
SMS_SPAM_URLS = ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
                 "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip")
SMS_SPAM_LABELS = ("ham", "spam")
NAMED = (SMS_SPAM,)
BALANCE = ("auto", "undersample", "class-weights", "none")
DEFAULT_SPLIT = (0.7, 0.1, 0.2)  # train, val, test
TABLE_SUFFIXES = (".tsv", ".tab")


@dataclass
class LabelledExample:
    text: str
    label: int               # index into the label names
    where: str               # file and row, for messages
    group: str | None = None  # examples of one group stay in one split


@dataclass
class LabelledData:
    labels: list[str]                       # label id -> name
    train: list[LabelledExample]
    val: list[LabelledExample]
    test: list[LabelledExample]
    class_weights: list[float] | None = None  # per label id, when balance = class-weights
    report: dict = field(default_factory=dict)

    def counts(self, split: str) -> dict[str, int]:
        c = Counter(e.label for e in getattr(self, split))
        return {name: c.get(i, 0) for i, name in enumerate(self.labels)}

    def summary(self) -> str:
        parts = [f"{s} {len(getattr(self, s))} ({', '.join(f'{k} {v}' for k, v in self.counts(s).items())})"
                 for s in ("train", "val", "test")]
        return f"labels {self.labels}; " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Reading files

def read_table(path: str | Path, columns: Sequence[str] | None = None, delimiter: str | None = None
               ) -> list[Record]:
    """Rows of a CSV or TSV file as records (with 1-based line numbers).

    TSV (`.tsv`, `.tab`, or delimiter "\\t"): fields split at tabs only; quotes are literal text.
    `columns`: names for a file without a header row (else the first row names the columns).
    """
    path = Path(path)
    tsv = delimiter == "\t" or (delimiter is None and path.suffix.lower() in TABLE_SUFFIXES)
    source = str(path)
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv
                  else csv.reader(f, delimiter=delimiter or ","))
        names = list(columns) if columns else None
        end = 0
        for row in reader:
            start, end = end + 1, reader.line_num  # a quoted CSV field may span lines
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if names is None:
                names = [c.strip() for c in row]
                continue
            if len(row) != len(names):
                raise DataError(f"{source}:{start}: row has {len(row)} fields but there are {len(names)} columns "
                                f"({', '.join(names)}){'; a tab inside a text?' if tsv else ''}")
            records.append(Record(dict(zip(names, row)), source, len(records), start))
    return records


def read_labelled_records(spec: str | Path, columns: Sequence[str] | None = None,
                          urls: Sequence[str] | None = None) -> list[Record]:
    """Records of a labelled dataset: the named `sms-spam`, a raw SMSSpamCollection file, a TSV, a CSV
    without a header (`columns`), or anything `posttrain.data.sources.load_records` reads."""
    text = str(spec)
    if text == SMS_SPAM:
        return parse_sms_spam(fetch_sms_spam(urls or SMS_SPAM_URLS))
    path = Path(text).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty; it must hold labelled examples (a text and a label each)")
        if path.name == SMS_SPAM_FILE:
            return parse_sms_spam(path)
        if path.suffix.lower() in TABLE_SUFFIXES or (columns and path.suffix.lower() == ".csv"):
            return read_table(path, columns)
    return load_records(spec)


# ----------------------------------------------------------------------------------------------
# The SMS Spam Collection

def parse_sms_spam(path: str | Path) -> list[Record]:
    """Records {"label", "text"} of the raw SMSSpamCollection file: `label<TAB>text` per line.

    Only the first tab separates: the rest of the line is the message, quotes and all. Lines are
    UTF-8; a line that is not is read as Latin-1 rather than lost.
    """
    path = Path(path)
    records = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("latin-1")
        if not line.strip():
            continue
        label, tab, message = line.partition("\t")
        if not tab or label.strip() not in SMS_SPAM_LABELS:
            raise DataError(f"{path}:{line_no}: expected 'ham' or 'spam', a tab, then the message; got "
                            f"{line[:60]!r}. Is this the SMSSpamCollection file from the UCI zip?")
        records.append(Record({"label": label.strip(), "text": message}, str(path), len(records), line_no))
    if not records:
        raise DataError(f"{path}: no messages in the file")
    return records


def fetch_sms_spam(urls: Sequence[str] = SMS_SPAM_URLS, cache: str | Path | None = None,
                   timeout: float = 60.0) -> Path:
    """The local SMSSpamCollection file: downloaded from the first URL that works, unzipped, cached.

    Cached at <cache>/SMSSpamCollection (default: $POSTTRAIN_CACHE/datasets/sms-spam); once there,
    no network is needed. A URL that fails (HTTP error, unreachable, not a zip, no SMSSpamCollection
    inside) is reported and the next one tried.
    """
    folder = Path(cache) if cache is not None else cache_dir("datasets") / SMS_SPAM
    target = folder / SMS_SPAM_FILE
    if target.is_file():
        return target
    failures = []
    for url in urls:
        try:
            archive = download(url, folder / "downloads", timeout)
        except DataError as e:
            failures.append(str(e))
            continue
        try:
            with zipfile.ZipFile(archive) as z:
                members = [n for n in z.namelist() if Path(n).name == SMS_SPAM_FILE]
                if not members:
                    raise KeyError(f"no {SMS_SPAM_FILE} among {z.namelist()[:10]}")
                data = z.read(members[0])
        except (zipfile.BadZipFile, KeyError) as e:
            archive.unlink(missing_ok=True)  # a bad download must not be served from the cache again
            failures.append(f"{url}: not the SMS Spam Collection zip ({e})")
            continue
        atomic_write_bytes(target, data)
        return target
    raise DataError("could not get the SMS Spam Collection:\n  " + "\n  ".join(failures) + "\nDownload "
                    f"{SMS_SPAM_URLS[0]} yourself and unzip it: pass the SMSSpamCollection file as data.path, or "
                    f"put it at {target}")


# ----------------------------------------------------------------------------------------------
# Records -> examples

def label_text(value) -> str | None:
    """A label cell as a name: "spam", 1 -> "1", 1.0 -> "1", True -> "true"; None when missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _column(record: Record, name: str, what: str):
    if name not in record.data:
        raise DataError(f"{record.where()}: no {what} column {name!r}; the record has "
                        f"{sorted(record.data)[:12]}. Set data.{what}_column to the right name")
    return record.data[name]


def records_to_raw(records: list[Record], text_column: str = "text", label_column: str | None = "label",
                   group_column: str | None = None) -> list[tuple[str, str | None, str, str | None]]:
    """(text, label name, where, group) per record; label None when `label_column` is None (unlabelled
    input for prediction). A missing or empty text or label is an error naming the row."""
    out = []
    for r in records:
        text = _column(r, text_column, "text")
        if not isinstance(text, str) or not text.strip():
            shown = ("missing" if text is None else "empty" if isinstance(text, str)
                     else f"not text but {type(text).__name__}")
            raise DataError(f"{r.where()}: the text ({text_column!r}) is {shown}; every example needs a non-empty "
                            f"text. Fix or remove the row")
        label = None
        if label_column is not None:
            label = label_text(_column(r, label_column, "label"))
            if label is None:
                raise DataError(f"{r.where()}: the label ({label_column!r}) is missing; fix or remove the row")
        group = None
        if group_column is not None:
            group = str(_column(r, group_column, "group"))
        out.append((text, label, r.where(), group))
    return out


def label_names(raw_labels: Sequence[str], given: Sequence[str] | None = None, source: str = "the data"
                ) -> list[str]:
    """Label id -> name: `given` as is, else the distinct labels sorted (numerically if all integers).
    Data holding fewer than two distinct labels is an error, whatever `given` lists."""
    distinct = set(raw_labels)
    if len(distinct) < 2:
        found = f"only the label {next(iter(distinct))!r}" if distinct else "no labels"
        raise DataError(f"{source} has {found}: a classifier needs examples of at least two classes. "
                        f"Check data.label_column, or add examples of the other classes")
    if given:
        names = [str(x) for x in given]
        duplicates = [n for n, c in Counter(names).items() if c > 1]
        if duplicates:
            raise DataError(f"data.labels lists {duplicates} more than once")
        if len(names) < 2:
            raise DataError(f"data.labels {names} lists fewer than two labels; a classifier needs at least two")
        return names
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)


def encode_labels(raw: list[tuple[str, str | None, str, str | None]], labels: Sequence[str]
                  ) -> list[LabelledExample]:
    """Examples with label ids; a label outside `labels` is an error naming the row."""
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for text, label, where, group in raw:
        if label not in index:
            raise DataError(f"{where}: label {label!r} is not one of the known labels {list(labels)}; fix the row, "
                            f"or list every label in data.labels")
        out.append(LabelledExample(text, index[label], where, group))
    return out


# ----------------------------------------------------------------------------------------------
# Balancing and splitting

def undersample(examples: list[LabelledExample], seed: int = 123) -> list[LabelledExample]:
    """Every class cut down to the size of the smallest (a seeded random choice), in the original order."""
    by_class: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        by_class.setdefault(e.label, []).append(i)
    smallest = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    keep = set()
    for label in sorted(by_class):
        keep.update(rng.sample(by_class[label], smallest))
    return [e for i, e in enumerate(examples) if i in keep]


def class_weights(examples: list[LabelledExample], n_classes: int) -> list[float]:
    """Weights n / (n_classes * count(class)) (scikit-learn's "balanced"): a weighted loss counts every
    class as much as the others. A class with no training examples is an error."""
    counts = Counter(e.label for e in examples)
    missing = [c for c in range(n_classes) if not counts.get(c)]
    if missing:
        raise DataError(f"the training split has no examples of label ids {missing}: cannot weight them; use "
                        f"more data or another split seed")
    return [len(examples) / (n_classes * counts[c]) for c in range(n_classes)]


def split_examples(examples: list, fractions: Sequence[float] = DEFAULT_SPLIT, seed: int = 123,
                   shuffle: bool = True, groups: Sequence | None = None) -> tuple[list, list, list]:
    """(train, val, test) after a seeded shuffle: train = int(n * f_train), val = int(n * f_val), test =
    the rest (LLMs-from-scratch's random_split). With `groups` (one key per example) whole groups
    are shuffled and split by the same rule over groups, so a group never spans two splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions (train, val, test) must be three non-negative numbers summing to 1, "
                         f"got {list(fractions)}")
    if groups is None:
        units = [[e] for e in examples]
    else:
        by_group: dict = {}
        for e, g in zip(examples, groups):
            by_group.setdefault(g, []).append(e)
        units = list(by_group.values())
    if shuffle:
        random.Random(seed).shuffle(units)
    n_train = int(len(units) * fractions[0])
    n_val = int(len(units) * fractions[1])
    flat = lambda us: [e for u in us for e in u]  # noqa: E731
    return flat(units[:n_train]), flat(units[n_train:n_train + n_val]), flat(units[n_train + n_val:])


# ----------------------------------------------------------------------------------------------
# One entry point

def load_labelled(path: str | Path = SMS_SPAM, text_column: str = "text", label_column: str = "label",
                  columns: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                  val_path: str | None = None, test_path: str | None = None,
                  split: Sequence[float] = DEFAULT_SPLIT, seed: int = 123, balance: str = "auto",
                  group_column: str | None = None, urls: Sequence[str] | None = None) -> LabelledData:
    """Train/val/test examples with label ids, from one dataset (split by `split` after a seeded
    shuffle) or from separate files (`val_path`, `test_path`: then `path` is all training data).

    balance: undersample (every class down to the smallest, before splitting), class-weights
    (weights for the loss, from the training split), none, or auto (undersample for the SMS Spam
    Collection, none otherwise).
    """
    if balance not in BALANCE:
        raise ValueError(f"data.balance {balance!r} is unknown; choose one of: {', '.join(BALANCE)}")
    named = str(path) == SMS_SPAM
    if named:  # the raw file has fixed columns
        text_column, label_column, group_column = "text", "label", None
        labels = labels or list(SMS_SPAM_LABELS)
    if balance == "auto":
        balance = "undersample" if named or Path(str(path)).name == SMS_SPAM_FILE else "none"

    def raw_of(spec):
        records = read_labelled_records(spec, columns, urls)
        if not records:
            raise DataError(f"{spec}: no records; the file must hold labelled examples (a text and a label each)")
        return records_to_raw(records, text_column, label_column, group_column)

    main = raw_of(path)
    names = label_names([r[1] for r in main], labels, source=str(path))
    examples = encode_labels(main, names)
    if balance == "undersample":
        examples = undersample(examples, seed)
    if val_path is None and test_path is None:
        groups = [e.group for e in examples] if group_column else None
        train, val, test = split_examples(examples, split, seed, groups=groups)
    else:
        train = list(examples)
        random.Random(seed).shuffle(train)
        val = encode_labels(raw_of(val_path), names) if val_path else []
        test = encode_labels(raw_of(test_path), names) if test_path else []
    if not train:
        raise DataError(f"{path}: no training examples after splitting {len(examples)} examples by {list(split)}")
    if len({e.label for e in train}) < 2:
        raise DataError(f"{path}: the training split holds a single class; use more data or another data.seed")
    weights = class_weights(train, len(names)) if balance == "class-weights" else None
    report = {"source": str(path), "balance": balance, "examples": len(main), "kept": len(examples),
              "labels_in_file": dict(Counter(r[1] for r in main))}
    data = LabelledData(names, train, val, test, weights, report)
    report["splits"] = {s: data.counts(s) for s in ("train", "val", "test")}
    return data
