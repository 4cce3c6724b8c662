"""Automatic metrics, no judge needed: loss and perplexity of the reference answers, and text
metrics of generated responses against their references.

Text metrics (`text_metrics(rows)`, rows as `posttrain eval generate` writes them):

- `exact_match`: the response equals the reference up to case, whitespace and the punctuation
  around words (posttrain.data.demo.normalize_answer, SQuAD-style normalisation).
- `contains`: the normalised reference appears inside the normalised response (word-bounded),
  for models that answer right but wrap the answer in a sentence.
- `rouge_l`: ROUGE-L F1 (longest common subsequence of words, Lin 2004), tokenised as Google's
  rouge-score package does without stemming: lowercase, runs of [a-z0-9] are the words.
- `response_tokens` / `response_words`: mean length of the responses.
- `no_stop_rate`: share of responses that hit the token budget instead of stopping (EOS or the
  prompt style's end-of-turn): a model that rambles on, or a budget that is too small.

`loss_metrics` gives the mean next-token loss over the reference answers (the assistant turns,
EOS included) given their prompts, and its exponential, the perplexity.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.data.demo import exact_match, normalize_answer

_WORD = re.compile(r"[a-z0-9]+")


def contains(prediction: str, reference: str) -> bool:
    """Whether the normalised reference occurs in the normalised prediction, on word boundaries."""
    ref = normalize_answer(reference)
    if not ref:
        return not normalize_answer(prediction)
    return f" {ref} " in f" {normalize_answer(prediction)} "


def rouge_words(text: str) -> list[str]:
    """rouge-score's default tokenisation (no stemming): lowercase, alphanumeric runs."""
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between a prediction and a reference (0 when either has no words)."""
    pred, ref = rouge_words(prediction), rouge_words(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def text_metrics(rows: Sequence[dict]) -> dict:
    """Exact match, containment, ROUGE-L, mean lengths and the never-stopped rate over response rows.

    Each row needs `response` and `reference`; `completion_tokens` and `finish_reason` (written
    by `posttrain eval generate`) are used when present.
    """
    if not rows:
        raise ValueError("no responses to score")
    for i, row in enumerate(rows):
        for key in ("response", "reference"):
            if not isinstance(row.get(key), str):
                raise ValueError(f"response row {i} has no string '{key}' (keys: {sorted(row)})")
    out = {
        "n": len(rows),
        "exact_match": mean([float(exact_match(r["response"], r["reference"])) for r in rows]),
        "contains": mean([float(contains(r["response"], r["reference"])) for r in rows]),
        "rouge_l": mean([rouge_l(r["response"], r["reference"]) for r in rows]),
        "response_words": mean([len(r["response"].split()) for r in rows]),
        "reference_words": mean([len(r["reference"].split()) for r in rows]),
    }
    tokens = [r["completion_tokens"] for r in rows if isinstance(r.get("completion_tokens"), int)]
    if tokens:
        out["response_tokens"] = mean(tokens)
    reasons = [r["finish_reason"] for r in rows if r.get("finish_reason")]
    if reasons:
        out["no_stop_rate"] = mean([float(reason == "length") for reason in reasons])
    return out


@torch.no_grad()
def loss_metrics(model: nn.Module, style, conversations: Sequence[list[dict]], batch_size: int = 8,
                 max_length: int | None = None, device: str | torch.device | None = None) -> dict:
    """Mean loss and perplexity of the assistant turns of `conversations` under `model`.

    The conversations are rendered by `style` (a posttrain.prompts style; its loss_on decides which
    tokens count: "response" scores only the answers and the end-of-turn after each). The loss is
    averaged over all target tokens of the split, as the training loop's validation loss is.
    """
    from posttrain.data.batching import BatchLoader
    from posttrain.data.tokenize import tokenize_messages
    from posttrain.train.loop import evaluate
    from posttrain.train.losses import sft_loss

    max_length = min(max_length or model.config.max_length, model.config.max_length)
    dataset = tokenize_messages(list(conversations), style, max_length, "truncate")
    loader = BatchLoader(dataset, "padding", batch_size, max_length, style.tokenizer.pad_id, shuffle=False)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    loss = evaluate(model, loader, sft_loss, device)["val_loss"]
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "loss_tokens": int(dataset.num_targets()),
            "loss_examples": len(dataset)}


def read_responses(path: str | Path) -> list[dict]:
    """Rows of a responses JSONL file, each checked for `response` and `reference` (errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such responses file (write one with `posttrain eval generate`)")
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg}); fix or delete that line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("response", "reference") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{line_no}: missing string field(s) {', '.join(missing)} (has: "
                             f"{', '.join(sorted(row)) or 'nothing'}); a responses file needs 'response' and "
                             "'reference' per line, and 'instruction'/'input' or 'prompt' for a judge")
        row.setdefault("index", len(rows))
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: holds no responses")
    return rows
