"""Exact solvers on units: maximum-weight matching (k = 2) and set packing by MILP over candidate cliques."""

from __future__ import annotations

from typing import Any

import numpy as np

from .problem import _Problem

# Weights of the matching are scaled to integers below this bound (networkx's blossom algorithm is
# exact on integers; floats may cost a slightly suboptimal matching).
_MATCHING_INT_SCALE = 2**40


def _solve_matching(problem: _Problem) -> list[list[int]]:
    import networkx as nx

    n_units = len(problem.units)
    free = [u for u in range(n_units) if problem.unit_size[u] == 1]
    graph = nx.Graph()
    graph.add_nodes_from(free)
    free_arr = np.array(free, dtype=np.int64)
    if free_arr.size:
        sub_allowed = problem.unit_allowed[np.ix_(free_arr, free_arr)]
        sub_weight = problem.unit_weight[np.ix_(free_arr, free_arr)]
        positive = sub_weight[sub_allowed]
        scale = _MATCHING_INT_SCALE / float(positive.max()) if positive.size else 1.0
        for x, y in zip(*np.nonzero(np.triu(sub_allowed, 1))):
            graph.add_edge(int(free_arr[x]), int(free_arr[y]), weight=max(1, int(round(sub_weight[x, y] * scale))))
    # Blossom costs O(V^3); components are independent, so solve each alone.
    matching: set[tuple[int, int]] = set()
    for component in nx.connected_components(graph):
        if len(component) >= 2:
            matching |= nx.max_weight_matching(graph.subgraph(component), maxcardinality=False, weight="weight")
    matched = {u for edge in matching for u in edge}
    groups = [sorted(edge) for edge in matching]
    groups += [[u] for u in range(n_units) if u not in matched]
    return groups


def _enumerate_candidates(problem: _Problem, limit: int) -> list[tuple[int, ...]] | None:
    """Every clique of units whose sizes sum to 2..k, or ``None`` once there are more than ``limit``."""
    k = problem.k
    sizes = problem.unit_size
    allowed = problem.unit_allowed
    neighbours = [np.flatnonzero(allowed[u]) for u in range(len(problem.units))]
    candidates: list[tuple[int, ...]] = []

    def extend(clique: tuple[int, ...], common: np.ndarray, size: int) -> bool:
        for v in common:
            v = int(v)
            if size + sizes[v] > k:
                continue
            grown = clique + (v,)
            candidates.append(grown)
            if len(candidates) > limit:
                return False
            later = common[common > v]
            later = later[allowed[v, later]]
            if later.size and not extend(grown, later, size + int(sizes[v])):
                return False
        return True

    for u in range(len(problem.units)):
        if sizes[u] >= 2:
            candidates.append((u,))  # a pinned component may stay as it is
        later = neighbours[u][neighbours[u] > u]
        if not extend((u,), later, int(sizes[u])):
            return None
        if len(candidates) > limit:
            return None
    return candidates


def _solve_milp(
    problem: _Problem, candidates: list[tuple[int, ...]], time_limit: float | None
) -> tuple[list[list[int]], bool]:
    """Exact set packing over ``candidates``; returns the groups and whether optimality was proven."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    n_units = len(problem.units)
    if not candidates:
        return [[u] for u in range(n_units)], True
    weights = np.array(
        [sum(problem.unit_weight[a, b] for i, a in enumerate(c) for b in c[i + 1 :]) for c in candidates]
    )
    rows = [u for c in candidates for u in c]
    cols = [j for j, c in enumerate(candidates) for _ in c]
    A = csr_array((np.ones(len(rows)), (rows, cols)), shape=(n_units, len(candidates)))
    # Pinned components must be covered exactly once; everybody else at most once.
    lower = (problem.unit_size >= 2).astype(np.float64)
    options: dict[str, Any] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    result = milp(
        c=-weights,
        integrality=np.ones(len(candidates)),
        bounds=Bounds(0, 1),
        constraints=LinearConstraint(A, lower, np.ones(n_units)),
        options=options,
    )
    if result.x is None:
        return [], False
    chosen = [candidates[j] for j in np.flatnonzero(result.x > 0.5)]
    covered = {u for c in chosen for u in c}
    groups = [list(c) for c in chosen] + [[u] for u in range(n_units) if u not in covered]
    return groups, bool(result.status == 0)
