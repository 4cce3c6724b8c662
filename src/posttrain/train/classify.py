"""Classification fine-tuning: a causal LM as a text classifier, through the shared training loop.

    labelled text -> token ids (truncated to max_length) -> batches padded to their longest example
       (pooling `last` with right padding: every text padded to the longest training text, see fixed_length)
    -> model with its LM head replaced by Linear(d_model, n_classes), a freezing policy
    -> the loop (cross-entropy per example; best checkpoint by val accuracy)
    -> metrics per split before and after training, plots, the model with its head in <run>/model

`classify(...)`'s typed signature and docstring are the `posttrain classify` command; with no
arguments it fine-tunes the offline default model (SmolLM2-135M-Instruct) on the SMS Spam Collection
(downloaded once). Raschka's LLMs-from-scratch ch. 6 is the reference setting: GPT-2 small, last
block + final norm + head trained, last-token pooling, AdamW 5e-5 / weight decay 0.1, 5 epochs,
batch 8 (recipes/gpt2/classify-sms-spam.yaml).

A run directory holds, besides the loop's files (metrics.jsonl, tb/, plots/, checkpoints/):
  config.yaml              the resolved options, the label names and the data report
  labels.json              label id -> name
  classification.json      loss, accuracy, macro-F1, confusion matrix per split, before and after
  test_predictions.jsonl   each test example's label, prediction and class probabilities
  model/                   the classifier (posttrain.predict.save_classifier): `posttrain predict RUN`
  summary.json
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain.data.labelled import BALANCE, DEFAULT_SPLIT, SMS_SPAM, LabelledData, LabelledExample, load_labelled
from posttrain.eval.classification_metrics import classification_report, format_confusion
from posttrain.models.heads import (POOLINGS, TRAINABLE_POLICIES, add_classification_head, classifier_logits,
                                    trainable_parameters)
from posttrain.lora import LoraConfig, apply_lora, check_lora, merge_adapter
from posttrain.models.registry import OFFLINE_DEFAULT
from posttrain.report import plot_run
from posttrain.runlog import METRICS_FILE, read_jsonl, write_config
from posttrain.train.loop import TrainConfig, _autocast, _resolve_precision, train
from posttrain.train.losses import LossFn, counts
from posttrain.weights.checkpoint import atomic_write, load_checkpoint, resolve_checkpoint

PADDING_SIDES = ("right", "left")
SPLITS = ("train", "val", "test")
FINAL = ("best", "last")
CLASSIFICATION_FILE, PREDICTIONS_FILE, LABELS_FILE = "classification.json", "test_predictions.jsonl", "labels.json"


@dataclass
class ClassifyDataConfig:
    """Labelled texts: source, columns, labels, split, balance and batching.

    Attributes:
        path: csv/tsv/jsonl/json/parquet file, URL, hub dataset id, or sms-spam
        text_column: column (or JSON key) holding the text
        label_column: column (or JSON key) holding the label name
        columns: column names of a CSV/TSV file without a header row
        labels: label names in id order (default: the data's labels, sorted)
        group_column: rows sharing this column's value stay in one split
        val_path: separate validation / test files (then `path` is all training data)
        test_path: separate test file
        split: train, val, test fractions after a seeded shuffle
        seed: shuffling, undersampling and the batch order
        balance: undersample | class-weights | none | auto (undersample for sms-spam)
        max_length: tokens per text; longer texts keep their first max_length tokens
        batch_size: examples per micro-batch
        eval_batch_size: examples per batch when measuring a split
        padding_side: right | left: where pads go in a batch
        urls: download URLs of a named dataset (default: UCI, then a mirror)
    """
    path: str = SMS_SPAM
    text_column: str = "text"
    label_column: str = "label"
    columns: list[str] | None = None
    labels: list[str] | None = None
    group_column: str | None = None
    val_path: str | None = None
    test_path: str | None = None
    split: tuple[float, float, float] = DEFAULT_SPLIT
    seed: int = 123
    balance: str = "auto"
    max_length: int = 256
    batch_size: int = 8
    eval_batch_size: int = 32
    padding_side: str = "right"
    urls: list[str] | None = None


@dataclass
class HeadConfig:
    """The classification head: what trains and which position it reads.

    Attributes:
        trainable: head | last-k | all | lora (adapters + head; set by lora.r > 0)
        last_k: last-k: the last k blocks + final norm + head
        pooling: last | last-nonpad | mean
        bias: False: the head is Hugging Face's `score` (transformers loads the run)
    """
    trainable: str = "last-k"
    last_k: int = 1
    pooling: str = "last-nonpad"
    bias: bool = False


@dataclass
class EvalConfig:
    """What is measured before and after training, and which weights are kept.

    Attributes:
        before: metrics of every split before training too
        splits: splits measured at the start and the end
        final: best (highest val accuracy) | last: the weights saved and measured
        samples: val texts classified at each evaluation (samples.jsonl)
    """
    before: bool = True
    splits: tuple[str, ...] = SPLITS
    final: str = "best"
    samples: int = 3


def classify_train_config() -> TrainConfig:
    """LLMs-from-scratch ch. 6: AdamW 5e-5, weight decay 0.1, 5 epochs, constant rate; best by val accuracy."""
    return TrainConfig(lr=5e-5, weight_decay=0.1, epochs=5, schedule="constant", eval_every=50,
                       best_metric="val_accuracy", best_mode="max")


# ----------------------------------------------------------------------------------------------
# Tokens and batches

def tokenize_texts(texts: Sequence[str], tokenizer, max_length: int) -> tuple[list[np.ndarray], int]:
    """Token ids per text (BOS first when the model was trained with one), cut to max_length tokens;
    returns (ids, how many texts were cut)."""
    encoded = tokenizer.encode_batch(list(texts), bos=tokenizer.add_bos)
    truncated = sum(len(ids) > max_length for ids in encoded)
    return [np.asarray(ids[:max_length], dtype=np.int64) for ids in encoded], truncated


def collate(ids: Sequence[np.ndarray], pad_id: int, padding_side: str = "right",
            labels: Sequence[int] | None = None, pad_to: int | None = None) -> dict:
    """A batch padded to its longest example (or to `pad_to` tokens when that is longer).

    input_ids (B, T), attention_mask (B, T) bool (True: real token), labels (B,) when given.
    Right padding needs nothing else: under causal attention no real token sees the pads after it.
    Left padding also gives position_ids counting from each row's first real token and document_ids
    (pads -1, text 0) so that real tokens never attend to the pads before them.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side {padding_side!r} is unknown; choose one of: {', '.join(PADDING_SIDES)}")
    B, T = len(ids), max(max(len(x) for x in ids), pad_to or 0)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.bool)
    for r, x in enumerate(ids):
        span = slice(0, len(x)) if padding_side == "right" else slice(T - len(x), T)
        input_ids[r, span] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        mask[r, span] = True
    batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": None, "document_ids": None,
             "num_tokens": sum(len(x) for x in ids)}
    if padding_side == "left" and not bool(mask.all()):
        batch["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        batch["document_ids"] = torch.where(mask, 0, -1)
    if labels is not None:
        batch["labels"] = torch.as_tensor(list(labels), dtype=torch.long)
    return batch


def cut_to_length(token_ids: dict[str, list[np.ndarray]], truncated: dict[str, int], length: int
                  ) -> tuple[dict[str, list[np.ndarray]], dict[str, int]]:
    """Every split's texts cut to `length` tokens, and the per-split truncation counts with these cuts
    added (val/test texts longer than the longest training text are cut: counted, never silently)."""
    counts = {s: truncated.get(s, 0) + sum(len(x) > length for x in ids) for s, ids in token_ids.items()}
    return {s: [x[:length] for x in ids] for s, ids in token_ids.items()}, counts


def fixed_length(train_ids: Sequence[np.ndarray], pooling: str, padding_side: str) -> int | None:
    """The one length every text is cut and padded to, or None (batches padded to their longest example).

    Pooling `last` under right padding reads the row's last slot: a pad for every text shorter than
    its batch's longest, whose hidden state depends on how many pads precede it. With batches padded
    to their longest example a text's logits would then depend on its batch, and prediction would not
    reproduce evaluation. So, as in LLMs-from-scratch ch. 6 (every message padded to the longest
    training message, longer val/test messages cut), all rows take the length of the longest training
    text. Left padding or the other poolings need no fixed length: a text's logits are its own.
    """
    if pooling != "last" or padding_side != "right":
        return None
    return max(len(x) for x in train_ids)


class ClassificationBatches:
    """Batches of (token ids, label) examples: a batch source for the loop (`len`, `epoch`).

    Epoch e's order is a permutation seeded by (seed, e) when shuffling, so resuming mid-epoch gets
    the same batches. Without shuffling, batches follow the data order, or with `by_length` hold
    examples of similar length (less padding: evaluation and prediction put each result back in
    its place through `batch_order`). `pad_to`: every row padded to this many tokens (pooling `last`).
    """

    def __init__(self, ids: Sequence[np.ndarray], labels: Sequence[int] | None, batch_size: int, pad_id: int,
                 padding_side: str = "right", shuffle: bool = False, seed: int = 0, by_length: bool = False,
                 pad_to: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not len(ids):
            raise ValueError("no examples to batch")
        if shuffle and by_length:
            raise ValueError("shuffle and by_length exclude each other")
        self.ids, self.labels = list(ids), (list(labels) if labels is not None else None)
        self.batch_size, self.pad_id, self.padding_side = batch_size, pad_id, padding_side
        self.shuffle, self.seed, self.by_length, self.pad_to = shuffle, seed, by_length, pad_to

    def __len__(self) -> int:
        return math.ceil(len(self.ids) / self.batch_size)

    def batch_order(self, epoch: int = 0) -> list[np.ndarray]:
        """Example indices of each batch of `epoch`."""
        n = len(self.ids)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        elif self.by_length:
            order = np.argsort([len(x) for x in self.ids], kind="stable")
        else:
            order = np.arange(n)
        return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

    def collate(self, idx: Sequence[int]) -> dict:
        labels = [self.labels[i] for i in idx] if self.labels is not None else None
        return collate([self.ids[i] for i in idx], self.pad_id, self.padding_side, labels, self.pad_to)

    def epoch(self, epoch: int = 0, start: int = 0):
        for idx in self.batch_order(epoch)[start:]:
            yield self.collate(idx)

    def __iter__(self):
        return self.epoch(0)

    def examples_seen(self, grad_accum: int, steps: int) -> list[int]:
        """Examples trained on after each of `steps` optimizer steps (index 0: before the first).

        The loop's steps never span two epochs, and only an epoch's last batch can be short.
        """
        sizes = [len(b) for b in self.batch_order(0)]
        seen, out = 0, [0]
        while len(out) <= steps:
            for i in range(0, len(sizes), grad_accum):
                seen += sum(sizes[i:i + grad_accum])
                out.append(seen)
                if len(out) > steps:
                    break
        return out


# ----------------------------------------------------------------------------------------------
# Loss and evaluation

def count_examples(batch: dict) -> int:
    return int(batch["labels"].shape[0])


def classification_loss(pooling: str = "last-nonpad", class_weights: Sequence[float] | None = None) -> LossFn:
    """Cross-entropy of the pooled-and-headed logits, summed over the examples (the loop divides by the
    examples of the step); metric: correct predictions (-> accuracy).

    With class weights the sum is of weight[label] * loss per example (scikit-learn's "balanced"
    weights keep its mean near the unweighted one).
    """
    weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights else None

    @counts(count_examples)
    def loss_fn(model: nn.Module, batch: dict):
        logits = classifier_logits(model, batch, pooling)  # (B, K) fp32
        labels = batch["labels"]
        w = weight.to(logits.device) if weight is not None else None
        loss_sum = F.cross_entropy(logits, labels, weight=w, reduction="sum")
        correct = (logits.argmax(dim=-1) == labels).sum()
        return loss_sum, labels.shape[0], {"accuracy": correct}

    return loss_fn


@torch.no_grad()
def predict_logits(model: nn.Module, batches: ClassificationBatches, pooling: str, device: torch.device | str,
                   autocast=None) -> torch.Tensor:
    """Class logits (N, K) in fp32 on the CPU, row i for example i whatever order the batches take."""
    was_training = model.training
    model.eval()
    out = None
    for idx in batches.batch_order(0):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches.collate(idx).items()}
        with autocast() if autocast is not None else contextlib.nullcontext():
            logits = classifier_logits(model, batch, pooling).float().cpu()
        if out is None:
            out = torch.empty(len(batches.ids), logits.shape[1])
        out[torch.as_tensor(idx, dtype=torch.long)] = logits
    model.train(was_training)
    return out


def evaluate_split(model: nn.Module, batches: ClassificationBatches, labels: Sequence[str], pooling: str,
                   device, autocast=None) -> tuple[dict, torch.Tensor]:
    """(metrics of one split: n, loss (mean unweighted cross-entropy), accuracy, macro_f1, confusion,
    per_class; the class probabilities (N, K))."""
    logits = predict_logits(model, batches, pooling, device, autocast)
    y = torch.as_tensor(batches.labels, dtype=torch.long)
    loss = F.cross_entropy(logits, y).item()
    return classification_report(y, logits.argmax(dim=-1), labels, loss), logits.softmax(dim=-1)


# ----------------------------------------------------------------------------------------------
# The command

def classify(model: str = OFFLINE_DEFAULT, data: ClassifyDataConfig = ClassifyDataConfig(),
             head: HeadConfig = HeadConfig(), train: TrainConfig = classify_train_config(),
             evaluation: EvalConfig = EvalConfig(), lora: LoraConfig = LoraConfig(), run_dir: str | None = None,
             runs: str = "runs", name: str | None = None) -> dict:
    """Fine-tune a causal LM as a text classifier (spam detection, any labelled text).

    The LM head is replaced by Linear(d_model, n_classes); the trainable set, the pooled position and
    the data are options. Writes a run directory whose model `posttrain predict RUN "text"` uses.
    Default: the offline SmolLM2-135M-Instruct on the SMS Spam Collection (downloaded once).

    Args:
        model: preset alias, hub id, local Hugging Face directory, .gguf file or run directory.
        data: labelled data (columns, labels, splits, balancing), token length and batching.
        head: trainable parameters (head | last-k | all | lora), last_k, pooling (last | last-nonpad | mean).
        train: optimizer, schedule, precision, evaluation cadence, checkpoints (best by val accuracy).
        evaluation: metrics before training, splits measured, which weights are final (best | last).
        lora: LoRA / rsLoRA / DoRA adapters on the blocks (lora.r > 0, then head.trainable is lora: the
            adapters and the head train); QLoRA with lora.quantize nf4 (CUDA). model/ holds the merged classifier.
        run_dir: where the run is written (default: RUNS/NAME).
        runs: folder of runs.
        name: run name (default: classify-<model>-<time>).
    """
    return run_classify(model, data, head, train, evaluation, run_dir, runs, name, lora)


def check_options(data: ClassifyDataConfig, head: HeadConfig, evaluation: EvalConfig, train_config: TrainConfig
                  ) -> None:
    """Raise ValueError naming the allowed values when an option is not one of them (before any loading)."""
    choices = [("data.balance", data.balance, BALANCE), ("data.padding_side", data.padding_side, PADDING_SIDES),
               ("head.trainable", head.trainable, tuple(TRAINABLE_POLICIES)), ("head.pooling", head.pooling, POOLINGS),
               ("evaluation.final", evaluation.final, FINAL)]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{key} {value!r} is unknown; choose one of: {', '.join(allowed)}")
    unknown = [s for s in evaluation.splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"evaluation.splits {unknown} unknown; choose from {', '.join(SPLITS)}")
    if data.max_length < 1 or data.batch_size < 1 or data.eval_batch_size < 1:
        raise ValueError("data.max_length, data.batch_size and data.eval_batch_size must be >= 1")
    if head.last_k < 0:
        raise ValueError(f"head.last_k must be >= 0, got {head.last_k}")
    if train_config.best_metric.startswith("val_") and train_config.best_metric not in ("val_loss", "val_accuracy"):
        raise ValueError(f"train.best_metric {train_config.best_metric!r}: a classification run logs val_loss and "
                         f"val_accuracy")


def run_classify(model: str, data: ClassifyDataConfig, head: HeadConfig, train_config: TrainConfig,
                 evaluation: EvalConfig, run_dir: str | None, runs: str = "runs", name: str | None = None,
                 lora: LoraConfig = LoraConfig()) -> dict:
    from posttrain.predict import save_classifier
    from posttrain.train.run import check_run_dir, load_capped, resolve_run_dir, train_device
    from posttrain.weights import load

    run_dir = resolve_run_dir(run_dir, runs, name, "classify", model)
    device = train_device(train_config.device)
    # Mistakes that need no model are reported before the model loads.
    check_options(data, head, evaluation, train_config)
    check_lora(lora, device)
    if head.trainable == "lora" and not lora.enabled:
        raise ValueError("head.trainable lora needs adapters: set their rank, --lora.r (e.g. 16)")
    check_run_dir(run_dir, train_config.resume)
    labelled = load_labelled(data.path, data.text_column, data.label_column, data.columns, data.labels,
                             data.val_path, data.test_path, tuple(data.split), data.seed, data.balance,
                             data.group_column, data.urls)
    print(labelled.summary())

    net, tokenizer, data = load_capped(model, data)
    torch.manual_seed(train_config.seed)  # the head's initialisation is part of the run's seed
    add_classification_head(net, len(labelled.labels), bias=head.bias)
    if lora.enabled:  # adapters on the blocks; the new head trains in full beside them (peft's modules_to_save)
        net = apply_lora(net, lora, base=model, modules_to_save=["lm_head"], device=device,
                         seed=train_config.seed)
        head = replace(head, trainable="lora")
    params = trainable_parameters(net, head.trainable, head.last_k)
    n_train = sum(p.numel() for p in params)
    print(f"head: Linear({net.lm_head.in_features}, {len(labelled.labels)}); trainable {head.trainable}"
          f"{f' (k={head.last_k})' if head.trainable == 'last-k' else ''}: {n_train:,} of "
          f"{sum(p.numel() for p in net.parameters()):,} parameters; pooling {head.pooling}")

    token_ids, truncated = {}, {}
    for s in SPLITS:
        if getattr(labelled, s):
            token_ids[s], truncated[s] = tokenize_texts([e.text for e in getattr(labelled, s)], tokenizer,
                                                        data.max_length)
    pad_to = fixed_length(token_ids["train"], head.pooling, data.padding_side)
    if pad_to is not None:
        token_ids, truncated = cut_to_length(token_ids, truncated, pad_to)
        print(f"pooling last with right padding: every text cut and padded to {pad_to} tokens (the longest "
              f"training text)")
    if any(truncated.values()):
        print(f"texts cut to {pad_to or data.max_length} tokens (first tokens kept): {truncated}")

    def batches(split: str, shuffle: bool, batch_size: int) -> ClassificationBatches | None:
        if split not in token_ids:
            return None
        return ClassificationBatches(token_ids[split], [e.label for e in getattr(labelled, split)], batch_size,
                                     tokenizer.pad_id, data.padding_side, shuffle=shuffle, seed=data.seed,
                                     by_length=not shuffle, pad_to=pad_to)

    train_batches = batches("train", True, data.batch_size)
    eval_sets = {s: batches(s, False, data.eval_batch_size) for s in SPLITS}
    write_config(run_dir, {"task": "classify", "model": model, "data": asdict(data), "head": asdict(head),
                           "train": asdict(train_config), "evaluation": asdict(evaluation), "lora": asdict(lora),
                           "labels": labelled.labels, "class_weights": labelled.class_weights,
                           "data_report": {**labelled.report, "truncated": truncated}})
    atomic_write(run_dir / LABELS_FILE, json.dumps({"labels": labelled.labels}, indent=1))

    autocast = _autocast(_resolve_precision(train_config.precision, device), device)
    net.to(device)
    measured = [s for s in evaluation.splits if eval_sets.get(s) is not None]
    results: dict = {"labels": labelled.labels}
    before_path = run_dir / "classification_before.json"
    resuming = train_config.resume and resolve_checkpoint(run_dir / "checkpoints" / "last") is not None
    if resuming and before_path.is_file():
        results["before"] = json.loads(before_path.read_text())  # measured by the first attempt
    elif evaluation.before and not resuming:
        results["before"] = {s: evaluate_split(net, eval_sets[s], labelled.labels, head.pooling, device, autocast)[0]
                             for s in measured}
        atomic_write(before_path, json.dumps(results["before"], indent=1))
        print("before training: " + _accuracies(results["before"]))

    loss_fn = classification_loss(head.pooling, labelled.class_weights)
    sample_fn = _sample_fn(labelled, tokenizer, data, head.pooling, evaluation.samples, pad_to)
    summary = train(net, train_config, train_batches, loss_fn, run_dir, val_data=eval_sets["val"],
                    sample_fn=sample_fn, trainable_params=params)

    best = resolve_checkpoint(run_dir / "checkpoints" / "best")
    final = "last"
    if evaluation.final == "best" and best is not None and summary.get("best_step"):
        load_checkpoint(best, net, restore_rng=False)
        final = f"best (step {summary['best_step']}, {train_config.best_metric} {summary['best']:.4f})"
    if lora.enabled:  # the final classifier: adapters and head folded into the base, measured as saved

        def full_precision_base():  # QLoRA's base is 4-bit: merge into the original weights instead
            base = load(model)[0]
            add_classification_head(base, len(labelled.labels), bias=head.bias)
            return base

        net = merge_adapter(net, full_precision_base if lora.quantize else None).to(device)
    results["final_weights"] = final
    results["after"], probabilities = {}, {}
    for s in measured:
        results["after"][s], probabilities[s] = evaluate_split(net, eval_sets[s], labelled.labels, head.pooling,
                                                               device, autocast)
    atomic_write(run_dir / CLASSIFICATION_FILE, json.dumps(results, indent=1))
    if "test" in probabilities:
        _write_predictions(run_dir / PREDICTIONS_FILE, labelled.test, labelled.labels, probabilities["test"])
    save_classifier(net, tokenizer, labelled.labels, run_dir / "model",
                    {"pooling": head.pooling, "max_length": pad_to or data.max_length, "pad_to": pad_to,
                     "padding_side": data.padding_side, "text_column": data.text_column,
                     "label_column": data.label_column})
    annotate_metrics(run_dir, train_batches.examples_seen(train_config.grad_accum, summary["steps"]),
                     results.get("before", {}).get("val"))
    plot_run(run_dir)

    print(f"final weights: {final}")
    print("after training: " + _accuracies(results["after"]))
    if "test" in results["after"]:
        print(format_confusion(results["after"]["test"]["confusion"], labelled.labels))
    out = {**summary, "model_dir": str(run_dir / "model"), "labels": labelled.labels, "final_weights": final,
           "trainable_parameters": n_train,
           **{f"{s}_accuracy_before": m["accuracy"] for s, m in results.get("before", {}).items()},
           **{f"{s}_accuracy": m["accuracy"] for s, m in results["after"].items()},
           **{f"{s}_macro_f1": m["macro_f1"] for s, m in results["after"].items()}}
    atomic_write(run_dir / "summary.json", json.dumps(out, indent=2, default=str))
    print(f"run: {run_dir}  (metrics: {run_dir / CLASSIFICATION_FILE}, plots: {run_dir / 'plots'}, "
          f"model: {run_dir / 'model'})")
    return out


def _accuracies(metrics: dict) -> str:
    return ", ".join(f"{s} accuracy {m['accuracy']:.4f} (macro-F1 {m['macro_f1']:.4f}, n {m['n']})"
                     for s, m in metrics.items())


def _sample_fn(labelled: LabelledData, tokenizer, data: ClassifyDataConfig, pooling: str, n: int,
               pad_to: int | None = None):
    """The first n val texts classified at each evaluation (rows of samples.jsonl)."""
    examples = labelled.val[:n]
    if not examples:
        return None
    ids, _ = tokenize_texts([e.text for e in examples], tokenizer, pad_to or data.max_length)

    def sample(model: nn.Module, step: int) -> list[dict]:
        device = next(model.parameters()).device
        batches = ClassificationBatches(ids, None, len(ids), tokenizer.pad_id, data.padding_side, pad_to=pad_to)
        probs = predict_logits(model, batches, pooling, device).softmax(dim=-1)
        return [{"text": e.text, "label": labelled.labels[e.label],
                 "prediction": labelled.labels[int(p.argmax())], "p": round(float(p.max()), 4)}
                for e, p in zip(examples, probs)]

    return sample


def _write_predictions(path: Path, examples: list[LabelledExample], labels: list[str], probs: torch.Tensor) -> None:
    rows = [{"where": e.where, "text": e.text, "label": labels[e.label], "prediction": labels[int(p.argmax())],
             "probabilities": dict(zip(labels, p.tolist()))} for e, p in zip(examples, probs)]
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def annotate_metrics(run_dir: Path, examples_seen: list[int], before_val: dict | None = None) -> None:
    """Add `examples_seen` to every metrics.jsonl row (the loop counts steps and tokens; a classifier's
    natural x axis is examples) and, once, a step-0 row with the validation metrics before training,
    so the plots start from the untrained model. Rewritten atomically."""
    path = Path(run_dir) / METRICS_FILE
    rows = read_jsonl(path)
    for row in rows:
        step = row.get("step")
        if isinstance(step, int) and 0 <= step < len(examples_seen):
            row["examples_seen"] = examples_seen[step]
    if before_val is not None and not any(r.get("step") == 0 for r in rows):
        rows.insert(0, {"step": 0, "epoch": 0.0, "tokens_seen": 0, "examples_seen": 0,
                        "val_loss": before_val["loss"], "val_accuracy": before_val["accuracy"]})
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
