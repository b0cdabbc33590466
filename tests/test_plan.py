"""The merge-plan solver (gw/plan/) and plan stability (gw/stability.py)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from gw.plan import (
    Plan,
    plan_from_groups,
    plan_objective,
    plan_violations,
    solve_plan,
    threshold_from_quantile,
)
from gw.stability import (
    apply_min_stability,
    bootstrap_indices,
    group_stability,
    solve_stable_plan,
    with_stability,
)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def random_distances(rng: np.random.Generator, n: int, nan_share: float = 0.0) -> np.ndarray:
    X = rng.random((n, n))
    D = (X + X.T) / 2
    if nan_share:
        mask = np.triu(rng.random((n, n)) < nan_share, 1)
        D[mask | mask.T] = np.nan
    np.fill_diagonal(D, 0.0)
    return D


def clustered_distances(rng: np.random.Generator, n: int, dim: int = 6) -> np.ndarray:
    centres = rng.normal(size=(max(2, n // 3), dim))
    X = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, dim))
    return np.linalg.norm(X[:, None] - X[None], axis=-1)


def ids_for(n: int) -> list[str]:
    return [f"item-{i:02d}" for i in range(n)]


def set_partitions(items: list[int], k: int):
    """Every partition of items into blocks of size <= k."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for size in range(0, min(k, len(items)) ):
        for mates in itertools.combinations(rest, size):
            remaining = [i for i in rest if i not in mates]
            for tail in set_partitions(remaining, k):
                yield [[first, *mates], *tail]


def brute_force_best(D, tau, k) -> float:
    """Best objective over all partitions into valid groups, by enumeration."""
    n = len(D)
    best = -math.inf
    for partition in set_partitions(list(range(n)), k):
        value, valid = 0.0, True
        for block in partition:
            for a, b in itertools.combinations(block, 2):
                if np.isfinite(D[a, b]) and D[a, b] < tau:
                    value += tau - D[a, b]
                else:
                    valid = False
                    break
            if not valid:
                break
        if valid:
            best = max(best, value)
    return best


def assert_valid(plan: Plan, D, ids, **rules) -> None:
    problems = plan_violations(plan, D, ids, **rules)
    assert problems == [], problems


# --------------------------------------------------------------------------------------------------
# Exactness against brute force
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_exact_solver_equals_brute_force(k):
    rng = np.random.default_rng(100 + k)
    for trial in range(40):
        n = int(rng.integers(2, 10)) if trial % 4 == 0 else int(rng.integers(2, 8))
        D = random_distances(rng, n, nan_share=0.15 if trial % 3 == 0 else 0.0)
        ids = ids_for(n)
        tau = float(rng.uniform(0.2, 0.8))
        plan = solve_plan(D, ids, tau=tau, k=k)
        assert plan.method == ("matching" if k == 2 else "milp")
        expected = brute_force_best(D, tau, k)
        assert plan.objective == pytest.approx(expected, abs=1e-9), (trial, n)
        assert plan.objective == pytest.approx(plan_objective(plan.groups, D, ids, tau))
        assert_valid(plan, D, ids, tau=tau, k=k)


def test_milp_handles_k_4_exactly():
    rng = np.random.default_rng(7)
    for _ in range(8):
        n = int(rng.integers(4, 9))
        D = clustered_distances(rng, n)
        ids = ids_for(n)
        tau = threshold_from_quantile(D, 0.5)
        plan = solve_plan(D, ids, tau=tau, k=4)
        assert plan.objective == pytest.approx(brute_force_best(D, tau, 4), abs=1e-9)
        assert max((len(g) for g in plan.groups), default=0) <= 4


# --------------------------------------------------------------------------------------------------
# Greedy + local search
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3])
def test_greedy_is_valid_and_close_to_exact_on_30(k):
    rng = np.random.default_rng(300 + k)
    ratios = []
    for trial in range(6):
        D = clustered_distances(rng, 30) if trial % 2 else random_distances(rng, 30)
        ids = ids_for(30)
        exact = solve_plan(D, ids, k=k)
        greedy = solve_plan(D, ids, k=k, method="greedy")
        assert greedy.method == "greedy+local"
        assert greedy.tau == exact.tau
        assert_valid(greedy, D, ids, tau=greedy.tau, k=k)
        assert greedy.objective <= exact.objective + 1e-9
        ratios.append(greedy.objective / exact.objective)
    assert min(ratios) >= 0.9, ratios
    assert np.mean(ratios) >= 0.97, ratios


def test_candidate_limit_switches_to_greedy():
    rng = np.random.default_rng(4)
    D = random_distances(rng, 20)
    ids = ids_for(20)
    plan = solve_plan(D, ids, k=3, max_candidates=5)
    assert plan.method == "greedy+local"
    assert_valid(plan, D, ids, tau=plan.tau, k=3)
    with pytest.raises(ValueError, match="max_candidates"):
        solve_plan(D, ids, k=3, max_candidates=5, method="milp")


def test_milp_time_limit_falls_back_to_the_better_heuristic(monkeypatch):
    import gw.plan.solve as plan_module  # solve_plan calls the MILP from there

    rng = np.random.default_rng(6)
    D = clustered_distances(rng, 15)
    ids = ids_for(15)
    exact = solve_plan(D, ids, k=3)
    # HiGHS stopped early with a poor incumbent (nothing grouped): the heuristic's plan wins.
    def stopped_early(problem, candidates, time_limit):
        return [[u] for u in range(len(problem.units))], False

    monkeypatch.setattr(plan_module, "_solve_milp", stopped_early)
    fallback = solve_plan(D, ids, k=3)
    assert fallback.method == "milp(time-limit)"
    assert fallback.objective > 0.9 * exact.objective
    assert_valid(fallback, D, ids, tau=fallback.tau, k=3)


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------


def test_quantile_tau_and_threshold_respected():
    rng = np.random.default_rng(8)
    n = 12
    D = random_distances(rng, n, nan_share=0.1)
    ids = ids_for(n)
    upper = D[np.triu_indices(n, 1)]
    for q in (0.1, 0.25, 0.6):
        plan = solve_plan(D, ids, tau_quantile=q)
        assert plan.tau == pytest.approx(np.quantile(upper[np.isfinite(upper)], q))
        position = {s: i for i, s in enumerate(ids)}
        for group in plan.groups:
            for a, b in itertools.combinations(group, 2):
                assert D[position[a], position[b]] < plan.tau
    explicit = solve_plan(D, ids, tau=0.3, tau_quantile=0.9)
    assert explicit.tau == 0.3
    with pytest.raises(ValueError, match="tau_quantile"):
        solve_plan(D, ids, tau_quantile=1.5)


def test_unknown_distances_are_never_grouped():
    n = 6
    ids = ids_for(n)
    D = np.full((n, n), np.nan)
    D[0, 1] = D[1, 0] = np.inf
    np.fill_diagonal(D, 0.0)
    D[2, 3] = D[3, 2] = 0.1
    plan = solve_plan(D, ids, tau=1.0, k=3)
    assert plan.groups == ((ids[2], ids[3]),)
    everything_unknown = np.full((n, n), np.nan)
    plan = solve_plan(everything_unknown, ids)
    assert plan.groups == () and plan.singletons == tuple(ids) and plan.tau is None


def test_tiny_inputs():
    assert solve_plan(np.zeros((0, 0)), [], tau=1.0).ids == ()
    one = solve_plan(np.zeros((1, 1)), ["a"], tau=1.0)
    assert one.groups == () and one.singletons == ("a",)


@pytest.mark.parametrize(
    "D, ids, kwargs, message",
    [
        (np.zeros((2, 3)), ["a", "b"], {}, "square"),
        (np.zeros((3, 3)), ["a", "b"], {}, "3 ids|2 ids"),
        (np.array([[0, 1.0], [2.0, 0]]), ["a", "b"], {}, "not symmetric"),
        (np.array([[0, -1.0], [-1.0, 0]]), ["a", "b"], {}, "negative"),
        (np.zeros((2, 2)), ["a", "a"], {}, "duplicates"),
        (np.zeros((2, 2)), ["a", "b"], {"k": 1}, "k must"),
        (np.zeros((2, 2)), ["a", "b"], {"method": "magic"}, "method"),
        (np.zeros((2, 2)), ["a", "b"], {"k": 3, "method": "matching"}, "k=2"),
        (np.zeros((2, 2)), ["a", "b"], {"tau": float("nan")}, "NaN"),
    ],
)
def test_clear_errors(D, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        solve_plan(D, ids, **kwargs)


def test_solver_is_deterministic():
    rng = np.random.default_rng(9)
    D = clustered_distances(rng, 40)
    ids = ids_for(40)
    for method in ("auto", "greedy"):
        assert solve_plan(D, ids, method=method) == solve_plan(D, ids, method=method)


# --------------------------------------------------------------------------------------------------
# The Plan object
# --------------------------------------------------------------------------------------------------


def test_plan_normalises_and_round_trips_through_json():
    plan = Plan(
        groups=(("c", "a"), ("e", "d", "b")),
        singletons=("g", "f"),
        method="milp",
        tau=np.float64(0.5),
        objective=np.float32(1.25),
        stability={("a", "c"): 0.75, ("b", "e", "d"): 1.0},
    )
    assert plan.groups == (("a", "c"), ("b", "d", "e"))
    assert plan.singletons == ("f", "g")
    assert plan.ids == tuple("abcdefg")
    assert plan.group_of("d") == ("b", "d", "e") and plan.group_of("f") == ("f",)
    text = json.dumps(plan.to_dict())
    again = Plan.from_dict(json.loads(text))
    assert again == plan
    assert again.stability == {("a", "c"): 0.75, ("b", "d", "e"): 1.0}
    solved = solve_plan(clustered_distances(np.random.default_rng(1), 9), ids_for(9))
    assert Plan.from_dict(json.loads(json.dumps(solved.to_dict()))) == solved


def test_plan_rejects_inconsistent_contents():
    with pytest.raises(ValueError, match="more than once"):
        Plan(groups=(("a", "b"),), singletons=("a",), method="x")
    with pytest.raises(ValueError, match="fewer than 2"):
        Plan(groups=(("a",),), singletons=(), method="x")
    with pytest.raises(ValueError, match="not in the plan"):
        Plan(groups=(("a", "b"),), singletons=(), method="x", stability={("a", "c"): 1.0})
    with pytest.raises(ValueError, match="lacks keys"):
        Plan.from_dict({"groups": []})
    with pytest.raises(ValueError, match="not among the ids"):
        plan_from_groups([("a", "z")], ["a", "b"], "given")


# --------------------------------------------------------------------------------------------------
# Stability
# --------------------------------------------------------------------------------------------------


def test_group_stability_shares_on_a_constructed_example():
    ids = list("abcdef")
    reference = plan_from_groups([("a", "b"), ("c", "d", "e")], ids, "milp")
    resampled = [
        plan_from_groups([("a", "b"), ("c", "d", "e")], ids, "milp"),
        plan_from_groups([("a", "b"), ("c", "d")], ids, "milp"),  # a subset is not the same group
        plan_from_groups([("a", "b", "f"), ("c", "d", "e")], ids, "milp"),  # nor is a superset
        plan_from_groups([("b", "a")], ids, "milp"),
    ]
    shares = group_stability(reference, resampled)
    assert shares == {("a", "b"): 0.75, ("c", "d", "e"): 0.5}
    attached = with_stability(reference, resampled)
    assert attached.stability == shares and attached.groups == reference.groups
    kept = apply_min_stability(attached, 0.6)
    assert kept.groups == (("a", "b"),)
    assert set(kept.singletons) == {"c", "d", "e", "f"}
    assert kept.method == "milp+min-stability"
    assert kept.stability == {("a", "b"): 0.75}
    assert apply_min_stability(attached, 0.5) is attached
    with pytest.raises(ValueError, match="no stability"):
        apply_min_stability(reference, 0.5)
    with pytest.raises(ValueError, match="different ids"):
        group_stability(reference, [plan_from_groups([], ids[:-1], "x")])
    with pytest.raises(ValueError, match="at least one"):
        group_stability(reference, [])


def test_solve_stable_plan_dissolves_unstable_groups():
    ids = ids_for(6)
    D = np.full((6, 6), 0.9)
    D[0, 1] = D[1, 0] = 0.1  # a solid pair
    D[2, 3] = D[3, 2] = 0.4  # a pair that some resamples break up
    np.fill_diagonal(D, 0.0)
    noisy = D.copy()
    noisy[2, 3] = noisy[3, 2] = 0.6
    noisy[2, 4] = noisy[4, 2] = 0.3
    resampled = [D, D, noisy, noisy]
    plan = solve_stable_plan(D, resampled, ids, k=2, tau=0.5)
    assert plan.stability == {(ids[0], ids[1]): 1.0, (ids[2], ids[3]): 0.5}
    strict = solve_stable_plan(D, resampled, ids, k=2, tau=0.5, min_stability=0.75)
    assert strict.groups == ((ids[0], ids[1]),)
    assert strict.objective == pytest.approx(0.4)
    # A quantile threshold is resolved once, on the reference matrix.
    quantile_plan = solve_stable_plan(D, resampled, ids, k=2, tau_quantile=0.2)
    assert quantile_plan.tau == pytest.approx(threshold_from_quantile(D, 0.2))


def test_bootstrap_indices():
    first = bootstrap_indices(100, 5, seed=3)
    assert first.shape == (5, 100) and first.min() >= 0 and first.max() < 100
    np.testing.assert_array_equal(first, bootstrap_indices(100, 5, seed=3))
    assert not np.array_equal(first, bootstrap_indices(100, 5, seed=4))
    assert any(len(np.unique(row)) < 100 for row in first)  # with replacement
    sub = bootstrap_indices(1000, 3, seed=0, size=256, replace=False)
    assert sub.shape == (3, 256)
    assert all(len(np.unique(row)) == 256 for row in sub)
    with pytest.raises(ValueError, match="without replacement"):
        bootstrap_indices(10, 2, size=11, replace=False)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_indices(10, 0)
