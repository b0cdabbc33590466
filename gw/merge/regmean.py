"""RegMean (Jin, Ren, Preotiuc-Pietro & Cheng, ICLR 2023, arXiv 2212.09849): each linear layer merged in
closed form so that the merged layer's outputs stay as close as possible to every member's own outputs
on that member's own inputs.

For a linear map y = W x (W: [out, in]) and member i's layer inputs X_i ([tokens, in]), the merged W
minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², whose solution is

    Wᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ,   G_i = X_iᵀ X_i  (the layer's input Gram matrix).

As in the paper, each G_i's off-diagonal entries are scaled by α (α = 1: the plain least-squares
solution; α → 0: a per-input-feature weighted average), which regularises towards the average when the
members' inputs are few or alike. Grams are passed per member as {weight key: [in, in]}; the caller
(`workers.grams`) divides each by its token count, so every member weighs the same whatever its number
of answers.

Scope: matrix keys with a Gram from every member get the closed form; every other floating key
(biases, LayerNorm, embedding tables, and a matrix without Grams) the mean of the fine-tunes
θ₀ + (1/N) Σ τ_i, as the paper does for non-linear parameters; buffers are copied from the base.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gw.merge._state import KIND_BUFFER, KIND_MATRIX, StateDict, TaskVectorSource, classify_key, copy_buffers
from gw.merge.task_arithmetic import add_scaled_sum

Grams = Mapping[str, Tensor]
# Added to Σ G_i's diagonal, relative to its mean diagonal: an input direction no member ever saw
# (a zero row of every Gram) would make the system singular; there the solution falls back to the mean.
RIDGE = 1e-6


@dataclass(frozen=True)
class RegMeanParams:
    """alpha: the scale of each Gram's off-diagonal entries, in [0, 1]."""

    alpha: float = 0.9

    def resolved(self) -> dict[str, float]:
        alpha = float(self.alpha)
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        return {"alpha": alpha}


def regmean_matrix(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float) -> Tensor:
    """The closed-form merge of one linear weight ([out, in] each) given each member's [in, in] Gram."""
    total, rhs = None, None
    for weight, gram in zip(weights, grams, strict=True):
        g = gram.double()
        g = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        term = g @ weight.double().T
        total, rhs = (g, term) if total is None else (total + g, rhs + term)
    mean_diagonal = float(torch.diagonal(total).mean())
    # A direction with no input at all gets the members' mean weight (the ridge pulls towards it).
    mean_weight = torch.stack([w.double() for w in weights]).mean(0)
    ridge = RIDGE * (mean_diagonal if mean_diagonal > 0 else 1.0)
    eye = torch.eye(total.shape[0], dtype=torch.float64, device=total.device)
    solved = torch.linalg.solve(total + ridge * eye, rhs + ridge * mean_weight.T)
    return solved.T


def merge_regmean(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: RegMeanParams,
    *,
    seed: int = 0,  # noqa: ARG001 - deterministic; accepted for the common signature
    grams: Sequence[Grams] | None = None,
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, object]]:
    """RegMean over validated state dicts with each member's Grams; returns (state dict, resolved params, info)."""
    resolved = params.resolved()
    if grams is None or len(grams) != len(finetuned):
        raise ValueError(f"regmean needs one set of input Gram matrices per model ({len(finetuned)}), "
                         f"got {'none' if grams is None else len(grams)}")
    closed = []
    for key in keys:
        if classify_key(key, base[key]) != KIND_MATRIX or not all(key in g for g in grams):
            continue
        columns = base[key].shape[1]
        for n, g in enumerate(grams):
            if tuple(g[key].shape) != (columns, columns):
                raise ValueError(f"Gram for {key!r} of model {n} has shape {tuple(g[key].shape)}, "
                                 f"expected {(columns, columns)}")
            if not torch.isfinite(g[key]).all():
                raise ValueError(f"non-finite Gram for {key!r} of model {n}")
        closed.append(key)
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key in closed:
            ref = base[key]
            merged = regmean_matrix([m[key].to(ref.device) for m in finetuned],
                                    [g[key].to(ref.device) for g in grams], resolved["alpha"])
            out[key] = merged.to(ref.dtype)
        mean_keys = [k for k in keys if k not in out and classify_key(k, base[k]) != KIND_BUFFER]
        add_scaled_sum(TaskVectorSource(base, finetuned), mean_keys, 1.0 / len(finetuned), out)
    copy_buffers(base, [k for k in keys if k not in out], out)
    return {k: out[k] for k in keys}, resolved, {"closed_form_keys": len(closed), "mean_keys": len(mean_keys)}
