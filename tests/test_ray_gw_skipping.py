"""Lower-bound skipping in the distributed GW matrix (workers/ray_gw.py) against the full matrix."""
from __future__ import annotations

import numpy as np
import pytest

from gw.bounds import bound_matrix, cost_profile
from gw.clouds import prepare
from gw.matrix import gw_matrix
from gw.plan import solve_plan
from gw.synthetic import planted_fleet
from feature_stores import store_with
from workers.fleet_gw import distance_matrix
from workers.ray_gw import PROFILES_PREFIX, compute_distances, pair_cache_key

Q = 0.25


@pytest.fixture(scope="module")
def fleet():
    return planted_fleet(n_families=4, models_per_family=3, n_points=48, dim=32, seed=11)


def _matrix(store, result):
    return distance_matrix(store, result["key"], result["ids"])


def _skipped_pairs(store, result) -> set[tuple[str, str]]:
    rows = store.read_table(result["key"], columns=["a", "b", "skipped", "solver"]).to_pylist()
    assert all((r["solver"] == "bound") == r["skipped"] for r in rows)
    return {(r["a"], r["b"]) for r in rows if r["skipped"]}


@pytest.fixture(scope="module")
def full(fleet, tmp_path_factory):
    store, refs = store_with(fleet, tmp_path_factory.mktemp("full"))
    result = compute_distances(store, refs, use_ray=False)
    return result, _matrix(store, result)


@pytest.fixture(scope="module")
def bounds(fleet):
    """Bounds computed here, independently of the workers' profile cache."""
    ids = sorted(fleet.features)
    return bound_matrix([cost_profile(prepare(np.array(fleet.features[i]))) for i in ids])


@pytest.mark.parametrize("use_ray", [False, True])
def test_quantile_skipping_keeps_tau_and_plan(request, fleet, full, tmp_path, use_ray):
    if use_ray:
        request.getfixturevalue("ray_local")
    store, refs = store_with(fleet, tmp_path)
    result = compute_distances(store, refs, use_ray=use_ray, skip_tau_quantile=Q, chunk_size=4, max_in_flight=2)
    full_result, D = full
    S = _matrix(store, result)
    ids = result["ids"]
    upper = np.triu_indices(len(ids), 1)
    assert result["tau"] == float(np.quantile(D[upper], Q))
    assert result["skipped"] > 0 and result["computed"] + result["skipped"] == len(upper[0])
    below = D < result["tau"]
    assert np.array_equal(S[below], D[below])  # every pair below tau is computed, bit for bit
    assert solve_plan(S, ids, tau_quantile=Q).groups == solve_plan(D, ids, tau_quantile=Q).groups
    assert solve_plan(S, ids, tau=result["tau"]).groups == solve_plan(D, ids, tau_quantile=Q).groups
    for a, b in _skipped_pairs(store, result):
        i, j = ids.index(a), ids.index(b)
        assert D[i, j] >= result["tau"] and S[i, j] <= D[i, j] + 1e-6


def test_explicit_tau_skips_exactly_the_pairs_whose_bound_reaches_it(fleet, full, bounds, tmp_path):
    _, D = full
    ids = sorted(fleet.features)
    tau = float(np.quantile(D[np.triu_indices(len(ids), 1)], 0.3))
    store, refs = store_with(fleet, tmp_path)
    result = compute_distances(store, refs, use_ray=False, skip_tau=tau, third_bound=False)
    expected = {(ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)) if bounds[i, j] >= tau}
    assert expected and _skipped_pairs(store, result) == expected
    assert result["tau"] == tau and result["skipped"] == len(expected)
    S = _matrix(store, result)
    assert np.allclose(S, np.where(bounds >= tau, bounds, D), rtol=0, atol=1e-12)


def test_third_bound_skips_more_pairs_all_above_tau(fleet, full, bounds, tmp_path):
    _, D = full
    ids = sorted(fleet.features)
    tau = float(np.quantile(D[np.triu_indices(len(ids), 1)], 0.3))
    store, refs = store_with(fleet, tmp_path)
    result = compute_distances(store, refs, use_ray=False, skip_tau=tau)
    by_second = {(ids[i], ids[j]) for i in range(len(ids)) for j in range(i + 1, len(ids)) if bounds[i, j] >= tau}
    skipped = _skipped_pairs(store, result)
    assert skipped > by_second and result["skipped"] == len(skipped)
    S = _matrix(store, result)
    for a, b in skipped:
        i, j = ids.index(a), ids.index(b)
        assert D[i, j] >= tau and bounds[i, j] - 1e-12 <= S[i, j] <= D[i, j] + 1e-6
    assert solve_plan(S, ids, tau=tau).groups == solve_plan(D, ids, tau=tau).groups


@pytest.mark.parametrize("use_ray", [False, True])
@pytest.mark.parametrize("skipping", [{"skip_tau_quantile": Q}, {"skip_tau_quantile": 0.1}, {"skip_tau": None}])
def test_ray_path_skips_the_same_pairs_as_gw_matrix(request, fleet, full, tmp_path, use_ray, skipping):
    """One schedule (gw.schedule): the same clouds, chunks and tau skip the same pairs in both paths."""
    if use_ray:
        request.getfixturevalue("ray_local")
    if "skip_tau" in skipping:
        _, D = full
        skipping = {"skip_tau": float(np.quantile(D[np.triu_indices(len(D), 1)], 0.3))}
    store, refs = store_with(fleet, tmp_path)
    matrix = gw_matrix(fleet.features, keys={i: ref.key for i, ref in refs.items()}, batch_size=4, **skipping)
    # One chunk in flight at a time, so the cutoff moves after each chunk as in gw_matrix.
    result = compute_distances(store, refs, use_ray=use_ray, chunk_size=4, max_in_flight=1, **skipping)
    assert matrix.skipped and _skipped_pairs(store, result) == set(matrix.skipped)
    assert result["computed"] == matrix.n_computed and result["tau"] == pytest.approx(matrix.tau, rel=1e-5)


def test_skipped_pairs_stay_out_of_the_cache_and_profiles_are_reused(fleet, full, tmp_path):
    _, D = full
    store, refs = store_with(fleet, tmp_path)
    first = compute_distances(store, refs, use_ray=False, skip_tau_quantile=Q)
    assert first["profiles"] == {"computed": len(refs), "reused": 0}
    assert len(store.list(PROFILES_PREFIX)) == len(refs)
    skipped = _skipped_pairs(store, first)
    assert skipped and not any(store.exists(pair_cache_key("entropic", None, refs[a], refs[b])) for a, b in skipped)

    again = compute_distances(store, refs, use_ray=False, skip_tau_quantile=Q)  # same tau: nothing to do
    assert again["computed"] == 0 and again["skipped"] == first["skipped"] and again["tau"] == first["tau"]
    # Profiles are read back for the feature sets of the pairs left to decide (the skipped ones).
    assert again["profiles"] == {"computed": 0, "reused": len({i for pair in skipped for i in pair})}

    unskipped = compute_distances(store, refs, use_ray=False)  # only the skipped pairs are solved
    assert unskipped["computed"] == len(skipped) and unskipped["skipped"] == 0
    assert unskipped["reused"] == len(D) * (len(D) - 1) // 2 - len(skipped)
    assert np.array_equal(_matrix(store, unskipped), D)
    assert unskipped["key"] == full[0]["key"]  # without skipping the table key is unchanged


def test_bad_skipping_arguments(fleet, tmp_path):
    store, refs = store_with(fleet, tmp_path)
    with pytest.raises(ValueError, match="not both"):
        compute_distances(store, refs, use_ray=False, skip_tau=0.1, skip_tau_quantile=Q)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_distances(store, refs, use_ray=False, skip_tau_quantile=1.5)


def test_flow_config_passes_the_plan_threshold():
    from flows.nightly import ConsolidateConfig, _skipping
    from gw.plan import DEFAULT_TAU_QUANTILE

    assert _skipping(ConsolidateConfig(planner="gw"), 47) == {"skip_tau_quantile": DEFAULT_TAU_QUANTILE}
    assert _skipping(ConsolidateConfig(planner="gw", tau=0.2), 47) == {"skip_tau": 0.2}
    assert _skipping(ConsolidateConfig(planner="gw", skip_by_bounds=False), 47) == {}
    assert _skipping(ConsolidateConfig(planner="measured"), 47) == {}  # the shortlist reads every pair
