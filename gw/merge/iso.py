"""Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces", ICML 2025, arXiv 2502.04959, Sec. 4).

For every weight of kind *matrix* (r = min(rows, cols), T tasks, Δ = Σ_i τ_i the Task Arithmetic sum):

- **Iso-C** (isotropic merging in the common subspace): Δ = U Σ Vᵀ (thin SVD); the spectrum is
  flattened to its mean over all r singular values, σ̄ = (1/r) Σ_j σ_j, and M = σ̄ U Vᵀ.
- **Iso-CTS** (common and task-specific subspaces): the top k singular directions of Δ span the common
  subspace (U_c, Σ_c, V_c); each task contributes the top s = ⌊(r − ⌊f·r⌋)/T⌋ singular triplets of its
  task vector projected off the common left subspace, τ̄_i = (I − U_c U_cᵀ) τ_i; the r − T·s remaining
  directions all go to the common subspace (k = r − T·s ≥ ⌊f·r⌋), so the stacked basis has exactly r
  columns, as in the reference code (which rounds (r − ⌊f·r⌋)/T where we take the floor: at most one
  task-specific direction per task fewer in some shapes, the same for BERT-base's 768 at f = 0.8, T = 3).
  U = [U_c, U_1 … U_T] and V = [V_c, V_1 … V_T] are replaced by their nearest matrices with orthonormal
  columns (orthogonal Procrustes, U = P S Qᵀ → P Qᵀ, as in TSV-M), σ̄ is the mean of the stacked
  singular values [Σ_c, Σ_1 … Σ_T] and M = σ̄ U⊥ V⊥ᵀ.
  With f = 1 there is no task-specific part and Iso-CTS is Iso-C.

θ = θ₀ + α M. The paper chooses α on held-out validation data per setting; the default here is 1.0
(the value in FusionBench's iso_c / iso_cts configs), with a small grid in gw.tuning. The common
fraction f = 0.8 is the authors' setting (their README and config/method/iso_cts.yaml; FusionBench's
iso_cts.yaml agrees).

Other parameters: the method is defined on matrices. Biases, LayerNorm weights/biases, embedding tables
and other float tensors get the Task Arithmetic mean θ₀ + (1/T) Σ τ_i (α does not apply to them);
buffers are copied. The reference code in FusionBench also averages the non-2-D tensors but merges
embedding tables like any 2-D tensor and scales everything by α (gw/merge/README.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gw.merge._lowrank import check_alpha, merge_by_matrix_rule, nearest_orthogonal
from gw.merge._state import StateDict


@dataclass(frozen=True)
class IsoCParams:
    """alpha: scaling of the isotropic matrix update M (non-matrix tensors: the mean of the fine-tunes)."""

    alpha: float = 1.0

    def resolved(self) -> dict[str, float]:
        return {"alpha": check_alpha(self.alpha)}


@dataclass(frozen=True)
class IsoCtsParams:
    """alpha: scaling of M; common_fraction: share f of the rank given to Δ's common subspace, in (0, 1]."""

    alpha: float = 1.0
    common_fraction: float = 0.8

    def resolved(self) -> dict[str, float]:
        fraction = float(self.common_fraction)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"common_fraction must be in (0, 1], got {self.common_fraction}")
        return {"alpha": check_alpha(self.alpha), "common_fraction": fraction}


def iso_split(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k, s): common directions and task-specific directions per task, k + T·s = rank, k ≥ ⌊f·rank⌋."""
    per_task = (rank - int(common_fraction * rank)) // n_tasks
    return rank - n_tasks * per_task, per_task


def iso_c_update(taus: Tensor) -> Tensor:
    """Iso-C's M = σ̄ U Vᵀ for stacked task vectors [T, rows, cols] (Δ = Σ τ_i = U Σ Vᵀ)."""
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts_factors(taus: Tensor, common_fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """(U⊥, σ̄, V⊥) of Iso-CTS for stacked task vectors [T, rows, cols]: M = σ̄ U⊥ V⊥ᵀ."""
    n_tasks, rows, cols = taus.shape
    k, s = iso_split(min(rows, cols), n_tasks, common_fraction)
    u, sigma, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    us, sigmas, vs = [u[:, :k]], [sigma[:k]], [vh[:k].mT]
    if s > 0:
        common = us[0]
        for tau in taus:
            residual = tau - common @ (common.mT @ tau)
            u_i, sigma_i, vh_i = torch.linalg.svd(residual, full_matrices=False)
            us.append(u_i[:, :s])
            sigmas.append(sigma_i[:s])
            vs.append(vh_i[:s].mT)
    stacked_sigma = torch.cat(sigmas)
    return nearest_orthogonal(torch.cat(us, dim=1)), stacked_sigma.mean(), nearest_orthogonal(torch.cat(vs, dim=1))


def iso_cts_update(taus: Tensor, common_fraction: float) -> Tensor:
    """Iso-CTS's M = σ̄ U⊥ V⊥ᵀ for stacked task vectors [T, rows, cols]."""
    u, sigma_bar, v = iso_cts_factors(taus, common_fraction)
    return sigma_bar * (u @ v.mT)


def _split_info(shapes: dict[str, int], n_tasks: int, fraction: float) -> dict[str, list[int]]:
    split = {}
    for shape in shapes:
        rows, cols = (int(x) for x in shape.split("x"))
        split[shape] = list(iso_split(min(rows, cols), n_tasks, fraction))
    return split


def merge_iso_c(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: IsoCParams,
    *,
    seed: int = 0,  # noqa: ARG001 - deterministic; accepted for the common signature
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, object]]:
    """Iso-C over validated state dicts; returns (state dict, resolved params, info)."""
    resolved = params.resolved()
    state, info = merge_by_matrix_rule(base, finetuned, keys, iso_c_update, resolved["alpha"])
    return state, resolved, info


def merge_iso_cts(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: IsoCtsParams,
    *,
    seed: int = 0,  # noqa: ARG001 - deterministic; accepted for the common signature
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, object]]:
    """Iso-CTS over validated state dicts; returns (state dict, resolved params, info)."""
    resolved = params.resolved()
    fraction = resolved["common_fraction"]
    state, info = merge_by_matrix_rule(
        base, finetuned, keys, lambda taus: iso_cts_update(taus, fraction), resolved["alpha"]
    )
    split = _split_info(info["matrix_shapes"], len(finetuned), fraction)
    return state, resolved, dict(info, common_and_per_task_rank=split)
