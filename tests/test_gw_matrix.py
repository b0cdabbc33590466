"""The fleet's GW matrix: symmetry, families, caching, skipping by lower bounds (gw/matrix.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gw.matrix as gm
from gw.clouds import feature_key, prepare
from gw.entropic import EntropicOptions
from gw.matrix import gw_matrix, pair_cache_key, quantile_cutoff, solver_config
from gw.plan import solve_plan
from gw.solvers import gw_pair
from gw.synthetic import planted_fleet


@pytest.fixture(scope="module")
def fleet():
    return planted_fleet(n_families=4, models_per_family=3, n_points=48, dim=32, seed=11)


@pytest.fixture(scope="module")
def full(fleet):
    return gw_matrix(fleet.features)


@pytest.fixture
def count_pairs(monkeypatch):
    """Counts the pairs handed to the entropic solver by gw_matrix."""
    calls = []
    real = gm.entropic_gw_batch

    def counting(pairs, options=None, **kw):
        calls.extend((a.key, b.key) for a, b in pairs)
        return real(pairs, options, **kw)

    monkeypatch.setattr(gm, "entropic_gw_batch", counting)
    return calls


def test_matrix_is_symmetric_with_zero_diagonal(full, fleet):
    n = len(fleet.ids)
    assert full.ids == tuple(sorted(fleet.ids))
    assert full.values.shape == (n, n)
    assert np.array_equal(full.values, full.values.T)
    assert np.all(np.diag(full.values) == 0) and np.all(np.isfinite(full.values))
    assert len(full.results) == n * (n - 1) // 2 == full.n_computed
    assert not full.skipped and full.tau is None


def test_matrix_entries_match_single_pairs(full, fleet):
    a = prepare(fleet.features["f0_m0"], device="cpu")
    b = prepare(fleet.features["f2_m1"], device="cpu")
    # solved in a canonical order (by content key), so bit for bit one of the two orders
    assert full.value("f0_m0", "f2_m1") in (gw_pair(a, b).value, gw_pair(b, a).value)
    assert full.value("f0_m0", "f2_m1") == pytest.approx(gw_pair(a, b).value, rel=1e-3)
    assert full.value("f2_m1", "f0_m0") == full.value("f0_m0", "f2_m1")


def test_planted_families_are_nearest_neighbours(full, fleet):
    D = full.values + np.diag(np.full(len(full.ids), np.inf))
    for i, model in enumerate(full.ids):
        nearest = full.ids[int(np.argmin(D[i]))]
        assert fleet.family[nearest] == fleet.family[model], model


def test_plan_groups_the_planted_families(full, fleet):
    plan = solve_plan(full.values, full.ids, tau_quantile=0.25)
    expected = {tuple(sorted(fleet.members(f))) for f in range(4)}
    assert set(plan.groups) == expected


def test_records_are_long_form(full):
    rows = full.to_records()
    assert len(rows) == full.n_pairs
    assert {"a", "b", "value", "skipped", "solver", "iterations", "converged", "marginal_error"} <= set(rows[0])
    assert all(r["a"] < r["b"] for r in rows)


# ---------------------------------------------------------------------------------------------
# Caching
# ---------------------------------------------------------------------------------------------


def test_cache_reuses_pairs_and_recomputes_only_what_changed(fleet, count_pairs):
    features = dict(list(fleet.features.items())[:6])
    n = len(features)
    cache: dict = {}
    first = gw_matrix(features, cache=cache)
    assert len(count_pairs) == n * (n - 1) // 2 == len(cache)

    count_pairs.clear()
    again = gw_matrix(features, cache=cache)
    assert count_pairs == [] and again.n_cached == len(cache)
    assert np.array_equal(again.values, first.values)

    count_pairs.clear()
    changed = dict(features)
    changed["f0_m0"] = features["f0_m0"] * 1.5 + 1.0  # new content, same GW up to rounding
    gw_matrix(changed, cache=cache)
    new_key = feature_key(changed["f0_m0"])
    assert len(count_pairs) == n - 1
    assert all(new_key in pair for pair in count_pairs)

    count_pairs.clear()
    grown = dict(changed)
    grown["f3_m0"] = fleet.features["f3_m0"]
    gw_matrix(grown, cache=cache)
    assert len(count_pairs) == n  # one new scorer against the n others


def test_caller_keys_drive_the_cache(fleet, count_pairs):
    features = dict(list(fleet.features.items())[:4])
    keys = {i: f"sha-{i}" for i in features}
    cache: dict = {}
    gw_matrix(features, cache=cache, keys=keys)
    count_pairs.clear()
    reordered = {i: features[i] for i in reversed(list(features))}
    result = gw_matrix(reordered, cache=cache, keys=keys)
    assert count_pairs == [] and result.keys == keys


def test_cache_key_is_order_free_and_setting_sensitive():
    config = solver_config("entropic", None, "mean", np.float32)
    assert pair_cache_key("a", "b", config) == pair_cache_key("b", "a", config)
    assert pair_cache_key("a", "b", config) != pair_cache_key("a", "c", config)
    other = solver_config("entropic", EntropicOptions(epsilon=0.05), "mean", np.float32)
    assert pair_cache_key("a", "b", config) != pair_cache_key("a", "b", other)
    assert pair_cache_key("a", "b", config) != pair_cache_key("a", "b", solver_config("exact", None, "mean", np.float32))


# ---------------------------------------------------------------------------------------------
# Skipping by lower bounds
# ---------------------------------------------------------------------------------------------


def test_explicit_tau_skips_only_pairs_whose_bound_reaches_it(fleet, full):
    upper = full.values[np.triu_indices(len(full.ids), 1)]
    tau = float(np.quantile(upper, 0.3))
    skipped = gw_matrix(fleet.features, skip_tau=tau)
    assert skipped.tau == tau and skipped.skipped
    for a, b in skipped.skipped:
        i, j = skipped.ids.index(a), skipped.ids.index(b)
        assert skipped.bounds[i, j] >= tau
        assert skipped.values[i, j] == skipped.bounds[i, j] <= full.values[i, j] + 1e-6
    for (a, b), res in skipped.results.items():
        assert res.value == full.value(a, b)
    with_skip = solve_plan(skipped.values, skipped.ids, tau=tau)
    without = solve_plan(full.values, full.ids, tau=tau)
    assert with_skip.groups == without.groups


@pytest.mark.parametrize("third_bound", [False, True])
def test_quantile_tau_is_exact_and_the_plan_unchanged(fleet, full, third_bound):
    q = 0.25
    skipped = gw_matrix(fleet.features, skip_tau_quantile=q, third_bound=third_bound)
    upper = full.values[np.triu_indices(len(full.ids), 1)]
    assert skipped.tau == pytest.approx(float(np.quantile(upper, q)), rel=1e-12)
    assert 0 < skipped.skipped_fraction < 1
    for a, b in skipped.skipped:  # every skipped pair lies at or above tau
        assert full.value(a, b) >= skipped.tau
    assert solve_plan(skipped.values, skipped.ids, tau_quantile=q).groups == \
        solve_plan(full.values, full.ids, tau_quantile=q).groups
    assert solve_plan(skipped.values, skipped.ids, tau=skipped.tau).groups == \
        solve_plan(full.values, full.ids, tau_quantile=q).groups


def test_quantile_cutoff():
    assert quantile_cutoff([], 10, 0.5) == math.inf
    assert quantile_cutoff([3.0, 1.0, 2.0], 5, 0.5) == 3.0  # rank ceil(0.5 * 4) = 2
    assert quantile_cutoff([3.0, 1.0], 5, 0.5) == math.inf
    assert quantile_cutoff([1.0, 2.0], 2, 0.0) == 1.0


def test_progress_reports_every_pair(fleet):
    seen = []
    features = dict(list(fleet.features.items())[:4])
    gw_matrix(features, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (6, 6)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_exact_solver_matrix(fleet):
    features = dict(list(fleet.features.items())[:3])
    exact = gw_matrix(features, solver="exact")
    assert exact.solver == "exact"
    assert all(r.solver == "exact" for r in exact.results.values())


def test_bad_inputs_name_the_scorer(fleet):
    features = dict(list(fleet.features.items())[:3])
    features["broken"] = np.full((5, 32), np.nan)
    with pytest.raises(ValueError, match="broken"):
        gw_matrix(features)
    with pytest.raises(ValueError, match="not both"):
        gw_matrix(fleet.features, skip_tau=0.1, skip_tau_quantile=0.25)
    with pytest.raises(ValueError, match="solver"):
        gw_matrix(fleet.features, solver="nope")


def test_schedule_cutoff_is_quantile_cutoff_as_values_arrive():
    from gw.schedule import BoundSchedule

    rng = np.random.default_rng(0)
    values = rng.random(40)
    for q in (0.0, 0.25, 0.9, 1.0):
        schedule = BoundSchedule([], 50, values[:3], skip_tau_quantile=q)
        for n in range(3, 41):
            assert schedule.cutoff == quantile_cutoff(values[:n], 50, q)
            schedule.add(values[n:n + 1])


def test_schedule_batches_in_bound_order_and_third_bounds_skip():
    from gw.schedule import TLB_REACH, BoundSchedule

    bounds = {(0, 1): 0.3, (0, 2): 0.1, (1, 2): 0.2, (0, 3): 0.05, (1, 3): 0.9}
    schedule = BoundSchedule(list(bounds), 6, [0.5], bounds=bounds, skip_tau=0.25, third_bound=True)
    batch = schedule.next_batch(2)
    assert set(schedule.skipped) == {(0, 1), (1, 3)}  # second bound reaches tau
    assert batch.pairs == ((0, 3), (0, 2)) and batch.cutoff == 0.25
    assert batch.tighten == tuple(p for p in batch.pairs if bounds[p] * TLB_REACH >= 0.25) == ((0, 2),)
    assert schedule.settle(batch, {(0, 2): 0.4}) == [(0, 3)]
    assert schedule.skipped[(0, 2)] == schedule.bounds[(0, 2)] == 0.4
    assert schedule.next_batch(2).pairs == ((1, 2),) and len(schedule) == 0
    without = BoundSchedule(list(bounds), 6)  # no skipping: the given order, nothing skipped
    assert without.next_batch(10).pairs == tuple(bounds) and not without.skipped
