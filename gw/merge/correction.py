"""A per-item correction: the truncated SVD of an item's residual against its group's merged backbone.

For one weight matrix, R = W_item − W_merged = U S Vᵀ. Its best rank-r approximation in Frobenius and
spectral norm (Eckart–Young) is B A with B = U_r √S_r and A = √S_r V_rᵀ: the LoRA layout (A is
[r, in], B is [out, r]; the layer's output gains x Aᵀ Bᵀ). Splitting √S between the two keeps both
factors on one scale. At full rank B A = R, so W_merged + B A = W_item; at rank r the squared
Frobenius error is the sum of the squared singular values past r.

Only 2-D weights of linear maps are corrected (the caller names them): biases, LayerNorm and
embeddings stay merged, as PEFT's LoRA leaves them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gw.merge._state import compute_dtype


@dataclass(frozen=True)
class Residual:
    """One matrix's residual, factored to at most `max_rank` (all singular values kept for the figures)."""

    a: Tensor  # [k, in]  rows √s_i v_iᵀ, k = min(max_rank, min(out, in))
    b: Tensor  # [out, k] columns u_i √s_i
    singular_values: Tensor  # every singular value of R, descending

    @property
    def max_rank(self) -> int:
        return self.a.shape[0]

    def factors(self, rank: int) -> tuple[Tensor, Tensor]:
        """(A, B) of the rank-`rank` truncation (fewer rows when the matrix or max_rank is smaller)."""
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        k = min(rank, self.max_rank)
        return self.a[:k], self.b[:, :k]

    def energy_kept(self, rank: int) -> float:
        return energy_kept(self.singular_values, rank)


def residual(item_weight: Tensor, merged_weight: Tensor, max_rank: int) -> Residual:
    """The residual item − merged of one 2-D weight, as LoRA factors of rank at most `max_rank`.

    Computed in at least float32 (float64 stays float64); the factors come back in the item's dtype."""
    if item_weight.ndim != 2 or item_weight.shape != merged_weight.shape:
        raise ValueError(f"need two 2-D weights of one shape, got {tuple(item_weight.shape)} and "
                         f"{tuple(merged_weight.shape)}")
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    dtype = compute_dtype(item_weight.dtype)
    r = item_weight.to(dtype) - merged_weight.to(item_weight.device, dtype)
    if not torch.isfinite(r).all():
        raise ValueError("non-finite residual: a weight holds NaN or inf")
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    k = min(max_rank, s.shape[0])
    root = s[:k].sqrt()
    a = (root[:, None] * vh[:k]).to(item_weight.dtype)
    b = (u[:, :k] * root[None, :]).to(item_weight.dtype)
    return Residual(a=a.contiguous(), b=b.contiguous(), singular_values=s)


def residuals(item: Mapping[str, Tensor], merged: Mapping[str, Tensor], keys: Sequence[str],
              max_rank: int) -> dict[str, Residual]:
    """`residual` for each of `keys` (weights of linear maps present in both state dicts)."""
    missing = [k for k in keys if k not in item or k not in merged]
    if missing:
        raise ValueError(f"weights to correct are missing from a state dict: {missing[:3]}")
    with torch.no_grad():
        return {k: residual(item[k], merged[k], max_rank) for k in keys}


def module_factors(parts: Mapping[str, Residual], rank: int) -> dict[str, tuple[Tensor, Tensor]] | None:
    """The rank-`rank` LoRA factors (A, B) of each corrected weight, keyed by its module ("x.weight" ->
    "x"); None at rank 0 (no correction)."""
    if rank == 0:
        return None
    return {key.removesuffix(".weight"): part.factors(rank) for key, part in parts.items()}


def energy_kept(singular_values: Tensor, rank: int) -> float:
    """Share of the residual's squared Frobenius norm that rank `rank` keeps (1.0 for a zero residual)."""
    power = singular_values.double().square()
    total = float(power.sum())
    return 1.0 if total == 0.0 else float(power[:max(rank, 0)].sum()) / total


def total_energy_kept(parts: Mapping[str, Residual], rank: int) -> float:
    """Energy kept over all corrected matrices together (each matrix's squared norm weighs in)."""
    power = [r.singular_values.double().square() for r in parts.values()]
    total = float(sum(p.sum() for p in power))
    return 1.0 if total == 0.0 else float(sum(p[:max(rank, 0)].sum() for p in power)) / total


def choose_rank(scores: Mapping[int, float], tolerance: float = 0.0) -> int:
    """The smallest rank whose score is within `tolerance` of the best one (tolerance 0: the best score,
    the smallest rank among equals): past that, more bytes buy too little."""
    if not scores:
        raise ValueError("no ranks to choose from")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    best = max(scores.values())
    return min(rank for rank, score in scores.items() if score >= best - tolerance)