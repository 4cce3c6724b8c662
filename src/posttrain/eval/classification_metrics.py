"""Classification metrics from predicted and true class ids: confusion matrix, accuracy, per-class
precision/recall/F1 and macro-F1.

Plain integer arithmetic on a confusion matrix (rows: true class, columns: predicted class), so the
numbers can be checked by hand. Conventions follow scikit-learn's defaults: a class's precision
(recall) is 0 when nothing was predicted as it (it has no examples); macro-F1 is the unweighted mean
of the F1 of every class that occurs among the true labels or the predictions, so a class absent
from a small test split neither helps nor hurts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def confusion_matrix(y_true: Sequence[int] | torch.Tensor, y_pred: Sequence[int] | torch.Tensor,
                     n_classes: int) -> list[list[int]]:
    """counts[t][p]: examples of true class t predicted as class p."""
    t = torch.as_tensor(y_true, dtype=torch.long).flatten()
    p = torch.as_tensor(y_pred, dtype=torch.long).flatten()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.numel()} labels but y_pred {p.numel()}")
    for name, v in (("y_true", t), ("y_pred", p)):
        if v.numel() and (v.min() < 0 or v.max() >= n_classes):
            raise ValueError(f"{name} holds class ids outside 0..{n_classes - 1}")
    flat = torch.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return flat.view(n_classes, n_classes).tolist()


def per_class(confusion: list[list[int]]) -> list[dict]:
    """precision, recall, f1 and support (true examples) of each class."""
    n = len(confusion)
    rows = []
    for c in range(n):
        tp = confusion[c][c]
        predicted = sum(confusion[t][c] for t in range(n))
        support = sum(confusion[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"precision": precision, "recall": recall, "f1": f1, "support": support,
                     "predicted": predicted})
    return rows


def accuracy(confusion: list[list[int]]) -> float:
    total = sum(map(sum, confusion))
    return sum(confusion[c][c] for c in range(len(confusion))) / total if total else 0.0


def macro_f1(confusion: list[list[int]]) -> float:
    """Mean F1 over the classes present among the true labels or the predictions."""
    present = [r["f1"] for r in per_class(confusion) if r["support"] or r["predicted"]]
    return sum(present) / len(present) if present else 0.0


def classification_report(y_true, y_pred, labels: Sequence[str], loss: float | None = None) -> dict:
    """Every metric of one split as a JSON-ready dict: n, loss, accuracy, macro_f1, confusion
    (rows: true label, columns: predicted label, in `labels` order) and per-class scores by name."""
    confusion = confusion_matrix(y_true, y_pred, len(labels))
    report = {"n": sum(map(sum, confusion)), "accuracy": accuracy(confusion), "macro_f1": macro_f1(confusion),
              "confusion": confusion, "per_class": dict(zip(labels, per_class(confusion)))}
    if loss is not None:
        report = {"n": report["n"], "loss": loss, **{k: v for k, v in report.items() if k != "n"}}
    return report


def format_confusion(confusion: list[list[int]], labels: Sequence[str]) -> str:
    """A text table of the confusion matrix (true label down, predicted label across)."""
    names = [str(x) for x in labels]
    width = max([len("true \\ pred"), *map(len, names), *(len(str(v)) for row in confusion for v in row)])
    lines = ["true \\ pred".ljust(width) + "  " + "  ".join(n.rjust(width) for n in names)]
    for name, row in zip(names, confusion):
        lines.append(name.ljust(width) + "  " + "  ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)
