"""The evaluation figures against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distilray.batch.evaluation import (
    accuracy_by_length,
    eval_json,
    evaluation_metrics,
    expected_calibration_error,
    log_loss,
    per_class,
    render_markdown,
)

PROBS = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
LABELS = np.array([0, 1, 1, 0])  # rows 0, 1 right; rows 2, 3 wrong


def test_log_loss_is_the_mean_negative_log_probability_of_the_true_class():
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.3)) / 4
    assert log_loss(PROBS, LABELS) == pytest.approx(expected, abs=1e-12)
    assert math.isfinite(log_loss(np.array([[1.0, 0.0]]), np.array([1])))


def test_ece_by_hand():
    # confidences 0.9, 0.8, 0.6, 0.7 fall in 4 different bins of 15; correct 1, 1, 0, 0
    expected = (abs(1 - 0.9) + abs(1 - 0.8) + abs(0 - 0.6) + abs(0 - 0.7)) / 4
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(expected, abs=1e-12)
    # one bin: the gap of the means, not the mean of the gaps
    same = np.array([[0.95, 0.05], [0.96, 0.04]])
    assert expected_calibration_error(same, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.955))


def test_per_class_and_confusion():
    report = evaluation_metrics(PROBS, LABELS, np.array([5, 20, 40, 600]), ["neg", "pos"])
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 1], [1, 1]]
    assert report["eval_accuracy"] == 0.5 and report["eval_count"] == 4
    assert report["per_class"]["neg"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert per_class(np.array([[2, 0], [1, 0]]), ["a", "b"])["b"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_accuracy_by_length_buckets_leave_empty_ones_out():
    buckets = accuracy_by_length(np.array([5, 20, 40, 600]), np.array([True, True, False, False]))
    assert buckets == [{"tokens": "1-16", "rows": 1, "accuracy": 1.0},
                       {"tokens": "17-32", "rows": 1, "accuracy": 1.0},
                       {"tokens": "33-64", "rows": 1, "accuracy": 0.0},
                       {"tokens": ">512", "rows": 1, "accuracy": 0.0}]


def test_the_json_is_stable_and_the_markdown_renders():
    report = evaluation_metrics(PROBS, LABELS, np.array([5, 20, 40, 600]), ["neg", "pos"])
    report.update(checkpoint={"id": "run@step1:abc"},
                  data={"source": "x.parquet", "split": "validation", "sha256": "f" * 64})
    assert eval_json(report) == eval_json(dict(reversed(list(report.items()))))
    md = render_markdown(report)
    assert "| eval_accuracy | 0.5000 |" in md and "| neg | 1 | 1 |" in md
