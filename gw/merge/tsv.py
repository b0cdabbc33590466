"""TSV-M, Task Singular Vectors merging (Gargiulo et al., "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025, arXiv 2412.00081, Sec. 4-5).

For every weight of kind *matrix* (r = min(rows, cols), T tasks):

1. τ_i = θ_i − θ₀ and its thin SVD τ_i = U_i Σ_i V_iᵀ; keep each task's top k = max(1, ⌊r/T⌋)
   singular triplets (the "task singular vectors").
2. Concatenate U = [U_1 … U_T], Σ = blockdiag(Σ_1 … Σ_T), V = [V_1 … V_T].
3. Decorrelate: replace U and V by their nearest matrices with orthonormal columns (orthogonal
   Procrustes, U = P S Qᵀ → U⊥ = P Qᵀ; likewise V⊥), which removes the interference between the tasks'
   singular vectors while keeping each task's singular values.
4. τ_TSV = U⊥ Σ V⊥ᵀ and θ = θ₀ + α τ_TSV, α = 1.0 by default (FusionBench's TaskSingularVectorMerging
   config: alpha 1; the paper's own statement on α was not checked against its text).

When T·k > r (more tasks than the rank: k is then 1) the concatenated bases are wider than tall and
their Procrustes factors have orthonormal rows instead.

Other parameters: the paper's procedure is defined on matrices. Biases, LayerNorm weights/biases,
embedding tables and other float tensors get the Task Arithmetic mean θ₀ + (1/T) Σ τ_i (α does not apply
to them); buffers are copied. The reference code in FusionBench also averages the non-2-D tensors but
SVD-merges embedding tables like any 2-D tensor and scales everything by α (gw/merge/README.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gw.merge._lowrank import check_alpha, merge_by_matrix_rule, nearest_orthogonal
from gw.merge._state import StateDict


@dataclass(frozen=True)
class TsvMParams:
    """alpha: scaling of the merged matrix update τ_TSV (non-matrix tensors: the mean of the fine-tunes)."""

    alpha: float = 1.0

    def resolved(self) -> dict[str, float]:
        return {"alpha": check_alpha(self.alpha)}


def tsv_rank_per_task(rows: int, cols: int, n_tasks: int) -> int:
    """k = max(1, ⌊min(rows, cols)/T⌋) singular triplets kept per task."""
    return max(1, min(rows, cols) // n_tasks)


def tsv_factors(taus: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U⊥, σ, V⊥) of TSV-M for stacked task vectors [T, rows, cols]: τ_TSV = U⊥ diag(σ) V⊥ᵀ.

    σ concatenates each task's top k singular values (task by task); the columns of U⊥ and V⊥ match.
    """
    n_tasks, rows, cols = taus.shape
    k = min(tsv_rank_per_task(rows, cols, n_tasks), min(rows, cols))
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].mT)
    u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1)
    return nearest_orthogonal(u_cat), s_cat, nearest_orthogonal(v_cat)


def tsv_update(taus: Tensor) -> Tensor:
    """τ_TSV = U⊥ Σ V⊥ᵀ for stacked task vectors [T, rows, cols]."""
    u, s, v = tsv_factors(taus)
    return (u * s) @ v.mT


def merge_tsv_m(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: TsvMParams,
    *,
    seed: int = 0,  # noqa: ARG001 - deterministic; accepted for the common signature
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, object]]:
    """TSV-M over validated state dicts; returns (state dict, resolved params, info)."""
    resolved = params.resolved()
    state, info = merge_by_matrix_rule(base, finetuned, keys, tsv_update, resolved["alpha"])
    ranks = {}
    for shape in info["matrix_shapes"]:
        rows, cols = (int(x) for x in shape.split("x"))
        ranks[shape] = tsv_rank_per_task(rows, cols, len(finetuned))
    return state, resolved, dict(info, rank_per_task=ranks)
