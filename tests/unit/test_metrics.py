import numpy as np

from distilray.metrics import confusion_counts, metrics_from_confusion


def test_accuracy_and_macro_f1_match_hand_computation():
    preds = np.array([0, 1, 1, 0, 1, 1])
    labels = np.array([0, 1, 0, 0, 1, 0])
    cm = confusion_counts(preds, labels, 2)
    assert cm.tolist() == [[2, 2], [0, 2]]
    m = metrics_from_confusion(cm)
    assert m["eval_accuracy"] == 4 / 6 and m["eval_count"] == 6
    f1_neg = 2 * 1.0 * 0.5 / 1.5
    f1_pos = 2 * 0.5 * 1.0 / 1.5
    assert abs(m["eval_macro_f1"] - (f1_neg + f1_pos) / 2) < 1e-12


def test_confusion_counts_sum_across_shards():
    rng = np.random.default_rng(0)
    preds, labels = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    whole = confusion_counts(preds, labels, 3)
    parts = confusion_counts(preds[:37], labels[:37], 3) + confusion_counts(preds[37:], labels[37:], 3)
    assert (whole == parts).all()
    assert metrics_from_confusion(parts)["eval_count"] == 100
