"""What `distilray evaluate` measures, from labels and predicted probabilities (pure numpy).

The keys match training's reports (`eval_accuracy`, `eval_macro_f1`, `eval_loss`) so a
promotion gate compares like with like. Every figure is a deterministic function of the
rows: the same checkpoint and data give byte-identical output apart from the timing fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from distilray.metrics import confusion_counts, metrics_from_confusion, per_class_scores

ECE_BINS = 15
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)
"""Upper bounds (tokens, inclusive) of the accuracy-by-length buckets; longer rows go last."""
TIMING_KEYS = ("rows_per_s", "wall_time_s", "evaluated_at")
PROB_FLOOR = 1e-12  # log loss of a probability rounded to 0 stays finite


def per_class(cm: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class (0 where a class is never predicted)."""
    precision, recall, f1 = per_class_scores(cm)
    support = np.asarray(cm).sum(axis=1)
    return {name: {"precision": round(float(precision[i]), 6), "recall": round(float(recall[i]), 6),
                   "f1": round(float(f1[i]), 6), "support": int(support[i])}
            for i, name in enumerate(labels)}


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (what training reports as eval_loss)."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, PROB_FLOOR, 1.0)).mean()) if len(labels) else 0.0


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins |accuracy − confidence| × share of rows, over equal-width confidence bins."""
    if not len(labels):
        return 0.0
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    # bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        member = index == b
        if member.any():
            ece += abs(correct[member].mean() - confidence[member].mean()) * member.mean()
    return float(ece)


def accuracy_by_length(lengths: np.ndarray, correct: np.ndarray,
                       bounds: Sequence[int] = LENGTH_BUCKETS) -> list[dict[str, Any]]:
    """Accuracy per input-length bucket (tokens, after truncation); empty buckets are left out."""
    out = []
    low = 0
    for high in [*bounds, math.inf]:
        member = (lengths > low) & (lengths <= high)
        if member.any():
            out.append({"tokens": f"{low + 1}-{high}" if high != math.inf else f">{low}",
                        "rows": int(member.sum()), "accuracy": round(float(correct[member].mean()), 6)})
        low = high
    return out


def evaluation_metrics(probs: np.ndarray, labels: np.ndarray, lengths: np.ndarray,
                       label_names: Sequence[str]) -> dict[str, Any]:
    """Every figure of an evaluation, as a JSON-ready dict."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    preds = probs.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    cm = confusion_counts(preds, labels, len(label_names))
    headline = metrics_from_confusion(cm)
    return {
        "eval_accuracy": round(headline["eval_accuracy"], 8),
        "eval_macro_f1": round(headline["eval_macro_f1"], 8),
        "eval_loss": round(log_loss(probs, labels), 8),
        "eval_count": headline["eval_count"],
        "eval_ece": round(expected_calibration_error(probs, labels), 8),
        "per_class": per_class(cm, label_names),
        "confusion_matrix": {"labels": list(label_names), "rows_true_columns_predicted": cm.tolist()},
        "accuracy_by_length": accuracy_by_length(np.asarray(lengths), preds == labels),
    }


def eval_json(report: dict[str, Any]) -> str:
    """Stable text: sorted keys, so two runs of the same evaluation compare byte for byte."""
    return json.dumps(report, indent=2, sort_keys=True) + "\n"


def without_timing(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


def render_markdown(report: dict[str, Any]) -> str:
    """eval.md: the headline figures, per-class table, confusion matrix and length buckets."""
    lines = [f"# Evaluation of `{report['checkpoint']['id']}`", "",
             f"Data: `{report['data']['source']}` split `{report['data']['split']}`, "
             f"{report['eval_count']} rows (sha256 {report['data']['sha256'][:12]}).", "",
             "| metric | value |", "| --- | ---: |"]
    for key in ("eval_accuracy", "eval_macro_f1", "eval_loss", "eval_ece"):
        lines.append(f"| {key} | {report[key]:.4f} |")
    lines += ["", "| class | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, row in report["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | "
                     f"{row['support']} |")
    names = report["confusion_matrix"]["labels"]
    lines += ["", "Confusion (rows: true, columns: predicted)", "",
              "| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
    for name, row in zip(names, report["confusion_matrix"]["rows_true_columns_predicted"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "| tokens | rows | accuracy |", "| --- | ---: | ---: |"]
    lines += [f"| {b['tokens']} | {b['rows']} | {b['accuracy']:.4f} |" for b in report["accuracy_by_length"]]
    return "\n".join(lines) + "\n"
