"""Input checks, the threshold and the problem on units, with its objective and checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from .types import Plan


def plan_from_groups(
    groups: Iterable[Iterable[str]],
    ids: Sequence[str],
    method: str,
    *,
    D: np.ndarray | None = None,
    tau: float | None = None,
) -> Plan:
    """A :class:`Plan` over ``ids`` from its multi-member groups (everyone else a singleton).

    With ``D`` and ``tau`` the objective is filled in.
    """
    ids = _check_ids(ids)
    groups = [tuple(g) for g in groups if len(tuple(g)) >= 2]
    known = set(ids)
    for group in groups:
        for member in group:
            if member not in known:
                raise ValueError(f"group {group!r} names id {member!r}, which is not among the ids")
    grouped = {m for g in groups for m in g}
    singletons = tuple(i for i in ids if i not in grouped)
    objective = None
    if D is not None and tau is not None:
        objective = plan_objective(groups, D, ids, tau)
    return Plan(tuple(groups), singletons, method, tau=tau, objective=objective)


# --------------------------------------------------------------------------------------------------
# Input checks and the threshold
# --------------------------------------------------------------------------------------------------


def _check_ids(ids: Sequence[str]) -> tuple[str, ...]:
    ids = tuple(str(i) for i in ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"ids contain duplicates: {duplicates}")
    return ids


def check_distance_matrix(D: np.ndarray, ids: Sequence[str] | None = None, *, name: str = "D") -> np.ndarray:
    """Validate a distance matrix and return it as float64.

    Square, 2-D, symmetric (NaN where its mirror is NaN), no negative entries; ``NaN`` and ``+inf``
    are allowed and mean "unknown / never group". The diagonal is ignored.
    """
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {D.shape}")
    if ids is not None and len(ids) != D.shape[0]:
        raise ValueError(f"{name} is {D.shape[0]}x{D.shape[1]} but {len(ids)} ids were given")
    off = ~np.eye(D.shape[0], dtype=bool)
    values = D[off]
    if np.any(values[~np.isnan(values)] < 0):
        raise ValueError(f"{name} has negative off-diagonal entries; distances must be >= 0 (NaN/inf = unknown)")
    same = (D == D.T) | (np.isnan(D) & np.isnan(D.T))
    finite = np.isfinite(D) & np.isfinite(D.T)
    close = np.isclose(D, D.T, rtol=1e-6, atol=1e-9) & finite
    asymmetric = off & ~(same | close)
    if asymmetric.any():
        i, j = map(int, np.argwhere(asymmetric)[0])
        raise ValueError(f"{name} is not symmetric: {name}[{i},{j}]={D[i, j]!r} but {name}[{j},{i}]={D[j, i]!r}")
    return D


def threshold_from_quantile(D: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the finite off-diagonal distances (each unordered pair counted once)."""
    if not 0.0 <= quantile <= 1.0 or math.isnan(quantile):
        raise ValueError(f"tau_quantile must be in [0, 1], got {quantile}")
    D = check_distance_matrix(D)
    upper = D[np.triu_indices(D.shape[0], k=1)]
    finite = upper[np.isfinite(upper)]
    if finite.size == 0:
        raise ValueError("cannot take a quantile threshold: D has no finite off-diagonal distance")
    return float(np.quantile(finite, quantile))


def _resolve_tau(D: np.ndarray, tau: float | None, tau_quantile: float) -> float | None:
    if tau is not None:
        tau = float(tau)
        if math.isnan(tau):
            raise ValueError("tau is NaN")
        return tau
    upper = D[np.triu_indices(D.shape[0], k=1)]
    if not np.isfinite(upper).any():
        return None  # nothing can be grouped anyway
    return threshold_from_quantile(D, tau_quantile)


# --------------------------------------------------------------------------------------------------
# The problem on "units" (each one scorer; the solvers work on units)
# --------------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    ids: tuple[str, ...]
    k: int
    units: list[tuple[int, ...]]  # indices into ids; one scorer each
    unit_size: np.ndarray  # [U] ints
    unit_weight: np.ndarray  # [U, U] sum of (tau - D) across two units; 0 on the diagonal
    unit_allowed: np.ndarray  # [U, U] bool: the two units may share a group; False on the diagonal


def allowed_pairs(D: np.ndarray, ids: Sequence[str], tau: float | None) -> np.ndarray:
    """Boolean [n, n]: pairs that may share a group (finite ``D < tau``)."""
    ids = _check_ids(ids)
    D = check_distance_matrix(D, ids)
    n = len(ids)
    with np.errstate(invalid="ignore"):
        allowed = np.isfinite(D) & (D < tau) if tau is not None else np.zeros((n, n), dtype=bool)
    np.fill_diagonal(allowed, False)
    return allowed


def _build_problem(D: np.ndarray, ids: tuple[str, ...], tau: float | None, k: int) -> _Problem:
    n = len(ids)
    allowed = allowed_pairs(D, ids, tau)
    weight = np.where(np.isfinite(D), (tau if tau is not None else 0.0) - D, 0.0)
    np.fill_diagonal(weight, 0.0)
    units = [(i,) for i in range(n)]
    unit_allowed = allowed.copy()
    np.fill_diagonal(unit_allowed, False)
    return _Problem(ids, k, units, np.ones(n, dtype=np.int64), weight, unit_allowed)


# --------------------------------------------------------------------------------------------------
# Objective and validity
# --------------------------------------------------------------------------------------------------


def plan_objective(groups: Iterable[Iterable[str]], D: np.ndarray, ids: Sequence[str], tau: float) -> float:
    """``sum_groups sum_{i<j in g} (tau - D_ij)``; non-finite distances make it ``-inf``."""
    ids = _check_ids(ids)
    D = np.asarray(D, dtype=np.float64)
    position = {s: i for i, s in enumerate(ids)}
    total = 0.0
    for group in groups:
        index = [position[m] for m in group]
        for x in range(len(index)):
            for y in range(x + 1, len(index)):
                d = D[index[x], index[y]]
                total += float(tau - d) if np.isfinite(d) else -math.inf
    return total


def plan_violations(plan: Plan, D: np.ndarray, ids: Sequence[str], *, tau: float, k: int) -> list[str]:
    """Human-readable reasons why ``plan`` breaks the rules of :func:`solve_plan` (empty when valid)."""
    ids = _check_ids(ids)
    problems: list[str] = []
    if set(plan.ids) != set(ids):
        problems.append(f"plan covers {sorted(set(plan.ids) ^ set(ids))} differently from the ids")
    allowed = allowed_pairs(D, ids, tau)
    position = {s: i for i, s in enumerate(ids)}
    for group in plan.groups:
        if len(group) > k:
            problems.append(f"group {group} has {len(group)} > k={k} members")
        index = [position[m] for m in group if m in position]
        for x in range(len(index)):
            for y in range(x + 1, len(index)):
                a, b = index[x], index[y]
                if not allowed[a, b]:
                    problems.append(f"group {group} joins {ids[a]!r} and {ids[b]!r}, which may not share a group")
    return problems


def _groups_objective(problem: _Problem, groups: list[list[int]]) -> float:
    return float(sum(problem.unit_weight[np.ix_(g, g)].sum() / 2.0 for g in groups))


def _subproblem(problem: _Problem, units: np.ndarray) -> _Problem:
    return _Problem(
        ids=problem.ids,
        k=problem.k,
        units=[problem.units[u] for u in units],
        unit_size=problem.unit_size[units],
        unit_weight=problem.unit_weight[np.ix_(units, units)],
        unit_allowed=problem.unit_allowed[np.ix_(units, units)],
    )
