"""Classification metrics from confusion counts, which add up exactly across workers."""

from __future__ import annotations

import numpy as np


def confusion_counts(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> np.ndarray:
    """num_labels × num_labels matrix: rows are true labels, columns predictions."""
    preds = np.asarray(preds, dtype=np.int64).ravel()
    labels = np.asarray(labels, dtype=np.int64).ravel()
    flat = np.bincount(labels * num_labels + preds, minlength=num_labels * num_labels)
    return flat.reshape(num_labels, num_labels)


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of each class (0 where a class is never predicted or present)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    precision = np.divide(tp, cm.sum(axis=0), out=np.zeros_like(tp), where=cm.sum(axis=0) > 0)
    recall = np.divide(tp, cm.sum(axis=1), out=np.zeros_like(tp), where=cm.sum(axis=1) > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def metrics_from_confusion(cm: np.ndarray, prefix: str = "eval_") -> dict[str, float]:
    """Accuracy, macro-F1 and the example count from (possibly summed) confusion counts."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    _, _, f1 = per_class_scores(cm)
    return {
        f"{prefix}accuracy": float(tp.sum() / total) if total else 0.0,
        f"{prefix}macro_f1": float(f1.mean()),
        f"{prefix}count": int(total),
    }


REPORTED_METRICS = ("eval_accuracy", "eval_macro_f1", "eval_loss", "eval_count", "step", "epoch", "lr",
                    "train_loss")
"""Keys of every evaluation's `ray.train.report` (what Tune can rank and schedule on)."""
