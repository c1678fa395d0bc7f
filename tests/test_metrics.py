"""Classification figures beyond accuracy (side_trainer/metrics.py), checked against hand counts."""

from __future__ import annotations

import pytest

from side_trainer import metrics


def test_a_report_matches_hand_counted_figures():
    true = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 0, 0]
    split = metrics.report(metrics.confusion(true, pred, 3), ["a", "b", "c"])
    assert split["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert split["n"] == 6 and split["accuracy"] == pytest.approx(0.5)
    # a: precision 2/4, recall 2/3; b: 1/2 and 1/2; c: never predicted, never found.
    f1_a = 2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3)
    assert split["per_class"]["a"]["f1"] == pytest.approx(f1_a, abs=1e-4)
    assert split["per_class"]["b"] == {
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "support": 2,
        "predicted": 2,
    }
    assert split["per_class"]["c"]["recall"] == 0.0 and split["per_class"]["c"]["support"] == 1
    assert split["macro_f1"] == pytest.approx((f1_a + 0.5 + 0.0) / 3)
    assert split["majority_label"] == "a" and split["majority_rate"] == pytest.approx(0.5)
    assert metrics.collapsed(split) is None


def test_the_majority_predictor_scores_what_its_formula_says_and_counts_as_collapsed():
    true = [0] * 7 + [1] * 3
    always = metrics.report(metrics.confusion(true, [0] * 10, 2), ["neg", "pos"])
    assert always["accuracy"] == pytest.approx(0.7)
    assert always["macro_f1"] == pytest.approx(always["majority_macro_f1"])
    assert always["majority_macro_f1"] == pytest.approx((2 * 0.7 / 1.7) / 2)
    assert "predicts 'neg' for every one of the 10" in metrics.collapsed(always)
    # Two classes predicted, but no better than the majority class: collapsed too.
    weak = metrics.report(metrics.confusion(true, [0] * 6 + [1] + [0] * 3, 2), ["neg", "pos"])
    assert weak["predicted_classes"] == 2 and weak["macro_f1"] < weak["majority_macro_f1"]
    assert "no better than predicting 'neg'" in metrics.collapsed(weak)
    # A split of one class cannot tell a collapsed model from a right one.
    one = metrics.report(metrics.confusion([1, 1], [1, 1], 2), ["neg", "pos"])
    assert metrics.collapsed(one) is None
