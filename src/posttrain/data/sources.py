"""Where records come from: local json/jsonl/csv/parquet/txt files, http(s) URLs, Hugging Face
dataset repositories, and the packaged demo dataset; plus train/test/val splits.

A record is a plain dict from the file, wrapped with where it came from (file, line, index) so
that every later error can say which record was wrong. Nothing here knows about prompt formats.

    load_records("data/alpaca.json")                    # local file
    load_records("https://host/alpaca.jsonl")           # downloaded once into the cache
    load_records("yahma/alpaca-cleaned")                # hub dataset repo (huggingface_hub)
    load_records("demo")                                # generated demo set (posttrain.data.demo)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# File types we can read, by suffix.
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
# The split that rasbt's LLMs-from-scratch uses for its 1100 instructions: in order, no shuffle.
DEFAULT_SPLIT = (0.85, 0.10, 0.05)  # train, test, val
_HUB_ID = re.compile(r"^(?:hf://datasets/)?([\w.\-]+/[\w.\-]+)(?:@([\w.\-/]+))?(?::(\w+))?$")


class DataError(ValueError):
    """Input data that cannot be used; the message says where and what to do."""


@dataclass
class Record:
    """One record of a dataset and where it came from (for error messages)."""
    data: dict
    source: str
    index: int              # 0-based position in its file
    line: int | None = None  # 1-based line in the file where known (JSONL, CSV)

    def where(self) -> str:
        line = f", line {self.line}" if self.line is not None else ""
        return f"{self.source}: record {self.index}{line}"


def cache_dir(kind: str = "") -> Path:
    """posttrain's cache folder ($POSTTRAIN_CACHE, else ~/.cache/posttrain), optionally a subfolder."""
    root = Path(os.environ.get("POSTTRAIN_CACHE") or Path.home() / ".cache" / "posttrain")
    return root / kind if kind else root


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or the whole of it (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# Local files

def read_file(path: str | Path, source: str | None = None) -> list[Record]:
    """Records of one local file, by suffix. `source` names it in errors (e.g. the URL)."""
    path = Path(path)
    source = source or str(path)
    suffix = _suffix(path.name)
    if not path.is_file():
        raise DataError(f"{source}: no such file")
    if suffix == ".jsonl":
        return _read_jsonl(path, source)
    if suffix == ".json":
        return _read_json(path, source)
    if suffix == ".csv":
        return _read_csv(path, source)
    if suffix == ".parquet":
        return _read_parquet(path, source)
    if suffix == ".txt":
        return [Record({"text": path.read_text(encoding="utf-8")}, source, 0, 1)]
    raise DataError(f"{source}: unknown file type; use one of {', '.join(SUFFIXES)}")


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return ".jsonl" if suffix == ".ndjson" else suffix


def _read_jsonl(path: Path, source: str) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) carry no record
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}:{line_no}:{e.colno}: malformed JSON line ({e.msg}); "
                                f"every line of a .jsonl file must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{source}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, source, len(records), line_no))
    return records


def _read_json(path: Path, source: str) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file that is really JSON Lines is common: accept it when every line parses.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(path, source)
        raise DataError(f"{source}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
    if isinstance(obj, dict):  # {"data": [...]} or {"train": [...]}: one list-valued key
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{source}: expected a JSON array of records (or an object holding exactly "
                            f"one array); found an object with keys {sorted(obj)[:10]}")
        obj = obj[lists[0]]
    if not isinstance(obj, list):
        raise DataError(f"{source}: expected a JSON array of records, got {type(obj).__name__}")
    records = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{source}: record {i}: expected a JSON object, got {type(item).__name__}")
        records.append(Record(item, source, i))
    return records


def _read_csv(path: Path, source: str) -> list[Record]:
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []  # reads the header
        end = reader.line_num  # last line consumed; a row starts on the next one
        for row in reader:
            if None in row:  # more cells than header columns
                raise DataError(f"{source}:{end + 1}: row has more fields than the header "
                                f"({len(columns)} columns)")
            records.append(Record(dict(row), source, len(records), end + 1))
            end = reader.line_num
    return records


def _read_parquet(path: Path, source: str) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{source}: reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{source}: cannot read parquet file ({e})") from None
    return [Record(row, source, i) for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# URLs

def download(url: str, directory: str | Path | None = None, timeout: float = 60.0) -> Path:
    """The local copy of `url`, downloaded on first use into the cache (atomically)."""
    directory = Path(directory) if directory is not None else cache_dir("downloads")
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    path = directory / f"{digest}-{name}"
    if path.is_file():
        return path
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except urllib.error.HTTPError as e:
        raise DataError(f"{url}: download failed with HTTP {e.code} ({e.reason})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"{url}: download failed ({reason}). Are you offline? Download the file "
                        f"yourself and pass its local path, or put it at {path}") from None
    atomic_write_bytes(path, data)
    return path


# ----------------------------------------------------------------------------------------------
# Hugging Face dataset repositories

def hub_data_files(repo_id: str, split: str = "train", revision: str | None = None,
                   cache: str | Path | None = None, local_files_only: bool = False,
                   endpoint: str | None = None) -> list[Path]:
    """The json/jsonl/csv/parquet files of one split of a hub dataset repo (snapshot_download).

    Files are matched to a split by name (`train`, `test`, `validation`/`val`/`dev`); a repo
    whose files name no split (yahma/alpaca-cleaned: one json) has all of them in `train`.
    """
    from huggingface_hub import snapshot_download

    from posttrain.weights.hub import hub_cache_dir, hub_offline  # the same cache and offline switch as models
    cache = Path(cache) if cache is not None else hub_cache_dir()
    offline = local_files_only or hub_offline()
    try:
        root = snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache,
                                 local_files_only=offline, endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None,
                                 allow_patterns=[f"*{s}" for s in SUFFIXES if s != ".txt"])
    except Exception as e:  # offline, unknown repo, gated: huggingface_hub has many error types
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else "the hub is unreachable?"
        detail = " ".join(str(e).split())  # huggingface_hub's messages span lines
        raise DataError(f"hub dataset {repo_id}: cannot get it ({why}; {type(e).__name__}: {detail}). "
                        f"Download its data files where the hub is reachable (`hf download {repo_id} "
                        f"--repo-type dataset`) and pass a local path; there is no local file or folder "
                        f"named {repo_id} either") from None
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and _suffix(p.name) in SUFFIXES)
    if not files:
        raise DataError(f"hub dataset {repo_id}: no json/jsonl/csv/parquet files in the repository")
    by_split = {name: [p for p in files if _split_of(p.relative_to(root)) == name]
                for name in ("train", "test", "validation")}
    if not any(by_split.values()):
        by_split["train"] = files
    wanted = {"val": "validation", "valid": "validation", "dev": "validation"}.get(split, split)
    if not by_split.get(wanted):
        have = [k for k, v in by_split.items() if v]
        raise DataError(f"hub dataset {repo_id}: no files for split {split!r}; it has {have}")
    return by_split[wanted]


def _split_of(relative: Path) -> str | None:
    words = set(re.split(r"[^a-z]+", str(relative).lower()))
    for name, aliases in (("train", {"train"}), ("test", {"test"}),
                          ("validation", {"validation", "valid", "val", "dev"})):
        if words & aliases:
            return name
    return None


# ----------------------------------------------------------------------------------------------
# One entry point

def load_records(spec: str | Path, split: str = "train", cache: str | Path | None = None) -> list[Record]:
    """Records from a local file or folder, an http(s) URL, a hub dataset id, or `demo`.

    `split` only matters for hub datasets (which file set) and the demo (`train`/`heldout`);
    a hub id may also carry it: `owner/name:test`, and a revision: `owner/name@v1.0`.
    """
    text = str(spec)
    if text.startswith(("http://", "https://")):
        path = download(text, cache)
        return read_file(path, source=text)
    path = Path(text).expanduser()
    if path.is_file():
        return read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _suffix(p.name) in SUFFIXES)
        if not files:
            raise DataError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
        return [r for f in files for r in read_file(f)]
    if text in ("demo", "demo:train", "demo:heldout"):
        from posttrain.data.demo import demo_dataset
        which = text.split(":")[1] if ":" in text else ("heldout" if split in ("heldout", "test", "val") else "train")
        records = demo_dataset()[which]
        return [Record(r, f"demo:{which}", i) for i, r in enumerate(records)]
    match = _HUB_ID.match(text)
    if match and not text.startswith((".", "/", "~")) and _suffix(text) not in SUFFIXES:
        repo_id, revision, hub_split = match.groups()
        files = hub_data_files(repo_id, hub_split or split, revision)
        return [r for f in files for r in read_file(f, source=f"{repo_id}/{f.name}")]
    raise DataError(f"{text}: not a file, folder, URL or hub dataset id (owner/name)")


def split_records(records: list, fractions: tuple[float, float, float] = DEFAULT_SPLIT,
                  shuffle: bool = False, seed: int = 0) -> dict[str, list]:
    """Train/test/val by fractions, in order unless `shuffle` (seeded).

    The sizes follow rasbt's LLMs-from-scratch: train = int(n * f_train), test = int(n * f_test),
    val = the rest (1100 -> 935/110/55).
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    items = list(records)
    if shuffle:
        random.Random(seed).shuffle(items)
    n_train = int(len(items) * fractions[0])
    n_test = int(len(items) * fractions[1])
    return {"train": items[:n_train], "test": items[n_train:n_train + n_test],
            "val": items[n_train + n_test:]}
