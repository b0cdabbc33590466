"""gw.metrics against scikit-learn (test-only dependency), including absent classes and edge cases."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from gw.metrics import (
    PRIMARY_METRIC,
    accuracy,
    classification_metrics,
    confusion_matrix,
    fleet_metrics,
    macro_f1,
    multiclass_metrics,
    multilabel_metrics,
    quadratic_weighted_kappa,
)


def sk_qwk(y_true, y_pred, labels=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic")


@pytest.mark.parametrize("seed", range(8))
def test_multiclass_matches_sklearn_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 6))
    y_true = rng.integers(0, n_classes, size=int(rng.integers(5, 60)))
    y_pred = np.where(rng.random(y_true.size) < 0.6, y_true, rng.integers(0, n_classes + 1, size=y_true.size))
    ours = multiclass_metrics(y_true, y_pred)
    assert ours["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert ours["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    expected_qwk = sk_qwk(y_true, y_pred)
    assert (math.isnan(ours["qwk"]) and math.isnan(expected_qwk)) or ours["qwk"] == pytest.approx(expected_qwk)
    np.testing.assert_array_equal(confusion_matrix(y_true, y_pred), sk_confusion_matrix(y_true, y_pred))


def test_classes_absent_from_truth_or_prediction():
    y_true = [0, 0, 1, 1, 3]
    y_pred = [0, 2, 1, 1, 1]  # class 2 only predicted, class 3 only true
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    # With the item's full label set, a class in neither array scores 0 and counts in the mean.
    labels = [0, 1, 2, 3, 4]
    assert macro_f1(y_true, y_pred, labels) == pytest.approx(
        f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    )
    assert quadratic_weighted_kappa(y_true, y_pred, labels) == pytest.approx(sk_qwk(y_true, y_pred, labels))
    # Labels that leave classes out: those samples drop out of QWK, the classes out of macro F1.
    assert macro_f1(y_true, y_pred, [0, 1]) == pytest.approx(
        f1_score(y_true, y_pred, labels=[0, 1], average="macro", zero_division=0)
    )
    assert quadratic_weighted_kappa(y_true, y_pred, [0, 1, 3]) == pytest.approx(sk_qwk(y_true, y_pred, [0, 1, 3]))


def test_string_labels_and_perfect_and_undefined_cases():
    assert multiclass_metrics(["a", "b", "c"], ["a", "b", "c"]) == {"accuracy": 1.0, "macro_f1": 1.0, "qwk": 1.0}
    single = multiclass_metrics([2, 2, 2], [2, 2, 2])
    assert single["accuracy"] == 1.0 and single["macro_f1"] == 1.0
    assert math.isnan(single["qwk"]) and math.isnan(sk_qwk([2, 2, 2], [2, 2, 2]))
    assert accuracy(np.array([1, 2]), np.array([2, 2])) == 0.5


@pytest.mark.parametrize("seed", range(6))
def test_multilabel_matches_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    # From 2 labels: scikit-learn reads an [n, 1] array as a binary column vector, not as multi-label.
    n, n_labels = int(rng.integers(3, 40)), int(rng.integers(2, 6))
    y_true = (rng.random((n, n_labels)) < 0.4).astype(int)
    y_pred = np.where(rng.random((n, n_labels)) < 0.7, y_true, 1 - y_true)
    y_true[:, 0] = 0  # a label never true...
    y_pred[:, 1] = 0  # ...and one never predicted
    ours = multilabel_metrics(y_true, y_pred)
    assert ours["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
    assert ours["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert ours["exact_match"] == pytest.approx(accuracy_score(y_true, y_pred))
    expected_per_label = [accuracy_score(y_true[:, j], y_pred[:, j]) for j in range(n_labels)]
    assert ours["per_label_accuracy"] == pytest.approx(expected_per_label)
    assert ours["mean_label_accuracy"] == pytest.approx(np.mean(expected_per_label))


def test_multilabel_all_negative_is_zero_f1_like_sklearn():
    y = np.zeros((4, 3), dtype=int)
    ours = multilabel_metrics(y, y)
    assert ours["micro_f1"] == f1_score(y, y, average="micro", zero_division=0) == 0.0
    assert ours["macro_f1"] == 0.0 and ours["exact_match"] == 1.0


def test_dispatch_and_input_errors():
    assert PRIMARY_METRIC == "macro_f1"
    assert classification_metrics("multiclass", [0, 1], [0, 1])["macro_f1"] == 1.0
    assert classification_metrics("multilabel", [[1, 0]], [[1, 0]])["exact_match"] == 1.0
    with pytest.raises(ValueError, match="task"):
        classification_metrics("regression", [0], [0])
    with pytest.raises(ValueError, match="length"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        macro_f1([], [])
    with pytest.raises(ValueError, match="0/1"):
        multilabel_metrics([[2, 0]], [[1, 0]])
    with pytest.raises(ValueError, match="shape"):
        multilabel_metrics([[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError, match="duplicates"):
        macro_f1([0, 1], [0, 1], labels=[0, 0, 1])


def test_fleet_metrics_weight_by_test_size():
    per_item = {
        "q1": ({"accuracy": 0.9, "macro_f1": 0.8, "qwk": 0.7}, 100),
        "q2": ({"accuracy": 0.6, "macro_f1": 0.5, "qwk": float("nan")}, 300),
        "q3": (multilabel_metrics([[1, 0], [0, 1]], [[1, 0], [1, 1]]), 100),
    }
    fleet = fleet_metrics(per_item)
    json.dumps(fleet)  # JSON-safe: no NaN, no arrays
    assert fleet["n_items"] == 3 and fleet["n_examples"] == 500
    q3_f1 = per_item["q3"][0]["macro_f1"]
    assert fleet["metrics"]["macro_f1"] == pytest.approx((0.8 * 100 + 0.5 * 300 + q3_f1 * 100) / 500)
    assert fleet["metrics"]["accuracy"] == pytest.approx((0.9 * 100 + 0.6 * 300) / 400)
    assert fleet["metrics"]["qwk"] == pytest.approx(0.7)  # the NaN QWK is skipped
    assert fleet["items_per_metric"]["qwk"] == 1 and "per_label_accuracy" not in fleet["metrics"]
    with pytest.raises(ValueError, match="empty"):
        fleet_metrics({})
    with pytest.raises(ValueError, match="non-negative integer"):
        fleet_metrics({"q": ({"accuracy": 1.0}, -1)})
