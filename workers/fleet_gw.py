"""Distances and plans of a built fleet: the steps the flow and `fleetmerge distances|plan` share."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gw.baselines import linkage_plan
from gw.matrix import gw_matrix
from gw.mergeability import outcome_distances, split_weak_groups
from gw.plan import Plan, plan_from_groups, solve_plan, threshold_from_quantile
from gw.stability import bootstrap_indices, solve_stable_plan
from infra.storage import Store
from workers.extract import FeatureRef, read_features


def distance_matrix(store: Store, key: str, ids: Sequence[str]) -> np.ndarray:
    """The symmetric matrix (diagonal 0) of a long-form distances table."""
    index = {i: n for n, i in enumerate(ids)}
    matrix = np.zeros((len(ids), len(ids)))
    for row in store.read_table(key, columns=["a", "b", "value"]).to_pylist():
        matrix[index[row["a"]], index[row["b"]]] = matrix[index[row["b"]], index[row["a"]]] = row["value"]
    return matrix


def bootstrap_matrices(store: Store, refs: Mapping[str, FeatureRef], n_resamples: int, *, seed: int = 0,
                       solver: str = "entropic") -> list[np.ndarray]:
    """GW matrices recomputed on bootstrap resamples of each scorer's responses (for plan stability)."""
    clouds = {i: read_features(store, ref)[1] for i, ref in sorted(refs.items())}
    draws = {i: bootstrap_indices(len(x), n_resamples, seed=seed + n) for n, (i, x) in enumerate(clouds.items())}
    return [gw_matrix({i: clouds[i][draws[i][r]] for i in clouds}, solver=solver).values for r in range(n_resamples)]


def plan_fleet(matrix: np.ndarray, ids: Sequence[str], *, tau: float | None, tau_quantile: float, k: int,
               planner: str = "gw", measured: Mapping[tuple[str, str], float] | None = None,
               resampled: Sequence[np.ndarray] = (), min_stability: float = 0.0) -> Plan:
    """The plan of one planner (flows.config.PLANNERS) from `matrix` (the GW distances; for
    "description", the descriptions' distances, workers.signals) and, for "measured", the trial merges'
    outcomes (`measured`, {(a, b): worse member's signal}).

    "gw": set packing on the GW distances under tau. "description": the same set packing on the
    descriptions' distances (NaN for a scorer without one: never grouped); tau and its quantile are then
    on that scale. "measured": the same set packing on ``1 − outcome`` of the measured pairs (unmeasured
    pairs never share a group), tau on that scale. "linkage": the GW-SMM paper's average linkage on the
    GW distances, capped at k and stopped at tau."""
    if planner == "measured":
        if measured is None:
            raise ValueError("the measured planner needs the trial merges' outcomes")
        if resampled:
            raise ValueError("bootstrap stability is a GW plan's check; the measured planner has no resamples")
        return solve_plan(outcome_distances(measured, ids), list(ids), tau=tau, tau_quantile=tau_quantile, k=k)
    if planner == "linkage":
        threshold = tau if tau is not None else threshold_from_quantile(matrix, tau_quantile)
        return linkage_plan(matrix, list(ids), None, k=k, tau=threshold)
    if planner not in ("gw", "description"):
        raise ValueError(f"planner must be 'measured', 'gw', 'description' or 'linkage', got {planner!r}")
    if resampled:
        if planner != "gw":
            raise ValueError("bootstrap stability is a GW plan's check: it resamples the GW features")
        return solve_stable_plan(matrix, list(resampled), list(ids), min_stability=min_stability, tau=tau,
                                 tau_quantile=tau_quantile, k=k)
    return solve_plan(matrix, list(ids), tau=tau, tau_quantile=tau_quantile, k=k)


def check_planned_groups(plan: Plan, ids: Sequence[str], measured: Mapping[tuple[str, str], float],
                         group_outcomes: Mapping[tuple[str, ...], float]) -> tuple[Plan, dict]:
    """The measured plan after each planned group of 3+ is checked by its own trial merge
    (`gw.mergeability.split_weak_groups`); returns (the plan, {"+"-joined split group: the pair kept})."""
    groups, split = split_weak_groups(plan.groups, group_outcomes, measured, plan.tau)
    if not split:
        return plan, {}
    checked = plan_from_groups(groups, list(ids), f"{plan.method}+group-check", D=outcome_distances(measured, ids),
                               tau=plan.tau)
    return checked, {"+".join(g): list(p) if p else None for g, p in split.items()}
