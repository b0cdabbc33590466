"""Shared plumbing of the SVD-based merges (TSV-M, Iso-C, Iso-CTS): one weight matrix at a time.

Each matrix key is read whole (its N task vectors stacked, in compute precision on the base's device),
handed to a per-matrix rule that returns the merged update, and written as θ₀ + α · update. Every other
floating key (biases, LayerNorm, embedding tables, other tensors) gets the Task Arithmetic mean
θ₀ + (1/N) Σ τ_i, streamed like Task Arithmetic; buffers are copied from the base.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gw.merge._state import (
    KIND_BUFFER,
    KIND_MATRIX,
    StateDict,
    TaskVectorSource,
    allocate_like,
    classify_key,
    compute_dtype,
    copy_buffers,
)
from gw.merge.task_arithmetic import add_scaled_sum

MatrixRule = Callable[[Tensor], Tensor]


def nearest_orthogonal(matrix: Tensor) -> Tensor:
    """The orthogonal Procrustes solution: for matrix = P S Qᵀ (thin SVD), P Qᵀ.

    The closest matrix with orthonormal columns (rows, when it is wider than tall) in Frobenius norm;
    it spans the same column space and is equivariant under a permutation of the columns.
    """
    try:
        p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        # Stacked singular bases of real fine-tunes can be nearly rank-deficient with repeated singular
        # values, where float32 LAPACK fails to converge (seen on MiniLM-L6 with Iso-CTS): retry in float64.
        p, _, qh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return (p @ qh).to(matrix.dtype)
    return p @ qh


def check_alpha(alpha: float) -> float:
    value = float(alpha)
    if not math.isfinite(value):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    return value


def stacked_task_vectors(base: StateDict, finetuned: Sequence[StateDict], key: str) -> Tensor:
    """[N, rows, cols] task vectors of one matrix key in compute precision on the base's device."""
    ref = base[key]
    dtype = compute_dtype(ref.dtype)
    base_value = ref.to(dtype)
    taus = torch.stack([model[key].to(ref.device, dtype) - base_value for model in finetuned])
    if not torch.isfinite(taus).all():
        raise ValueError(f"non-finite task vector for {key!r}: a fine-tuned model holds NaN or inf there")
    return taus


def merge_by_matrix_rule(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    rule: MatrixRule,
    alpha: float,
) -> tuple[dict[str, Tensor], dict[str, object]]:
    """θ₀ + α · rule(τ_1..τ_N) on matrix keys, the TA mean elsewhere, buffers copied; (state, info)."""
    matrix_keys = [k for k in keys if classify_key(k, base[k]) == KIND_MATRIX]
    mean_keys = [k for k in keys if classify_key(k, base[k]) not in (KIND_MATRIX, KIND_BUFFER)]
    out: dict[str, Tensor] = {}
    shapes: dict[str, int] = {}
    with torch.no_grad():
        for key in matrix_keys:
            ref = base[key]
            taus = stacked_task_vectors(base, finetuned, key)
            update = rule(taus) if min(ref.shape) > 0 else torch.zeros_like(taus[0])
            merged = allocate_like(base, key)
            merged.copy_(update.mul_(alpha).add_(ref.to(update.dtype)))
            out[key] = merged
            shapes[f"{ref.shape[0]}x{ref.shape[1]}"] = shapes.get(f"{ref.shape[0]}x{ref.shape[1]}", 0) + 1
        if mean_keys:
            add_scaled_sum(TaskVectorSource(base, finetuned), mean_keys, 1.0 / len(finetuned), out)
    copy_buffers(base, [k for k in keys if k not in out], out)
    info = {"n_matrix_keys": len(matrix_keys), "n_mean_keys": len(mean_keys), "matrix_shapes": shapes}
    return {k: out[k] for k in keys}, info
