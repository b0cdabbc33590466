"""Head refit on cached backbone features: better fit, same keys/shapes/dtypes, layouts, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gw.head_fit import HeadLayout, detect_head_layout, refit_head

HIDDEN = 16


def bert_head(n_labels: int, seed: int = 0, prefix: str = "", dtype=torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        prefix + "pooler.dense.weight": (0.1 * torch.randn(HIDDEN, HIDDEN, generator=generator)).to(dtype),
        prefix + "pooler.dense.bias": torch.zeros(HIDDEN, dtype=dtype),
        "classifier.weight": (0.1 * torch.randn(n_labels, HIDDEN, generator=generator)).to(dtype),
        "classifier.bias": torch.zeros(n_labels, dtype=dtype),
    }


def separable(n: int, n_labels: int, seed: int = 0):
    """Features whose class is the argmax of a fixed linear map: linearly separable."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, HIDDEN)).astype(np.float32)
    direction = np.random.default_rng(99).normal(size=(HIDDEN, n_labels))
    return features, np.argmax(features @ direction, axis=1)


def accuracy(head, features, labels):
    hidden = torch.tanh(torch.as_tensor(features) @ head["pooler.dense.weight"].float().T + head["pooler.dense.bias"].float())
    logits = hidden @ head["classifier.weight"].float().T + head["classifier.bias"].float()
    return float((logits.argmax(1).numpy() == labels).mean())


def test_refit_improves_a_separable_multiclass_problem_and_keeps_layout():
    features, labels = separable(300, 3)
    head = bert_head(3)
    result = refit_head(features, labels, head, max_steps=200, lr=1e-2)
    assert list(result.state_dict) == list(head)
    for key, value in head.items():
        assert result.state_dict[key].shape == value.shape and result.state_dict[key].dtype == value.dtype
    info = result.info
    assert info["final_train_loss"] < 0.5 * info["initial_train_loss"]
    assert accuracy(result.state_dict, features, labels) > max(0.9, accuracy(head, features, labels))
    assert info["task"] == "multiclass" and info["layout"]["dense"] == "pooler.dense"
    json.dumps(info)
    assert all(torch.equal(head[k], bert_head(3)[k]) for k in head)  # input head untouched


def test_refit_multilabel_and_half_precision_head():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(200, HIDDEN)).astype(np.float32)
    labels = np.stack([features[:, 0] > 0, features[:, 1] + features[:, 2] > 0], axis=1).astype(np.float32)
    head = bert_head(2, dtype=torch.bfloat16)
    result = refit_head(torch.from_numpy(features), labels, head, max_steps=150, lr=1e-2)
    assert result.info["task"] == "multilabel"
    assert result.info["final_train_loss"] < result.info["initial_train_loss"]
    assert all(result.state_dict[k].dtype == torch.bfloat16 for k in head)


def test_validation_early_stopping_returns_the_best_head():
    features, labels = separable(40, 2, seed=2)
    val_features, val_labels = separable(40, 2, seed=3)
    flipped = 1 - val_labels  # a validation set that disagrees: its loss rises as training fits
    result = refit_head(features, labels, bert_head(2), val_features=val_features, val_labels=flipped,
                        max_steps=300, patience=10, lr=1e-2)
    info = result.info
    assert info["steps_run"] < 300 and info["best_step"] <= info["steps_run"] - 10
    assert info["best_val_loss"] <= info["initial_val_loss"]


def test_refit_is_deterministic_given_the_seed_with_dropout():
    features, labels = separable(100, 3)
    first = refit_head(features, labels, bert_head(3), max_steps=30, dropout=0.1, seed=5)
    again = refit_head(features, labels, bert_head(3), max_steps=30, dropout=0.1, seed=5)
    other = refit_head(features, labels, bert_head(3), max_steps=30, dropout=0.1, seed=6)
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)
    assert any(not torch.equal(first.state_dict[k], other.state_dict[k]) for k in first.state_dict)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["bert.pooler.dense", "classifier"], HeadLayout(output="classifier", dense="bert.pooler.dense")),
        (["classifier.dense", "classifier.out_proj"], HeadLayout(output="classifier.out_proj", dense="classifier.dense")),
        (["pre_classifier", "classifier"], HeadLayout(output="classifier", dense="pre_classifier", activation="relu")),
        (["classifier"], HeadLayout(output="classifier", dense=None, activation="tanh")),
    ],
)
def test_layout_detection(keys, expected):
    state = {}
    for layer in keys:
        state[layer + ".weight"] = torch.zeros(HIDDEN, HIDDEN)
        state[layer + ".bias"] = torch.zeros(HIDDEN)
    assert detect_head_layout(state) == expected


def test_linear_head_without_pooler_fits():
    features, labels = separable(200, 3)
    head = {"classifier.weight": torch.zeros(3, HIDDEN), "classifier.bias": torch.zeros(3)}
    result = refit_head(features, labels, head, max_steps=100, lr=5e-2)
    assert result.info["final_train_loss"] < result.info["initial_train_loss"]


def test_input_errors():
    features, labels = separable(20, 3)
    head = bert_head(3)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        refit_head(features[:, :8], labels, head)
    with pytest.raises(ValueError, match="rows"):
        refit_head(features, labels[:10], head)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        refit_head(features, labels + 3, head)
    with pytest.raises(ValueError, match="multi-hot"):
        refit_head(features, np.zeros((20, 5)), head)
    with pytest.raises(ValueError, match="both val_features and val_labels"):
        refit_head(features, labels, head, val_features=features)
    with pytest.raises(ValueError, match="cannot recognise"):
        refit_head(features, labels, {"weird.weight": torch.zeros(3, HIDDEN)})
    with pytest.raises(ValueError, match="outside the layout"):
        refit_head(features, labels, dict(head, **{"extra.bias": torch.zeros(3)}),
                   layout=HeadLayout(output="classifier", dense="pooler.dense"))


def test_crossfit_scores_each_answer_by_a_head_not_fitted_on_it():
    """Separable features: the out-of-fold heads recover the labels; features that carry no label give
    chance, which in-sample refits (memorising 100 answers in 384 dimensions) would not show."""
    import numpy as np
    import torch

    from gw.head_fit import crossfit_probabilities, head_probabilities

    rng = np.random.default_rng(0)
    n, hidden, classes = 90, 32, 3
    labels = np.repeat(np.arange(classes), n // classes)
    signal = np.eye(hidden)[labels] * 4.0 + rng.normal(size=(n, hidden)) * 0.3
    noise = rng.normal(size=(n, hidden))
    head = {"classifier.weight": torch.zeros(classes, hidden), "classifier.bias": torch.zeros(classes)}
    good = crossfit_probabilities(signal, labels, head, task="multiclass", max_steps=200)
    assert good.shape == (n, classes) and np.allclose(good.sum(axis=1), 1.0)
    assert (good.argmax(axis=1) == labels).mean() > 0.95
    blind = crossfit_probabilities(noise, labels, head, task="multiclass", max_steps=200)
    assert (blind.argmax(axis=1) == labels).mean() < 0.6
    assert np.allclose(head_probabilities(noise, head, "multiclass"), 1.0 / classes)  # the zero head: uniform
    multi = crossfit_probabilities(signal, np.eye(classes)[labels], head, task="multilabel", max_steps=200)
    assert ((multi > 0.5) == np.eye(classes)[labels].astype(bool)).mean() > 0.95
    with pytest.raises(ValueError, match="n >= 2"):
        crossfit_probabilities(signal[:1], labels[:1], head, task="multiclass")
