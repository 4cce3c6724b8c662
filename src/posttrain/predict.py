"""A trained classifier: how it is saved, loaded and asked for labels.

    posttrain predict RUN "some text"                       # the label and the class probabilities
    posttrain predict RUN --input texts.csv --output labelled.jsonl

    clf = Classifier.load("runs/spam")                      # a run directory or its model/ folder
    clf.predict(["WINNER!! Claim your prize", "see you at 6"])   # [{"label": "spam", "probabilities": {...}}, ...]

Saved format (a run's `model/` folder): a Hugging Face sequence-classification directory.
  config.json         the backbone's config with architectures ["GPT2ForSequenceClassification"] (or
                      Llama/Qwen2), num_labels, id2label, label2id, pad_token_id
  model.safetensors   the backbone under Hugging Face's names (GPT-2's Conv1D weights transposed back)
                      and the head as `score.weight` (+ `score.bias` when head.bias), no LM head
  tokenizer files     tokenizer.json, tokenizer_config.json
  classifier.json     what posttrain needs beyond that: labels, pooling, max_length, padding_side,
                      pad_to (the fixed row length of pooling `last` under right padding), text and
                      label columns
With the default head (no bias) and pooling (last-nonpad), transformers'
AutoModelForSequenceClassification loads the folder and gives the same logits.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from posttrain.data.labelled import label_text, read_labelled_records
from posttrain.data.sources import DataError
from posttrain.eval.classification_metrics import classification_report, format_confusion
from posttrain.models.heads import add_classification_head
from posttrain.train.classify import ClassificationBatches, predict_logits, tokenize_texts
from posttrain.weights.checkpoint import atomic_write

CLASSIFIER_FILE = "classifier.json"
HEAD_KEY = "score"  # Hugging Face's name for the classification head of *ForSequenceClassification
_ARCHITECTURES = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                  "qwen2": "Qwen2ForSequenceClassification"}


def save_classifier(model: nn.Module, tokenizer, labels: Sequence[str], out_dir: str | os.PathLike,
                    settings: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the classifier as a Hugging Face sequence-classification directory (module docstring).

    settings: pooling, max_length, padding_side, text_column, label_column (kept in classifier.json).
    Written beside `out_dir` and renamed into place: a crash leaves the old folder or the new one.
    """
    from safetensors.torch import save_file

    from posttrain.weights.export import hf_state_dict, staged_directory

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").exists())):
        raise FileExistsError(f"{out} exists and is not a model directory; refusing to replace it")
    labels = [str(x) for x in labels]
    if model.lm_head.out_features != len(labels):
        raise ValueError(f"the head has {model.lm_head.out_features} outputs but there are {len(labels)} labels")
    dtype = dtype or model.lm_head.weight.dtype
    state, _ = hf_state_dict(model, dtype)  # the head is untied from the embedding: kept as lm_head.*
    state = {(HEAD_KEY + k[len("lm_head"):] if k.startswith("lm_head.") else k): v for k, v in state.items()}
    config = model.config.to_hf()
    config.update(architectures=[_ARCHITECTURES[model.config.model_type]], dtype=str(dtype).removeprefix("torch."),
                  num_labels=len(labels), id2label={str(i): n for i, n in enumerate(labels)},
                  label2id={n: i for i, n in enumerate(labels)}, problem_type="single_label_classification",
                  pad_token_id=tokenizer.pad_id if tokenizer is not None else None)
    meta = {"labels": labels, "pooling": "last-nonpad", "max_length": model.config.max_length,
            "padding_side": "right", "text_column": "text", "label_column": "label",
            "head_bias": model.lm_head.bias is not None, **(settings or {})}

    with staged_directory(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / CLASSIFIER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return out


def classifier_dir(path: str | os.PathLike) -> Path:
    """The folder holding classifier.json: `path` itself or a run directory's model/."""
    path = Path(path).expanduser()
    for candidate in (path, path / "model"):
        if (candidate / CLASSIFIER_FILE).is_file():
            return candidate
    if (path / "model" / "config.json").is_file() or (path / "config.json").is_file():
        raise ValueError(f"{path} holds a language model, not a classifier (no {CLASSIFIER_FILE}); train one "
                         f"with `posttrain classify`")
    raise FileNotFoundError(f"{path}: not a classifier run (expected {path / 'model' / CLASSIFIER_FILE})")


def load_classifier_model(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                          device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(native model with its classification head as lm_head, classifier.json settings)."""
    from posttrain.weights.hub import (assign_weights, empty_model, hf_to_native, read_config, read_safetensors,
                                       safetensors_files)

    directory = classifier_dir(directory)
    meta = json.loads((directory / CLASSIFIER_FILE).read_text())
    config = read_config(directory)
    model = empty_model(config, dtype, device)
    add_classification_head(model, len(meta["labels"]), bias=bool(meta.get("head_bias")))
    expected = set(model.state_dict())

    def native(key: str, tensor: torch.Tensor):
        if key.startswith(HEAD_KEY + "."):
            return "lm_head" + key[len(HEAD_KEY):], tensor
        return hf_to_native(key, tensor, config, expected)

    assign_weights(model, (native(k, t) for k, t, _ in read_safetensors(safetensors_files(directory))),
                   source=str(directory))
    return model.eval(), meta


@dataclass
class Classifier:
    """A loaded classifier: model (head as lm_head), tokenizer and the settings it was trained with."""
    model: nn.Module
    tokenizer: object
    labels: list[str]
    pooling: str = "last-nonpad"
    max_length: int = 256
    padding_side: str = "right"
    pad_to: int | None = None  # every row padded to this length (pooling last, right padding)
    text_column: str = "text"
    label_column: str = "label"

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", dtype: torch.dtype = torch.float32) -> "Classifier":
        """From a run directory or a saved classifier folder."""
        from posttrain.tokenizer import Tokenizer

        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        directory = classifier_dir(path)
        model, meta = load_classifier_model(directory, dtype, device)
        keys = ("pooling", "max_length", "padding_side", "pad_to", "text_column", "label_column")
        settings = {k: meta[k] for k in keys if k in meta}
        return cls(model, Tokenizer.from_dir(directory), list(meta["labels"]), **settings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def probabilities(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities (N, K), in label order, computed as evaluation computes them."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataError(f"text {i} is empty; every text to classify needs some content")
        ids, _ = tokenize_texts(texts, self.tokenizer, self.max_length)
        batches = ClassificationBatches(ids, None, batch_size, self.tokenizer.pad_id, self.padding_side,
                                        by_length=True, pad_to=self.pad_to)
        return predict_logits(self.model, batches, self.pooling, self.device).softmax(dim=-1)

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[dict]:
        """[{"label": name, "probabilities": {name: p, ...}}, ...] per text."""
        probs = self.probabilities(texts, batch_size)
        return [{"label": self.labels[int(p.argmax())], "probabilities": dict(zip(self.labels, p.tolist()))}
                for p in probs]


def load_classifier(path: str | os.PathLike, device: str = "auto") -> Classifier:
    return Classifier.load(path, device)


# ----------------------------------------------------------------------------------------------
# Files in, files out

def read_texts(path: str | os.PathLike, text_column: str) -> tuple[list[dict], list[str]]:
    """(records as dicts, their texts) of an input file: .txt is one text per line; CSV/TSV/JSONL/JSON/
    parquet rows give `text_column` (a missing or empty text is an error naming the row)."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"{path}: the file holds no texts")
        return [{text_column: line} for line in lines], lines
    records = read_labelled_records(path)
    if not records:
        raise DataError(f"{path}: no records to classify")
    texts = []
    for r in records:
        if text_column not in r.data:
            raise DataError(f"{r.where()}: no text column {text_column!r}; the record has {sorted(r.data)[:12]}. "
                            f"Pass --text_column")
        text = r.data[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{r.where()}: the text ({text_column!r}) is empty or missing; fix or remove the row")
        texts.append(text)
    return [r.data for r in records], texts


def write_predictions(path: str | os.PathLike, rows: list[dict], predictions: list[dict], labels: list[str]) -> Path:
    """Each input row plus `prediction` and its probabilities: JSONL/JSON (a `probabilities` object)
    or CSV/TSV (one `p_<label>` column per label), by the output's suffix; written atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        out = [{**r, "prediction": p["label"], **{f"p_{k}": v for k, v in p["probabilities"].items()}}
               for r, p in zip(rows, predictions)]
        buf = io.StringIO()
        columns = list(dict.fromkeys(k for row in out for k in row))
        writer = csv.DictWriter(buf, columns, delimiter="\t" if suffix == ".tsv" else ",",
                                quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL, escapechar="\\")
        writer.writeheader()
        writer.writerows(out)
        atomic_write(path, buf.getvalue())
        return path
    out = [{**r, "prediction": p["label"], "probabilities": p["probabilities"]} for r, p in zip(rows, predictions)]
    if suffix == ".json":
        atomic_write(path, json.dumps(out, indent=1, ensure_ascii=False, default=str))
    elif suffix in (".jsonl", ".ndjson"):
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in out))
    else:
        raise ValueError(f"{path}: output type {suffix or '(none)'} unknown; use .jsonl, .json, .csv or .tsv")
    return path


def predict_command(run: str, text: str | None = None, input: str | None = None, output: str | None = None,
                    text_column: str | None = None, batch_size: int = 32, device: str = "auto") -> list[dict]:
    """Label texts with a trained classifier: one text (printed) or a whole file.

    `posttrain predict RUN "some text"` prints the label and the class probabilities;
    `posttrain predict RUN --input FILE --output FILE` labels every row of FILE (CSV/TSV/JSONL/JSON/
    parquet, or .txt with one text per line) and writes .jsonl/.json/.csv/.tsv. When the input also
    holds the run's label column, accuracy and macro-F1 on it are printed.

    Args:
        run: run directory of `posttrain classify` (or its model/ folder).
        text: a text to classify.
        input: file of texts to classify.
        output: where to write the labelled rows (default: print them as JSON lines).
        text_column: the input's text column (default: the column the run was trained on).
        batch_size: texts per forward pass.
        device: auto (cuda when available), cpu, cuda, ...
    """
    if (text is None) == (input is None):
        raise ValueError("give either a text (posttrain predict RUN \"some text\") or --input FILE")
    if output is not None and input is None:
        raise ValueError("--output needs --input (a single text's prediction is printed)")
    clf = Classifier.load(run, device)
    if text is not None:
        [result] = clf.predict([text], batch_size)
        print(result["label"])
        width = max(map(len, clf.labels))
        for name, p in result["probabilities"].items():
            print(f"  {name.ljust(width)}  {p:.4f}")
        return [result]
    column = text_column or clf.text_column
    rows, texts = read_texts(input, column)
    predictions = clf.predict(texts, batch_size)
    if output is not None:
        write_predictions(output, rows, predictions, clf.labels)
        print(f"labelled {len(rows)} rows of {input} -> {output}")
    else:
        for r, p in zip(rows, predictions):
            print(json.dumps({**r, "prediction": p["label"], "probabilities": p["probabilities"]},
                             ensure_ascii=False, default=str))
    gold = [label_text(r.get(clf.label_column)) for r in rows]
    if all(g in clf.labels for g in gold):
        index = {n: i for i, n in enumerate(clf.labels)}
        report = classification_report([index[g] for g in gold], [index[p["label"]] for p in predictions],
                                       clf.labels)
        print(f"{input}: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} "
              f"against its {clf.label_column!r} column (n {report['n']})", file=sys.stderr)
        print(format_confusion(report["confusion"], clf.labels), file=sys.stderr)
    return predictions


def positional_text_argv(argv: list[str]) -> list[str]:
    """`predict RUN TEXT [options]` -> `predict RUN --text TEXT [options]`.

    jsonargparse makes only required parameters positional, and the text is optional (--input is the
    other way), so the command line's second positional is rewritten before parsing. Every option of
    the predict command takes one value (`--opt value` or `--opt=value`); -h/--help/--print_config none.
    """
    if not argv or argv[0] != "predict" or "--text" in argv or any(a.startswith("--text=") for a in argv):
        return argv
    out, positionals, i = [argv[0]], 0, 1
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and len(arg) > 1:
            out.append(arg)
            takes_value = "=" not in arg and arg not in ("-h", "--help", "--print_config")
            if takes_value and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        else:
            positionals += 1
            out.extend(["--text", arg] if positionals == 2 else [arg])
        i += 1
    return out
