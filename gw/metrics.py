"""Scoring metrics for items and fleets (numpy only), following scikit-learn's conventions.

Multi-class (integer labels): accuracy, macro F1, quadratic weighted kappa (QWK).
Multi-label (multi-hot [N, L] 0/1 arrays): micro F1, macro F1, exact match (subset accuracy),
per-label accuracy (and its mean, 1 − Hamming loss).

Conventions, as scikit-learn (``f1_score(average=...)``, ``cohen_kappa_score(weights="quadratic")``):

- the classes are the sorted union of the values in y_true and y_pred, unless `labels` is given, in
  which case only those classes count (and for QWK, samples with another value are left out);
- F1 of a class is 2·TP / (2·TP + FP + FN), and 0 when that is 0/0 (``zero_division=0``: a class
  absent from both y_true and y_pred scores 0 and still counts in the macro mean);
- QWK weights are the squared differences of class *indices* in the sorted label list (pass the item's
  full score range as `labels` so that they equal score differences); QWK is NaN when undefined
  (e.g. a single class in both arrays), as scikit-learn's default.

The primary metric of the gate is PRIMARY_METRIC = "macro_f1".
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PRIMARY_METRIC = "macro_f1"
TASKS = ("multiclass", "multilabel")


def _as_label_vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels for a multiclass task, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def _paired_vectors(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    true, pred = _as_label_vector(y_true, "y_true"), _as_label_vector(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.shape[0]} vs {pred.shape[0]}")
    return true, pred


def _class_list(true: np.ndarray, pred: np.ndarray, labels: Sequence[Any] | None) -> np.ndarray:
    if labels is None:
        return np.union1d(true, pred)
    classes = np.asarray(labels)
    if classes.ndim != 1 or classes.size == 0:
        raise ValueError("labels must be a non-empty 1-D sequence of class labels")
    if np.unique(classes).size != classes.size:
        raise ValueError("labels contains duplicates")
    return classes


def _f1_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2TP / (2TP + FP + FN), 0 where that is 0/0."""
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(tp.shape, dtype=np.float64), where=denominator > 0)


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of samples whose predicted class equals the true class."""
    true, pred = _paired_vectors(y_true, y_pred)
    return float(np.mean(true == pred))


def macro_f1(y_true: Any, y_pred: Any, labels: Sequence[Any] | None = None) -> float:
    """Unweighted mean of per-class F1 (scikit-learn's f1_score(average="macro", zero_division=0))."""
    true, pred = _paired_vectors(y_true, y_pred)
    classes = _class_list(true, pred, labels)
    true_hits = true[None, :] == classes[:, None]
    pred_hits = pred[None, :] == classes[:, None]
    tp = np.sum(true_hits & pred_hits, axis=1)
    fp = np.sum(~true_hits & pred_hits, axis=1)
    fn = np.sum(true_hits & ~pred_hits, axis=1)
    return float(np.mean(_f1_scores(tp, fp, fn)))


def confusion_matrix(y_true: Any, y_pred: Any, labels: Sequence[Any] | None = None) -> np.ndarray:
    """Counts C[i, j] of samples with true class labels[i] predicted as labels[j] (others left out)."""
    true, pred = _paired_vectors(y_true, y_pred)
    classes = _class_list(true, pred, labels)
    order = np.argsort(classes, kind="stable")
    true_index = _index_in(classes, order, true)
    pred_index = _index_in(classes, order, pred)
    kept = (true_index >= 0) & (pred_index >= 0)
    matrix = np.zeros((classes.size, classes.size), dtype=np.int64)
    np.add.at(matrix, (true_index[kept], pred_index[kept]), 1)
    return matrix


def _index_in(classes: np.ndarray, order: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in `classes` (-1 if absent); `order` sorts `classes`."""
    sorted_classes = classes[order]
    slots = np.clip(np.searchsorted(sorted_classes, values), 0, classes.size - 1)
    found = sorted_classes[slots] == values
    return np.where(found, order[slots], -1)


def quadratic_weighted_kappa(y_true: Any, y_pred: Any, labels: Sequence[Any] | None = None) -> float:
    """Cohen's kappa with quadratic weights on class indices; NaN when undefined (as scikit-learn)."""
    matrix = confusion_matrix(y_true, y_pred, labels).astype(np.float64)
    n_classes = matrix.shape[0]
    total = matrix.sum()
    if total == 0:
        return float("nan")
    index = np.arange(n_classes)
    weights = (index[:, None] - index[None, :]) ** 2
    expected = np.outer(matrix.sum(axis=1), matrix.sum(axis=0)) / total
    denominator = np.sum(weights * expected)
    if denominator == 0:
        return float("nan")
    return float(1.0 - np.sum(weights * matrix) / denominator)


def multiclass_metrics(y_true: Any, y_pred: Any, labels: Sequence[Any] | None = None) -> dict[str, float]:
    """accuracy, macro_f1 and qwk of integer class predictions (see the module docstring)."""
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, labels),
        "qwk": quadratic_weighted_kappa(y_true, y_pred, labels),
    }


def _multi_hot(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty multi-hot [n_samples, n_labels] array, got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 (or booleans)")
    return array.astype(bool)


def multilabel_metrics(y_true: Any, y_pred: Any) -> dict[str, Any]:
    """micro_f1, macro_f1, exact_match, per_label_accuracy (list), mean_label_accuracy."""
    true, pred = _multi_hot(y_true, "y_true"), _multi_hot(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in shape: {true.shape} vs {pred.shape}")
    tp = np.sum(true & pred, axis=0)
    fp = np.sum(~true & pred, axis=0)
    fn = np.sum(true & ~pred, axis=0)
    per_label_accuracy = np.mean(true == pred, axis=0)
    return {
        "micro_f1": float(_f1_scores(tp.sum(keepdims=True), fp.sum(keepdims=True), fn.sum(keepdims=True))[0]),
        "macro_f1": float(np.mean(_f1_scores(tp, fp, fn))),
        "exact_match": float(np.mean(np.all(true == pred, axis=1))),
        "per_label_accuracy": [float(v) for v in per_label_accuracy],
        "mean_label_accuracy": float(np.mean(per_label_accuracy)),
    }


def classification_metrics(
    task: str, y_true: Any, y_pred: Any, labels: Sequence[Any] | None = None
) -> dict[str, Any]:
    """The metrics of a `task` ("multiclass" or "multilabel"); `labels` applies to multiclass only."""
    if task == "multiclass":
        return multiclass_metrics(y_true, y_pred, labels)
    if task == "multilabel":
        return multilabel_metrics(y_true, y_pred)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def fleet_metrics(per_item: Mapping[str, tuple[Mapping[str, Any], int]]) -> dict[str, Any]:
    """Fleet figures: each scalar metric averaged over items weighted by their test-set size n.

    per_item: item -> (metrics, n). A metric is averaged over the items that report it with a finite
    value (QWK only exists for multi-class items, NaN QWKs are skipped); list-valued metrics are
    ignored. Returns {"n_items", "n_examples", "metrics": {name: weighted mean},
    "items_per_metric": {name: count}}; JSON-safe.
    """
    if not per_item:
        raise ValueError("per_item is empty: no items to aggregate")
    weighted_sum: dict[str, float] = {}
    weight: dict[str, int] = {}
    items: dict[str, int] = {}
    n_examples = 0
    for item, entry in per_item.items():
        if not (isinstance(entry, Sequence) and len(entry) == 2):
            raise ValueError(f"per_item[{item!r}] must be a (metrics, n) pair")
        metrics, n = entry
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"per_item[{item!r}]: n must be a non-negative integer, got {n!r}")
        n_examples += int(n)
        for name, value in metrics.items():
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                continue
            if not math.isfinite(float(value)):
                continue
            weighted_sum[name] = weighted_sum.get(name, 0.0) + float(value) * int(n)
            weight[name] = weight.get(name, 0) + int(n)
            items[name] = items.get(name, 0) + 1
    return {
        "n_items": len(per_item),
        "n_examples": n_examples,
        "metrics": {name: weighted_sum[name] / weight[name] for name in sorted(weighted_sum) if weight[name] > 0},
        "items_per_metric": {name: items[name] for name in sorted(items) if weight[name] > 0},
    }
