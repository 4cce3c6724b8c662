"""`posttrain eval choice`: multiple-choice tasks scored by log-likelihood (HellaSwag, ARC, PIQA-like).

Each item is a context and several endings; the model's choice is the ending with the highest
log-probability given the context (`acc`), or the highest log-probability per character of the
ending (`acc_norm`, which removes the bias toward short endings), as lm-evaluation-harness scores
HellaSwag. Scoring follows the harness too: the continuation is " " + ending, spaces at the end of
the context move into the continuation, and the continuation's tokens are those of
encode(context + continuation) after the tokens of encode(context).

Items come from a local JSON/JSONL/CSV/parquet file or a hub dataset (owner/name, with --split).
Recognised fields:

- HellaSwag: ctx_a, ctx_b, activity_label, endings, label (preprocessed as the harness does);
- generic: a context (`context`, `ctx`, `query`, `question` or `prompt`), choices (`endings`,
  `choices` or `options`; ARC's {"text": [...], "label": [...]} too) and the gold answer (`label`,
  `answer`, `gold` or `answerKey`: an index, or a letter/label naming a choice).

All (context, ending) pairs are scored in batches sorted by length; the LM head runs only on the
ending's positions.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.weights.checkpoint import atomic_write

CONTEXT_KEYS = ("context", "ctx", "query", "question", "prompt")
CHOICE_KEYS = ("endings", "choices", "options")
LABEL_KEYS = ("label", "answer", "gold", "answerKey")


@dataclass
class ChoiceItem:
    context: str
    choices: list[str]
    label: int
    where: str = ""


def _hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup (WikiHow's [title] markers and bracketed tags)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _label_index(value, labels: list[str], n: int, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: the answer {value!r} is not a choice index or label")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()
                                  and value.strip() not in labels):
        index = int(value)
    elif isinstance(value, str) and value.strip() in labels:
        index = labels.index(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in "ABCDEFGHIJ":
        index = "ABCDEFGHIJ".index(value.strip().upper())
    else:
        raise ValueError(f"{where}: the answer {value!r} is neither an index nor one of the labels {labels}")
    if not 0 <= index < n:
        raise ValueError(f"{where}: answer index {index} is outside the {n} choices")
    return index


def to_item(data: dict, where: str) -> ChoiceItem:
    """One multiple-choice item from a record (HellaSwag's fields or the generic ones)."""
    if {"ctx_a", "ctx_b", "endings"} <= set(data):  # HellaSwag as the hub ships it
        context = _hellaswag_preprocess(f"{data.get('activity_label', '')}: {data['ctx_a']} "
                                        f"{str(data['ctx_b']).capitalize()}")
        choices = [_hellaswag_preprocess(str(e)) for e in data["endings"]]
        return ChoiceItem(context, choices, _label_index(data.get("label"), [], len(choices), where), where)
    context_key = next((k for k in CONTEXT_KEYS if k in data), None)
    choice_key = next((k for k in CHOICE_KEYS if k in data), None)
    label_key = next((k for k in LABEL_KEYS if k in data and data[k] not in (None, "")), None)
    if context_key is None or choice_key is None or label_key is None:
        raise ValueError(f"{where}: a multiple-choice item needs a context ({'/'.join(CONTEXT_KEYS)}), choices "
                         f"({'/'.join(CHOICE_KEYS)}) and an answer ({'/'.join(LABEL_KEYS)}); it has {sorted(data)}")
    raw = data[choice_key]
    labels: list[str] = []
    if isinstance(raw, dict):  # ARC: {"text": [...], "label": ["A", "B", ...]}
        labels = [str(x) for x in raw.get("label", [])]
        raw = raw.get("text")
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) for c in raw):
        raise ValueError(f"{where}: '{choice_key}' must be a list of at least two strings, got {raw!r:.200}")
    context = data[context_key]
    if not isinstance(context, str):
        raise ValueError(f"{where}: '{context_key}' must be a string, got {type(context).__name__}")
    return ChoiceItem(context, list(raw), _label_index(data[label_key], labels, len(raw), where), where)


def load_items(data: str, split: str = "validation", limit: int | None = None) -> list[ChoiceItem]:
    """Multiple-choice items from a local file or a hub dataset (cached files work offline)."""
    from posttrain.data.sources import load_records

    records = load_records(data, split=split)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{data}: no items")
    return [to_item(r.data, r.where()) for r in records]


def continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # "... the" + " cat": the space belongs to the continuation's first token
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    prefix = []
    if getattr(tokenizer, "add_bos", False) and tokenizer.bos_id is not None:
        prefix = [tokenizer.bos_id]
    if not context_ids and not prefix:  # nothing to condition on: start from EOS, as the harness does
        prefix = [tokenizer.eos_id]
    return prefix + context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16,
                   max_length: int | None = None) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) pair.

    Sequences longer than the model's context keep their last tokens (the continuation always fits
    unless it alone is longer). Pairs are batched longest first, right-padded.
    """
    max_length = min(max_length or model.config.max_length, model.config.max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rows, spans = [], []
        for i in batch:
            context, cont = requests[i]
            if not cont:
                raise ValueError(f"request {i}: the continuation has no tokens")
            ids = (context + cont)[-(max_length + 1):]
            inputs = ids[:-1]
            n = min(len(cont), len(inputs))
            rows.append(inputs)
            spans.append((len(inputs) - n, ids[len(ids) - n:]))
        width = max(len(r) for r in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids, device=device)
        if hasattr(model, "hidden") and hasattr(model, "lm_head"):
            hidden = model.hidden(input_ids)  # (B, T, C); the head runs on continuation positions only
            picked = torch.cat([hidden[r, s:s + len(t)] for r, (s, t) in enumerate(spans)])
            logits = model.lm_head(picked)
        else:
            full = model(input_ids)
            logits = torch.cat([full[r, s:s + len(t)] for r, (s, t) in enumerate(spans)])
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        targets = torch.tensor([t for _, ts in spans for t in ts], device=device)
        token_lp = logprobs.gather(1, targets[:, None]).squeeze(1).double().cpu()
        offset = 0
        for i, (_, ts) in zip(batch, spans):
            out[i] = float(token_lp[offset:offset + len(ts)].sum())
            offset += len(ts)
    model.train(was_training)
    return out


def score_items(model: nn.Module, tokenizer, items: Sequence[ChoiceItem], batch_size: int = 16,
                delimiter: str = " ") -> tuple[dict, list[dict]]:
    """(acc, acc_norm and their standard errors; one result row per item)."""
    requests, owner = [], []
    for i, item in enumerate(items):
        for choice in item.choices:
            requests.append(continuation_ids(tokenizer, item.context, delimiter + choice))
            owner.append(i)
    lls = loglikelihoods(model, requests, batch_size)
    rows, k = [], 0
    for i, item in enumerate(items):
        scores = lls[k:k + len(item.choices)]
        k += len(item.choices)
        per_char = [s / max(len(c), 1) for s, c in zip(scores, item.choices)]  # the harness's acc_norm
        pred = max(range(len(scores)), key=scores.__getitem__)
        pred_norm = max(range(len(per_char)), key=per_char.__getitem__)
        rows.append({"index": i, "label": item.label, "pred": pred, "pred_norm": pred_norm,
                     "loglikelihoods": scores, "correct": pred == item.label,
                     "correct_norm": pred_norm == item.label})
    return {"n": len(rows), **_rate("acc", [r["correct"] for r in rows]),
            **_rate("acc_norm", [r["correct_norm"] for r in rows])}, rows


def _rate(name: str, hits: Sequence[bool]) -> dict:
    n = len(hits)
    p = sum(hits) / n if n else float("nan")
    # the harness's stderr of a mean: sample standard deviation / sqrt(n)
    stderr = math.sqrt(p * (1 - p) * n / (n - 1) / n) if n > 1 else None
    return {name: p, f"{name}_stderr": stderr}


def choice_command(model: str, data: str | None = None, split: str = "validation", name: str | None = None,
                   out: str | None = None, limit: int | None = None, batch_size: int = 16,
                   delimiter: str = " ", device: str | None = None, dtype: str | None = None) -> dict:
    """Score a multiple-choice task by log-likelihood: acc and length-normalised acc_norm.

    Args:
        model: run directory, preset alias, hub id, local Hugging Face directory or .gguf file.
        data: local JSON/JSONL/CSV/parquet file, or a hub dataset id (e.g. Rowan/hellaswag; offline it
            must be in the hub cache).
        split: split of a hub dataset (validation for HellaSwag: its test labels are hidden).
        name: task name in the output files (default: the data file's or dataset's name).
        out: results JSON (default: RUN/eval/choice-NAME.json; items beside it as .jsonl).
        limit: score only the first N items.
        batch_size: (context, ending) pairs scored together.
        delimiter: text between the context and each ending.
        device: cuda, cpu, ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
    """
    from posttrain.eval.responses import eval_dir, write_jsonl
    from posttrain.generate import load_for_inference

    if not data:
        raise ValueError("pass --data: a local JSON/JSONL file of items, or a hub dataset id (e.g. Rowan/hellaswag)")
    items = load_items(data, split, limit)
    name = name or re.sub(r"[^\w.\-]+", "-", Path(data).stem if Path(data).suffix else data.split("/")[-1])
    out_path = Path(out) if out else eval_dir(model) / f"choice-{name}.json"
    net, tokenizer = load_for_inference(model, device, dtype)
    start = time.perf_counter()
    metrics, rows = score_items(net, tokenizer, items, batch_size, delimiter)
    seconds = time.perf_counter() - start
    result = {"task": name, "model": str(model), "data": str(data), "split": split, **metrics,
              "choices": sum(len(i.choices) for i in items), "seconds": seconds}
    atomic_write(out_path, json.dumps(result, indent=2))
    write_jsonl(out_path.with_suffix(".jsonl"), rows)
    print(f"{name}: acc {metrics['acc']:.4f}  acc_norm {metrics['acc_norm']:.4f}  over {metrics['n']} items "
          f"({seconds:.1f} s) -> {out_path}")
    return result
