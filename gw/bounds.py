"""Cheap lower bounds on the GW objective, to skip pairs that can never be grouped.

Mémoli's second lower bound (SLB; Mémoli 2011, "Gromov-Wasserstein distances and the metric approach
to object matching", section 6): for any coupling ``T`` of ``p`` and ``q``, ``T (x) T`` couples the law
of the intra-cloud cost ``C1_ik`` under ``p (x) p`` with the law of ``C2_jl`` under ``q (x) q``, so

    GW(T) = sum_ijkl (C1_ik - C2_jl)^2 T_ij T_kl  >=  W2^2(law of C1, law of C2),

a 1-D Wasserstein distance: ``int_0^1 (F1^-1(t) - F2^-1(t))^2 dt`` with ``F^-1`` the quantile
functions. It holds for every feasible coupling, so it is also below what either solver reports (up
to the entropic solver's marginal error, ~1e-4), on the same normalised costs.

For fleets, each cloud is summarised once by a :class:`CostProfile`: on K equal-mass segments of
[0, 1], an interval ``[lower_k, upper_k]`` that contains ``F^-1(t)`` for every ``t`` in the segment.
The profile is read off an exact weighted histogram of all N^2 costs (computed in row blocks, so
memory stays O(N) per block whatever N), widened by one bin on each side against rounding. Then

    sum_k (1/K) * max(0, lower1_k - upper2_k, lower2_k - upper1_k)^2  <=  W2^2  <=  GW,

a valid bound (never above the exact SLB), at O(K) per pair; it approaches the exact SLB as K and
the bin count grow. :func:`second_lower_bound` computes the exact SLB by sorting all costs (small
clouds; used by the tests).

Pure math: numpy and torch; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .clouds import PreparedCloud

DEFAULT_LEVELS = 1024
DEFAULT_BINS = 1 << 16
_BLOCK_ELEMENTS = 1 << 22  # rows x N costs per block


@dataclass(frozen=True, eq=False)
class CostProfile:
    """Quantile envelope of a cloud's normalised costs under ``p (x) p``.

    For ``t`` in the k-th segment ``(k/K, (k+1)/K]``: ``lower[k] <= F^-1(t) <= upper[k]``.
    """

    lower: np.ndarray
    upper: np.ndarray

    @property
    def n_levels(self) -> int:
        return int(self.lower.shape[0])


def cost_profile(cloud: PreparedCloud, n_levels: int = DEFAULT_LEVELS, n_bins: int = DEFAULT_BINS) -> CostProfile:
    """The :class:`CostProfile` of a prepared cloud (two passes over its N^2 costs, O(N^2 d))."""
    if n_levels < 1 or n_bins < 2:
        raise ValueError("n_levels must be >= 1 and n_bins >= 2")
    x = cloud.points
    sq = cloud.sq_norms
    w = cloud.weights.double()
    n = cloud.n_points
    rows = max(1, _BLOCK_ELEMENTS // n)
    top = 0.0
    for start in range(0, n, rows):
        top = max(top, float(_cost_block(x, sq, start, rows).max()))
    top = max(top, np.finfo(np.float64).tiny)
    mass = torch.zeros(n_bins, dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        block = _cost_block(x, sq, start, rows)
        bins = (block.double() * (n_bins / top)).long().clamp_(0, n_bins - 1)
        weight = w[start:start + block.shape[0], None] * w[None, :]
        mass += torch.bincount(bins.reshape(-1), weights=weight.reshape(-1), minlength=n_bins)
    cumulative = torch.cumsum(mass, 0).cpu().numpy()
    cumulative /= cumulative[-1]
    edges = np.arange(n_bins + 1, dtype=np.float64) * (top / n_bins)
    levels = np.arange(n_levels + 1, dtype=np.float64) / n_levels
    # bin holding F^-1(t): the first bin whose cumulative mass reaches t (one bin of slack each side)
    holder = np.clip(np.searchsorted(cumulative, levels, side="left"), 0, n_bins - 1)
    lower = edges[np.clip(holder[:-1] - 1, 0, n_bins)]
    upper = edges[np.clip(holder[1:] + 2, 0, n_bins)]
    return CostProfile(lower=lower, upper=upper)


def _cost_block(x: torch.Tensor, sq: torch.Tensor, start: int, rows: int) -> torch.Tensor:
    block = sq[start:start + rows, None] + sq[None, :] - 2.0 * (x[start:start + rows] @ x.T)
    block.clamp_(min=0.0)
    idx = torch.arange(block.shape[0], device=x.device)
    block[idx, idx + start] = 0.0
    return block


def profile_bound(a: CostProfile, b: CostProfile) -> float:
    """The SLB lower bound from two profiles (same number of levels)."""
    if a.n_levels != b.n_levels:
        raise ValueError(f"profiles have different level counts: {a.n_levels} vs {b.n_levels}")
    gap = np.maximum(0.0, np.maximum(a.lower - b.upper, b.lower - a.upper))
    return float(np.mean(gap * gap))


def bound_matrix(profiles: Sequence[CostProfile]) -> np.ndarray:
    """Symmetric [n, n] matrix of :func:`profile_bound` (zero diagonal), vectorised in row blocks."""
    if not profiles:
        return np.zeros((0, 0))
    levels = {p.n_levels for p in profiles}
    if len(levels) != 1:
        raise ValueError(f"profiles have different level counts: {sorted(levels)}")
    lower = np.stack([p.lower for p in profiles])
    upper = np.stack([p.upper for p in profiles])
    n, k = lower.shape
    out = np.zeros((n, n))
    rows = max(1, (1 << 22) // max(1, n * k))
    for start in range(0, n, rows):
        lo, up = lower[start:start + rows, None, :], upper[start:start + rows, None, :]
        gap = np.maximum(0.0, np.maximum(lo - upper[None], lower[None] - up))
        out[start:start + rows] = np.mean(gap * gap, axis=2)
    np.fill_diagonal(out, 0.0)
    return np.maximum(out, out.T)


def second_lower_bound(a: PreparedCloud, b: PreparedCloud) -> float:
    """Mémoli's SLB exactly: W2^2 between the laws of the two clouds' normalised costs.

    Sorts all N^2 + M^2 costs (float64): for small clouds and tests.
    """
    va, wa = _cost_law(a)
    vb, wb = _cost_law(b)
    return wasserstein2_1d(va, wa, vb, wb)


def _cost_law(cloud: PreparedCloud) -> tuple[np.ndarray, np.ndarray]:
    x = cloud.points.double()
    sq = cloud.sq_norms.double()
    costs = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_(min=0.0)
    costs.fill_diagonal_(0.0)
    w = cloud.weights.double()
    return costs.reshape(-1).cpu().numpy(), (w[:, None] * w[None, :]).reshape(-1).cpu().numpy()


def wasserstein2_1d(values_a: np.ndarray, weights_a: np.ndarray, values_b: np.ndarray, weights_b: np.ndarray) -> float:
    """Squared 2-Wasserstein distance between two weighted 1-D samples (weights normalised here)."""
    ia, ib = np.argsort(values_a, kind="stable"), np.argsort(values_b, kind="stable")
    va, vb = np.asarray(values_a, float)[ia], np.asarray(values_b, float)[ib]
    ca = np.cumsum(np.asarray(weights_a, float)[ia])
    cb = np.cumsum(np.asarray(weights_b, float)[ib])
    ca /= ca[-1]
    cb /= cb[-1]
    # Merge the breakpoints of both quantile functions; on each piece both are constant.
    cuts = np.union1d(ca, cb)
    widths = np.diff(np.concatenate([[0.0], cuts]))
    mids = cuts - widths / 2
    qa = va[np.clip(np.searchsorted(ca, mids, side="left"), 0, len(va) - 1)]
    qb = vb[np.clip(np.searchsorted(cb, mids, side="left"), 0, len(vb) - 1)]
    return float(np.sum(widths * (qa - qb) ** 2))


# --------------------------------------------------------------------------------------------------
# Mémoli's third lower bound (TLB), per pair
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RowProfiles:
    """Each point's law of costs to the others, as K segment means of its quantile function.

    ``means[i, k]`` is the mean of ``F_i^-1`` over ``(k/K, (k+1)/K]``, ``F_i`` the law of ``C_ik``
    (k drawn from the cloud's weights).
    """

    means: torch.Tensor
    weights: torch.Tensor

    @property
    def n_levels(self) -> int:
        return int(self.means.shape[1])


def row_profiles(cloud: PreparedCloud, n_levels: int = 32) -> RowProfiles:
    """:class:`RowProfiles` of a prepared cloud (sorts every cost row; O(N^2 (d + log N)))."""
    if n_levels < 1:
        raise ValueError("n_levels must be >= 1")
    x, sq, w = cloud.points, cloud.sq_norms, cloud.weights.double()
    n = cloud.n_points
    rows = max(1, _BLOCK_ELEMENTS // n)
    levels = torch.arange(n_levels + 1, dtype=torch.float64, device=x.device) / n_levels
    out = []
    for start in range(0, n, rows):
        values, order = torch.sort(_cost_block(x, sq, start, rows).double(), dim=1)
        mass = w[order]
        cum_mass = torch.cumsum(mass, 1)
        cum_mass = cum_mass / cum_mass[:, -1:]
        cum_int = torch.cumsum(mass * values, 1) / mass.sum(1, keepdim=True)
        t = levels.expand(values.shape[0], -1).contiguous()
        j = torch.searchsorted(cum_mass, t).clamp_(max=n - 1)
        prev_mass = torch.where(j > 0, cum_mass.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(t))
        prev_int = torch.where(j > 0, cum_int.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(t))
        integral = prev_int + (t - prev_mass).clamp(min=0.0) * values.gather(1, j)  # int_0^t F_i^-1
        out.append(torch.diff(integral, dim=1) * n_levels)
    return RowProfiles(means=torch.cat(out).to(cloud.dtype), weights=cloud.weights)


def third_lower_bound(a: RowProfiles, b: RowProfiles, *, iterations: int = 10) -> float:
    """A valid lower bound on GW from Mémoli's TLB: ``min_T sum_ij T_ij Gamma_ij``.

    ``Gamma_ij`` = W2^2 between the cost-row laws of point i and point j, bounded below (Jensen, per
    segment) by ``mean_k (means_a[i, k] - means_b[j, k])^2``. The transport value is bounded below
    by weak duality: feasible potentials from c-transforms (``f_i = min_j Gamma_ij - g_j`` and back,
    so ``f_i + g_j <= Gamma_ij`` exactly), improved by a few scaling Sinkhorn iterations between
    c-transforms (epsilon decreasing from 5% to 0.5% of the mean cost over ``iterations / 10``
    stages; each stage's kernel is at most 1 with a 1 in every row and column, so nothing overflows);
    ``p.f + q.g`` is the bound (minus a float32 margin). Any potentials give a valid bound once
    c-transformed; the iterations only tighten it.
    GW(T) >= TLB holds for every coupling T of p and q, since for each (i, j)
    ``sum_kl T_kl (C1_ik - C2_jl)^2 >= Gamma_ij``.
    """
    if a.n_levels != b.n_levels:
        raise ValueError(f"row profiles have different level counts: {a.n_levels} vs {b.n_levels}")
    A, B = a.means, b.means
    gamma = ((A * A).mean(1)[:, None] + (B * B).mean(1)[None, :] - (2.0 / A.shape[1]) * (A @ B.T)).clamp_(min=0.0)
    p, q = a.weights.to(gamma.dtype), b.weights.to(gamma.dtype)
    scale = float(gamma.mean())
    if scale <= 0.0:
        return 0.0
    f = gamma.amin(1)
    g = (gamma - f[:, None]).amin(0)
    stages = max(1, round(iterations / 10)) if iterations > 0 else 0
    for stage in range(stages):
        steps = iterations // stages + (1 if stage < iterations % stages else 0)
        eps = scale * 0.05 * (0.1 ** (stage / max(1, stages - 1)))
        # floored exponent: a CPU exp that underflows takes a slow path (e^-80 is as good as 0 here)
        kernel = (f[:, None] + g[None, :] - gamma).div_(eps).clamp_(min=-80.0).exp_()
        u, v = torch.ones_like(p), torch.ones_like(q)
        for _ in range(steps):
            u = p / (kernel @ v).clamp_min_(1e-30)
            v = q / (kernel.T @ u).clamp_min_(1e-30)
        f_new, g_new = f + eps * u.log(), g + eps * v.log()
        if not bool(torch.isfinite(f_new).all() & torch.isfinite(g_new).all()):
            break
        g = (gamma - f_new[:, None]).amin(0)  # c-transforms: f_i + g_j <= Gamma_ij exactly
        f = (gamma - g[None, :]).amin(1)
    bound = float(a.weights.double() @ f.double() + b.weights.double() @ g.double())
    return max(0.0, bound - 1e-6 * float(gamma.max()))
