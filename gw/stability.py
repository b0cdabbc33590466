"""How stable a plan is under resampling of the responses behind its distances (docs/architecture.md §4.3).

GW distances move with which responses were sampled (sub-sampling kept the coarse ranking but not the
fine ranking inside a family of similar models), so a plan should say how much each group can be
trusted. The caller resamples the responses (:func:`bootstrap_indices`), recomputes the distances,
and re-solves the plan on each resample; the functions here are pure:

* :func:`group_stability`: for each group of the reference plan, the share of resampled plans that
  contain exactly that group.
* :func:`with_stability`: the reference plan with those shares attached.
* :func:`apply_min_stability`: dissolve groups whose stability is below a minimum.
* :func:`solve_stable_plan`: all of it from the distance matrices.

Groups below the minimum are dissolved into singletons rather than re-solved without them: a
re-solve would form new groups whose stability was never measured, while dissolving keeps the
promise that every group in the final plan appeared in at least the minimum share of resamples.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from gw.plan import Plan, plan_objective, solve_plan


def bootstrap_indices(
    n: int, n_resamples: int, seed: int = 0, *, size: int | None = None, replace: bool = True
) -> np.ndarray:
    """[n_resamples, size] row indices into n responses, seeded.

    Default: classic bootstrap (``size = n``, with replacement). ``replace=False`` with ``size < n``
    gives sub-samples without repeats (e.g. 256 of 1,000 responses). Each row is sorted.
    """
    for name, value in (("n", n), ("n_resamples", n_resamples)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    size = n if size is None else size
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not replace and size > n:
        raise ValueError(f"cannot draw {size} of {n} responses without replacement")
    rng = np.random.default_rng(seed)
    rows = [np.sort(rng.choice(n, size=size, replace=replace)) for _ in range(n_resamples)]
    return np.stack(rows).astype(np.int64)


def group_stability(reference: Plan, resampled: Sequence[Plan]) -> dict[tuple[str, ...], float]:
    """For each group of ``reference``, the share of ``resampled`` plans holding exactly that group."""
    resampled = list(resampled)
    if not resampled:
        raise ValueError("group_stability needs at least one resampled plan")
    for i, plan in enumerate(resampled):
        if set(plan.ids) != set(reference.ids):
            diff = sorted(set(plan.ids) ^ set(reference.ids))[:5]
            raise ValueError(f"resampled plan {i} covers different ids from the reference (e.g. {diff})")
    seen = [set(plan.groups) for plan in resampled]
    return {group: sum(group in groups for groups in seen) / len(seen) for group in reference.groups}


def with_stability(reference: Plan, resampled: Sequence[Plan]) -> Plan:
    """``reference`` with :attr:`Plan.stability` filled in from the resampled plans."""
    return dataclasses.replace(reference, stability=group_stability(reference, resampled))


def apply_min_stability(
    plan: Plan,
    min_stability: float,
    *,
    D: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
) -> Plan:
    """Dissolve the groups whose stability is below ``min_stability`` into singletons.

    The plan must carry stability (:func:`with_stability`). If any group is dissolved, the method
    gains a ``+min-stability`` suffix and the objective is recomputed from ``D`` and ``ids`` when
    given (and the plan has a tau), else set to None since it no longer describes the plan.
    """
    if not 0.0 <= min_stability <= 1.0:
        raise ValueError(f"min_stability must be in [0, 1], got {min_stability}")
    if plan.stability is None:
        raise ValueError("the plan carries no stability; attach it with with_stability() first")
    kept = [g for g in plan.groups if plan.stability[g] >= min_stability]
    if len(kept) == len(plan.groups):
        return plan
    dissolved = [m for g in plan.groups if g not in kept for m in g]
    objective = None
    if D is not None and ids is not None and plan.tau is not None:
        objective = plan_objective(kept, D, ids, plan.tau)
    return Plan(
        groups=tuple(kept),
        singletons=plan.singletons + tuple(dissolved),
        method=f"{plan.method}+min-stability",
        tau=plan.tau,
        objective=objective,
        stability={g: plan.stability[g] for g in kept},
    )


def solve_stable_plan(
    D: np.ndarray,
    resampled_D: Sequence[np.ndarray],
    ids: Sequence[str],
    *,
    min_stability: float = 0.0,
    **solve_options: Any,
) -> Plan:
    """Solve the plan on ``D`` and on each resampled matrix; attach stability; apply the minimum.

    Every resample is solved with the reference plan's tau (a quantile threshold is resolved once, on
    ``D``), so the stability measures how the distances move, not how the threshold moves.
    ``solve_options`` go to :func:`gw.plan.solve_plan` (k, method, ...).
    """
    reference = solve_plan(D, ids, **solve_options)
    options: Mapping[str, Any] = {**solve_options, "tau": reference.tau}
    resampled = [solve_plan(R, ids, **options) for R in resampled_D]
    plan = with_stability(reference, resampled)
    return apply_min_stability(plan, min_stability, D=D, ids=ids)
