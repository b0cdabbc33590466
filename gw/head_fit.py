"""Refit an item's classification head on a frozen (merged) backbone from cached features.

The GW-SMM code retrains each head on the frozen merged encoder; with the backbone frozen, the head's
input — the backbone's [CLS] hidden state — can be computed once per item (by the caller) and the head
fitted on that cache in seconds: full-batch AdamW on [N, hidden] features, starting from the item's
own head, with early stopping on optional validation features.

Heads (auto-detected from the state dict's keys, any prefix; or pass a HeadLayout):
- BERT / ELECTRA-style pooler: ``pooler.dense`` + tanh, then ``classifier``;
- RoBERTa-style: ``classifier.dense`` + tanh, then ``classifier.out_proj``;
- DistilBERT-style: ``pre_classifier`` + ReLU, then ``classifier``;
- a single linear layer (``classifier``) on the features.
Dropout (BERT applies 0.1 to the pooled output during fine-tuning) is available, seeded, off by default.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional

ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": functional.gelu, "identity": lambda x: x}


@dataclass(frozen=True)
class HeadLayout:
    """Where a head's layers live: key prefixes (without ".weight"/".bias") and the hidden activation."""

    output: str
    dense: str | None = None
    activation: str = "tanh"

    def layer_prefixes(self) -> list[str]:
        return [p for p in (self.dense, self.output) if p is not None]


@dataclass(frozen=True)
class HeadFitResult:
    """The refitted head (same keys, shapes, dtypes and device as the input head) and a JSON-safe log."""

    state_dict: dict[str, Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def _find_prefix(keys: list[str], suffix: str) -> str | None:
    """The unique layer whose name is `suffix` or ends with "." + suffix (so "classifier" never
    matches "pre_classifier"), or None."""
    matches = [k[: -len(".weight")] for k in keys if k.endswith(".weight")]
    matches = [m for m in matches if m == suffix or m.endswith("." + suffix)]
    return matches[0] if len(matches) == 1 else None


def detect_head_layout(head_state: Mapping[str, Tensor]) -> HeadLayout:
    """Recognise a BERT, RoBERTa, DistilBERT or single-linear head from its keys (any prefix)."""
    keys = list(head_state)
    pooler = _find_prefix(keys, "pooler.dense")
    roberta_dense, roberta_out = _find_prefix(keys, "classifier.dense"), _find_prefix(keys, "classifier.out_proj")
    pre_classifier = _find_prefix(keys, "pre_classifier")
    classifier = _find_prefix(keys, "classifier")
    if roberta_dense and roberta_out:
        return HeadLayout(output=roberta_out, dense=roberta_dense, activation="tanh")
    if pooler and classifier:
        return HeadLayout(output=classifier, dense=pooler, activation="tanh")
    if pre_classifier and classifier:
        return HeadLayout(output=classifier, dense=pre_classifier, activation="relu")
    if classifier and sum(k.endswith(".weight") for k in keys) == 1:
        return HeadLayout(output=classifier)
    raise ValueError(
        f"cannot recognise the head layout from keys {sorted(keys)}; pass layout=HeadLayout(...) "
        "(expected pooler.dense + classifier, classifier.dense + classifier.out_proj, "
        "pre_classifier + classifier, or a single classifier)"
    )


def _check_head(head_state: Mapping[str, Tensor], layout: HeadLayout) -> None:
    expected = set()
    for prefix in layout.layer_prefixes():
        if prefix + ".weight" not in head_state:
            raise ValueError(f"head state has no {prefix + '.weight'!r}")
        if head_state[prefix + ".weight"].ndim != 2:
            raise ValueError(f"{prefix + '.weight'!r} must be 2-D, got shape {tuple(head_state[prefix + '.weight'].shape)}")
        expected.add(prefix + ".weight")
        if prefix + ".bias" in head_state:
            expected.add(prefix + ".bias")
    extra = set(head_state) - expected
    if extra:
        raise ValueError(f"head state has keys outside the layout {layout}: {sorted(extra)}")
    if layout.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {layout.activation!r}")
    if layout.dense is not None:
        hidden_out = head_state[layout.dense + ".weight"].shape[0]
        output_in = head_state[layout.output + ".weight"].shape[1]
        if hidden_out != output_in:
            raise ValueError(f"{layout.dense} outputs {hidden_out} features but {layout.output} expects {output_in}")


def _as_tensor(values: Any, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().to(device, dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)


def _prepare_labels(labels: Any, task: str, n_rows: int, n_outputs: int, device: torch.device, name: str) -> Tensor:
    if task == "multiclass":
        target = _as_tensor(labels, torch.int64, device, name)
        if target.ndim != 1:
            raise ValueError(f"{name} must be class indices of shape [N] for a multiclass head, got {tuple(target.shape)}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_outputs):
            raise ValueError(f"{name} must lie in [0, {n_outputs}) for a head with {n_outputs} outputs")
    elif task == "multilabel":
        target = _as_tensor(labels, torch.float32, device, name)
        if target.ndim != 2 or target.shape[1] != n_outputs:
            raise ValueError(f"{name} must be multi-hot [N, {n_outputs}] for a multilabel head, got {tuple(target.shape)}")
    else:
        raise ValueError(f"task must be 'multiclass' or 'multilabel', got {task!r}")
    if target.shape[0] != n_rows:
        raise ValueError(f"{name} has {target.shape[0]} rows but its features have {n_rows}")
    return target


def _prepare_features(features: Any, n_inputs: int, device: torch.device, name: str) -> Tensor:
    values = _as_tensor(features, torch.float32, device, name)
    if values.ndim != 2 or values.shape[1] != n_inputs:
        raise ValueError(f"{name} must have shape [N, {n_inputs}] for this head, got {tuple(values.shape)}")
    if values.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} has NaN or infinite values")
    return values


def _head_logits(weights: Mapping[str, Tensor], layout: HeadLayout, x: Tensor, between=None) -> Tensor:
    """The head's forward pass; `between` (dropout while fitting) acts on the hidden layer."""
    hidden = x
    if layout.dense is not None:
        hidden = ACTIVATIONS[layout.activation](
            functional.linear(hidden, weights[layout.dense + ".weight"], weights.get(layout.dense + ".bias")))
    if between is not None:
        hidden = between(hidden)
    return functional.linear(hidden, weights[layout.output + ".weight"], weights.get(layout.output + ".bias"))


def refit_head(
    features: Any,
    labels: Any,
    head_state: Mapping[str, Tensor],
    *,
    val_features: Any = None,
    val_labels: Any = None,
    task: str | None = None,
    layout: HeadLayout | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    max_steps: int = 300,
    patience: int = 30,
    dropout: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> HeadFitResult:
    """Fit a head on frozen backbone features; returns the new head state dict (same keys and shapes).

    features: [N, hidden] (numpy or torch), the backbone's [CLS] hidden state of the item's train
    split; labels: int [N] (multiclass) or multi-hot [N, L] (multilabel; `task` is inferred from the
    labels' rank when not given). Full-batch AdamW (lr, decoupled weight_decay) from the given head
    for at most max_steps steps; with validation features and labels, the head with the lowest
    validation loss is returned and training stops after `patience` steps without improvement.
    Deterministic given `seed` (only dropout draws random numbers).
    """
    if not (math.isfinite(lr) and lr > 0) or weight_decay < 0 or max_steps < 0 or patience < 1:
        raise ValueError("need lr > 0, weight_decay >= 0, max_steps >= 0 and patience >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if (val_features is None) != (val_labels is None):
        raise ValueError("give both val_features and val_labels, or neither")
    layout = layout or detect_head_layout(head_state)
    _check_head(head_state, layout)
    first = layout.layer_prefixes()[0]
    n_inputs = head_state[first + ".weight"].shape[1]
    n_outputs = head_state[layout.output + ".weight"].shape[0]
    compute_device = torch.device(device) if device is not None else head_state[first + ".weight"].device
    if task is None:
        task = "multilabel" if np.ndim(labels) == 2 else "multiclass"

    train_x = _prepare_features(features, n_inputs, compute_device, "features")
    train_y = _prepare_labels(labels, task, train_x.shape[0], n_outputs, compute_device, "labels")
    has_val = val_features is not None
    if has_val:
        val_x = _prepare_features(val_features, n_inputs, compute_device, "val_features")
        val_y = _prepare_labels(val_labels, task, val_x.shape[0], n_outputs, compute_device, "val_labels")

    params = {
        key: torch.nn.Parameter(value.detach().to(compute_device, torch.float32).clone())
        for key, value in head_state.items()
    }
    generator = torch.Generator(device=compute_device).manual_seed(int(seed)) if dropout > 0 else None

    def drop(hidden: Tensor) -> Tensor:
        keep = torch.rand(hidden.shape, generator=generator, device=hidden.device) >= dropout
        return hidden * keep / (1.0 - dropout)

    def logits(x: Tensor, train: bool) -> Tensor:
        return _head_logits(params, layout, x, drop if train and dropout > 0 else None)

    def loss_of(x: Tensor, y: Tensor, train: bool) -> Tensor:
        out = logits(x, train)
        if task == "multiclass":
            return functional.cross_entropy(out, y)
        return functional.binary_cross_entropy_with_logits(out, y)

    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    with torch.no_grad():
        initial_train = float(loss_of(train_x, train_y, False))
        initial_val = float(loss_of(val_x, val_y, False)) if has_val else None
    best_val, best_step = initial_val, 0
    best_state = {k: p.detach().clone() for k, p in params.items()}
    steps_run, since_best = 0, 0
    for step in range(1, max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(train_x, train_y, True)
        loss.backward()
        optimizer.step()
        steps_run = step
        if has_val:
            with torch.no_grad():
                current = float(loss_of(val_x, val_y, False))
            if current < best_val:
                best_val, best_step, since_best = current, step, 0
                best_state = {k: p.detach().clone() for k, p in params.items()}
            else:
                since_best += 1
                if since_best >= patience:
                    break
    if not has_val:
        best_state = {k: p.detach().clone() for k, p in params.items()}
        best_step = steps_run
    with torch.no_grad():
        for key, value in best_state.items():
            params[key].copy_(value)
        final_train = float(loss_of(train_x, train_y, False))

    refitted = {
        key: best_state[key].to(head_state[key].device, head_state[key].dtype).reshape(head_state[key].shape)
        for key in head_state
    }
    info: dict[str, Any] = {
        "task": task,
        "layout": {"dense": layout.dense, "output": layout.output, "activation": layout.activation},
        "n_train": int(train_x.shape[0]),
        "steps_run": steps_run,
        "best_step": best_step,
        "initial_train_loss": initial_train,
        "final_train_loss": final_train,
        "lr": lr,
        "weight_decay": weight_decay,
        "dropout": dropout,
        "seed": int(seed),
    }
    if has_val:
        info.update({"n_val": int(val_x.shape[0]), "initial_val_loss": initial_val, "best_val_loss": best_val})
    return HeadFitResult(state_dict=refitted, info=info)


def head_probabilities(features: Any, head_state: Mapping[str, Tensor], task: str,
                       layout: HeadLayout | None = None) -> np.ndarray:
    """A head's outputs on backbone features: [N, C] class probabilities, or [N, L] per-label ones for
    ``task == "multilabel"``."""
    layout = layout or detect_head_layout(head_state)
    _check_head(head_state, layout)
    first = layout.layer_prefixes()[0]
    weights = {k: v.detach().to("cpu", torch.float32) for k, v in head_state.items()}
    hidden = _prepare_features(features, weights[first + ".weight"].shape[1], torch.device("cpu"), "features")
    with torch.no_grad():
        logits = _head_logits(weights, layout, hidden)
        probs = logits.sigmoid() if task == "multilabel" else logits.softmax(-1)
    return probs.numpy().astype(np.float64)


def crossfit_probabilities(features: Any, labels: Any, head_state: Mapping[str, Tensor], *, task: str,
                           folds: int = 5, max_steps: int = 100, seed: int = 0) -> np.ndarray:
    """Out-of-fold outputs of refitted heads: the answers are split into `folds` seeded folds, and each
    fold is scored by a head refitted (:func:`refit_head` from `head_state`, `max_steps` full-batch steps,
    no early stopping: nothing is held out to stop on) on the other folds' features.

    This is how well a head *refitted on this backbone* scores answers it was not fitted on, the quantity
    the product's refit-heads merge depends on, measured on every labelled answer instead of a small
    validation split."""
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels)
    n = len(x)
    if len(y) != n or n < 2:
        raise ValueError(f"cross-fitting needs n >= 2 answers with one label each, got {n} features, {len(y)} labels")
    order = np.random.default_rng(seed).permutation(n)
    out: np.ndarray | None = None
    for held in np.array_split(order, min(folds, n)):
        fitted = np.setdiff1d(order, held)
        head = refit_head(x[fitted], y[fitted], head_state, task=task, max_steps=max_steps, seed=seed,
                          device="cpu").state_dict
        probs = head_probabilities(x[held], head, task)
        if out is None:
            out = np.zeros((n, probs.shape[1]))
        out[held] = probs
    return out
