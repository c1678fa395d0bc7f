"""What a classifier's predictions on a split say, beyond accuracy: macro-F1, per-class precision
and recall, the confusion matrix, and the rate a majority-class predictor would reach on the same
rows. Accuracy alone hides a model that predicts one class for every row: on a split that is 70%
one class, it scores 0.70.

Macro averages run over the classes present in the split's labels or predictions (a class that is
neither has no precision or recall to average). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion(true: Sequence[int], pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    true, pred = np.asarray(true, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    counts = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def report(matrix: np.ndarray | Sequence[Sequence[int]], labels: list[str]) -> dict:
    """The split's figures from its confusion matrix (rows true, columns predicted, in `labels`'
    order)."""
    m = np.asarray(matrix, dtype=np.int64)
    n = int(m.sum())
    support, predicted, hits = m.sum(1), m.sum(0), np.diag(m)
    per_class = {}
    f1s = []
    for k, label in enumerate(labels):
        precision = hits[k] / predicted[k] if predicted[k] else 0.0
        recall = hits[k] / support[k] if support[k] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(float(precision), 4),
            "recall": round(float(recall), 4),
            "f1": round(float(f1), 4),
            "support": int(support[k]),
            "predicted": int(predicted[k]),
        }
        if support[k] or predicted[k]:
            f1s.append(f1)
    majority = int(support.argmax()) if n else 0
    return {
        "n": n,
        "accuracy": float(hits.sum() / n) if n else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "majority_label": labels[majority] if n else None,
        "majority_rate": float(support[majority] / n) if n else None,
        "majority_macro_f1": majority_macro_f1(support) if n else None,
        "predicted_classes": int((predicted > 0).sum()),
        "labels": list(labels),
        "per_class": per_class,
        "confusion_matrix": m.tolist(),
    }


def majority_macro_f1(support: np.ndarray) -> float:
    """Macro-F1 of predicting the most frequent class for every row: that class's F1 is
    2p / (1 + p) (precision p, recall 1), every other present class's is 0."""
    support = np.asarray(support)
    present = int((support > 0).sum())
    p = support.max() / support.sum()
    return float(2 * p / (1 + p) / present)


def collapsed(split: dict) -> str | None:
    """Why a model's figures on a split (a `report`) show it learnt nothing beyond the majority
    class, or None. A split of one class cannot tell."""
    if (
        not split
        or not split["n"]
        or sum(c["support"] > 0 for c in split["per_class"].values()) < 2
    ):
        return None
    if split["predicted_classes"] == 1:
        only = next(k for k, c in split["per_class"].items() if c["predicted"])
        return f"it predicts {only!r} for every one of the {split['n']} validation rows"
    if split["macro_f1"] <= split["majority_macro_f1"]:
        return (
            f"its validation macro-F1 {split['macro_f1']:.3f} is no better than predicting "
            f"{split['majority_label']!r} for every row ({split['majority_macro_f1']:.3f})"
        )
    return None


def table(split: dict) -> str:
    """A report as a person reads it: the headline figures, then one line per class and the
    confusion matrix."""
    width = max(14, *(len(label) for label in split["labels"]))
    lines = [
        f"{split['n']} rows: accuracy {split['accuracy']:.4f}, macro-F1 {split['macro_f1']:.4f} "
        f"(predicting {split['majority_label']!r} for every row: accuracy "
        f"{split['majority_rate']:.4f}, macro-F1 {split['majority_macro_f1']:.4f})",
        f"{'class':<{width}}  precision  recall     f1  support",
    ]
    for label, c in split["per_class"].items():
        lines.append(
            f"{label:<{width}}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['f1']:5.4f}  "
            f"{c['support']:7d}"
        )
    corner = "true/predicted"
    lines.append(f"{corner:<{width}}  " + "  ".join(split["labels"]))
    for label, row in zip(split["labels"], split["confusion_matrix"]):
        cells = "  ".join(f"{v:>{len(name)}d}" for v, name in zip(row, split["labels"]))
        lines.append(f"{label:<{width}}  {cells}")
    return "\n".join(lines)
