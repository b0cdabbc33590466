"""Choosing merge parameters (λ, k%, ...) per group on validation data, as a pure grid search.

The caller owns the evaluation: `evaluate(params)` merges the group with those parameters, refits or
keeps the heads, scores each member on its validation split and returns one number, higher is better
(e.g. `worst_change(baseline, merged)`, the same quantity the gate checks). This module only walks the
grid, records every score and picks the best; ties go to the earlier candidate, so the order of the
grid is the tie-break (default grids list the method's usual default first among equals).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Small grids: every candidate costs one merge plus an evaluation of each member.
DEFAULT_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    # θ₀ + λ Σ τ_i; 1/N (plain averaging) is 0.5 for pairs and ≈0.3 for trios.
    "task_arithmetic": {"lam": (0.3, 0.5, 0.7, 1.0)},
    # The TIES paper's λ = 1 over its usual k range. Three candidates, not the nine of λ ∈ {0.8, 1, 1.2}:
    # every candidate is a merge plus a forward pass of each member's answers and a head refit, so this
    # is a third of the merge time. Other λ were not compared on Beetle (docs/results/defaults.md).
    "ties": {"lam": (1.0,), "top_k": (0.2, 0.1, 0.3)},
    # DARE + TA (the default combiner).
    "dare": {"p": (0.5, 0.3, 0.7), "lam": (0.5, 0.7, 1.0)},
    # DOGE's η (0.07 in the paper); each candidate is a full Δ optimisation.
    "doge": {"eta": (0.07, 0.04, 0.1)},
    # α of the SVD-based merges, default first (1.0: FusionBench's configs for all three; the Iso paper
    # picks α on validation). Not compared on Beetle yet.
    "tsv_m": {"alpha": (1.0, 0.7, 1.3)},
    "iso_c": {"alpha": (1.0, 0.7, 1.3)},
    "iso_cts": {"alpha": (1.0, 0.7, 1.3)},
    # RegMean's off-diagonal scale: 0.9 first, then nearer plain least squares and nearer the average.
    "regmean": {"alpha": (0.9, 1.0, 0.5)},
}


@dataclass(frozen=True)
class GridSearchResult:
    """The best candidate and the full table of (params, score); `to_dict()` is JSON-safe."""

    best_params: dict[str, Any]
    best_score: float
    table: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_params": dict(self.best_params),
            "best_score": self.best_score,
            "table": [
                {"params": dict(row["params"]), "score": row["score"] if math.isfinite(row["score"]) else None}
                for row in self.table
            ],
        }


def expand_grid(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Candidates of a grid: the Cartesian product of {name: values}, or an explicit list of dicts."""
    if isinstance(grid, Mapping):
        names = list(grid)
        for name in names:
            values = grid[name]
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"grid[{name!r}] must be a non-empty sequence of values, got {values!r}")
        return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]
    candidates = [dict(candidate) for candidate in grid]
    if not all(isinstance(c, dict) for c in candidates):
        raise ValueError("an explicit grid must be a sequence of parameter dicts")
    return candidates


def default_grid(method: str) -> list[dict[str, Any]]:
    """The default candidates for a merge method (see DEFAULT_GRIDS)."""
    name = "task_arithmetic" if method == "ta" else method
    if name not in DEFAULT_GRIDS:
        raise ValueError(f"no default grid for method {method!r}; known: {sorted(DEFAULT_GRIDS)}")
    return expand_grid(DEFAULT_GRIDS[name])


def grid_search(
    grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    evaluate: Callable[[dict[str, Any]], float],
    *,
    fixed: Mapping[str, Any] | None = None,
) -> GridSearchResult:
    """Evaluate every candidate (merged with `fixed` params) and return the highest-scoring one.

    NaN scores rank last; ties keep the earlier candidate. Raises ValueError on an empty grid, a
    candidate that overrides a `fixed` parameter, a non-numeric score, or when every score is NaN.
    """
    candidates = expand_grid(grid)
    if not candidates:
        raise ValueError("the grid has no candidates")
    fixed = dict(fixed or {})
    table: list[dict[str, Any]] = []
    best_index = -1
    for candidate in candidates:
        clash = sorted(set(candidate) & set(fixed))
        if clash:
            raise ValueError(f"grid candidate {candidate} overrides fixed parameter(s) {clash}")
        params = {**fixed, **candidate}
        score = evaluate(dict(params))
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"evaluate({params}) returned {score!r}, expected a number")
        score = float(score)
        table.append({"params": params, "score": score})
        if not math.isnan(score) and (best_index < 0 or score > table[best_index]["score"]):
            best_index = len(table) - 1
    if best_index < 0:
        raise ValueError("every candidate scored NaN")
    best = table[best_index]
    return GridSearchResult(best_params=dict(best["params"]), best_score=best["score"], table=table)


def worst_change(baseline: Mapping[str, float], merged: Mapping[str, float]) -> float:
    """min over members of (merged − baseline): the group score the gate cares about (higher is better)."""
    if not baseline or set(baseline) != set(merged):
        raise ValueError(f"baseline and merged must score the same members: {sorted(baseline)} vs {sorted(merged)}")
    return min(float(merged[m]) - float(baseline[m]) for m in baseline)
