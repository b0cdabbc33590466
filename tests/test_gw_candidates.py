"""The shortlist: a k-nearest candidate graph by the SLB, GW on its edges, the plan on it (gw/candidates.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gw.candidates import (CandidateGraph, candidate_graph, completed_tau, shortlist_gw, shortlist_tau,
                           sparse_distances)
from gw.matrix import gw_matrix
from gw.plan import solve_plan
from gw.synthetic import planted_fleet


def _random_bounds(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    B = rng.random((n, n))
    B = (B + B.T) / 2
    np.fill_diagonal(B, 0.0)
    return B


@pytest.mark.parametrize("n,m", [(2, 1), (7, 1), (12, 3), (30, 5), (9, 8), (9, 20)])
def test_every_scorer_gets_its_m_nearest_by_the_bound_and_nothing_else(n, m):
    B = _random_bounds(n, seed=n * 100 + m)
    ids = [f"s{i:02d}" for i in range(n)]
    graph = candidate_graph(B, ids, m)
    mask = graph.mask
    assert (mask == mask.T).all() and not mask.diagonal().any()
    assert len(graph.pairs) <= m * n
    assert list(graph.pairs) == sorted(set(graph.pairs)) and all(i < j for i, j in graph.pairs)
    nearest = {i: set(np.argsort(np.where(np.eye(n, dtype=bool)[i], np.inf, B[i]))[:m]) for i in range(n)}
    for i, j in itertools.combinations(range(n), 2):
        # a candidate exactly when one end names the other among its m nearest
        assert mask[i, j] == (j in nearest[i] or i in nearest[j])
    if m >= n - 1:
        assert len(graph.pairs) == n * (n - 1) // 2


def test_a_hand_checked_line():
    # four scorers at 0, 1, 3, 10 on a line, bound = distance, m = 1
    x = np.array([0.0, 1.0, 3.0, 10.0])
    B = np.abs(x[:, None] - x[None, :])
    graph = candidate_graph(B, ["a", "b", "c", "d"], 1)
    assert graph.pairs == ((0, 1), (1, 2), (2, 3))  # a-b, b-a, c-b (2 < 7), d-c
    D = sparse_distances(graph, {(0, 1): 1.5, (1, 2): 2.5, (2, 3): 9.5})
    assert np.isnan(D[0, 2]) and np.isnan(D[3, 1]) and D[1, 0] == 1.5 and D[0, 0] == 0.0
    # completed: candidates 1.5, 2.5, 9.5; bounds a-c 3, a-d 10, b-d 9
    assert completed_tau(graph, D, 1.0) == 10.0
    assert completed_tau(graph, D, 0.5) == pytest.approx(6.0)
    assert completed_tau(graph, D, 0.0) == 1.5
    # from the candidates, the others farther than all of them: 1.5, 2.5, 9.5, inf, inf, inf
    assert shortlist_tau(graph, D, 0.2) == 2.5  # rank 1
    assert shortlist_tau(graph, D, 0.3) == pytest.approx(6.0)  # halfway between ranks 1 and 2
    assert shortlist_tau(graph, D, 0.5) == completed_tau(graph, D, 0.5)  # rank 3 is past the candidates


def test_ties_go_to_the_earlier_id():
    B = np.ones((4, 4)) - np.eye(4)
    graph = candidate_graph(B, ["w", "x", "y", "z"], 1)
    assert graph.pairs == ((0, 1), (0, 2), (0, 3))


@pytest.mark.parametrize("seed", range(5))
def test_the_thresholds_bracket_the_full_matrix_tau_and_hit_it_when_the_close_pairs_are_candidates(seed):
    n = 15
    rng = np.random.default_rng(seed)
    B = _random_bounds(n, seed)
    extra = rng.random((n, n))
    full = B + (extra + extra.T) / 4  # true values sit above their bounds
    np.fill_diagonal(full, 0.0)
    graph = candidate_graph(B, [f"s{i}" for i in range(n)], 3)
    sparse = np.where(graph.mask, full, np.nan)
    np.fill_diagonal(sparse, 0.0)
    upper = full[np.triu_indices(n, k=1)]
    in_graph = graph.mask[np.triu_indices(n, k=1)]
    order = np.argsort(upper)
    checked = 0
    for q in np.linspace(0.0, 1.0, 41):
        tau = np.quantile(upper, q)
        assert completed_tau(graph, sparse, q) <= tau + 1e-12
        hi = int(np.ceil(q * (upper.size - 1)))
        if hi < in_graph.sum():
            assert shortlist_tau(graph, sparse, q) >= tau - 1e-12
        if in_graph[order[:hi + 1]].all():  # every pair up to the rank is a candidate: exact
            assert shortlist_tau(graph, sparse, q) == pytest.approx(tau, rel=0, abs=1e-12)
            checked += 1
    assert checked >= 1


def test_bad_inputs_are_refused():
    B = _random_bounds(4, 0)
    with pytest.raises(ValueError, match="m must be"):
        candidate_graph(B, list("abcd"), 0)
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        candidate_graph(B, list("abc"), 1)
    skew = B.copy()
    skew[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        candidate_graph(skew, list("abcd"), 1)
    graph = candidate_graph(B, list("abcd"), 1)
    with pytest.raises(ValueError, match="no value"):
        sparse_distances(graph, {})
    with pytest.raises(ValueError, match="quantile"):
        completed_tau(graph, np.zeros((4, 4)), 1.5)
    with pytest.raises(ValueError, match="quantile"):
        shortlist_tau(graph, np.zeros((4, 4)), -0.1)
    with pytest.raises(ValueError, match="finite"):
        shortlist_tau(graph, np.full((4, 4), np.nan), 0.5)


# --------------------------------------------------------------------------------------------------
# On a small planted fleet, against the full matrix
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet():
    return planted_fleet(n_families=4, models_per_family=3, n_points=48, dim=32, seed=11)


@pytest.fixture(scope="module")
def full(fleet):
    return gw_matrix(fleet.features)


def test_candidates_hold_the_families_and_their_values_are_the_full_matrix_values(fleet, full):
    cache: dict = {}
    short = shortlist_gw(fleet.features, 2, cache=cache)
    assert short.ids == full.ids
    mask = short.graph.mask
    assert short.n_computed == len(short.graph.pairs) == len(cache) and short.n_cached == 0
    assert len(short.graph.pairs) < full.n_pairs
    # the SLB ranks a scorer's family first: each family's three pairs are candidates
    for f in range(4):
        members = [short.ids.index(i) for i in fleet.members(f)]
        assert all(mask[a, b] for a, b in itertools.combinations(members, 2))
    # the same solver, the same canonical order: bit for bit the full matrix's values
    np.testing.assert_array_equal(short.values[mask], full.values[mask])
    assert np.isnan(short.values[~mask & ~np.eye(len(short.ids), dtype=bool)]).all()
    # the bounds are lower bounds
    assert (short.graph.bounds <= full.values + 1e-4).all()
    # a rerun reads everything from the cache; gw_matrix reads the same entries
    again = shortlist_gw(fleet.features, 2, cache=cache)
    assert again.n_computed == 0 and again.n_cached == len(short.graph.pairs)
    assert gw_matrix(fleet.features, cache=dict(cache)).n_cached == len(short.graph.pairs)


def test_the_shortlist_plan_never_groups_a_non_candidate_and_finds_the_families(fleet, full):
    short = shortlist_gw(fleet.features, 2)
    upper = full.values[np.triu_indices(len(full.ids), k=1)]
    # the 12 family pairs are the 12 closest of 66 and all candidates: a 0.1-quantile tau is exact
    assert shortlist_tau(short.graph, short.values, 0.1) == pytest.approx(np.quantile(upper, 0.1), abs=1e-12)
    for q in (0.1, 1.0):
        tau = shortlist_tau(short.graph, short.values, q)
        plan = solve_plan(short.values, short.ids, tau=tau, k=3)
        mask = short.graph.mask
        for group in plan.groups:
            index = [short.ids.index(g) for g in group]
            assert all(mask[a, b] for a, b in itertools.combinations(index, 2))
    planted = {tuple(sorted(fleet.members(f))) for f in range(4)}
    assert set(plan.groups) == planted


def test_a_graph_of_one_partner_keeps_plans_inside_it():
    # m = 1 on two far pairs and a loner: only nearest pairs are candidates, so the plan is those pairs
    x = np.array([0.0, 0.1, 5.0, 5.2, 20.0])
    B = np.abs(x[:, None] - x[None, :])
    ids = list("abcde")
    graph = candidate_graph(B, ids, 1)
    assert graph.pairs == ((0, 1), (2, 3), (3, 4))
    D = sparse_distances(graph, {p: B[p] * 1.5 for p in graph.pairs})
    plan = solve_plan(D, ids, tau=shortlist_tau(graph, D, 1.0), k=3)
    assert plan.groups == (("a", "b"), ("c", "d"))
    assert isinstance(graph, CandidateGraph) and graph.m == 1
