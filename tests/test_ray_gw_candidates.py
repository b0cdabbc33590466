"""The shortlist in the distributed GW matrix (workers/ray_gw.py, `candidates`) and its flow settings."""
from __future__ import annotations

import math

import numpy as np
import pytest

from flows.cli import _consolidate_config, build_parser
from flows.config import ConsolidateConfig
from gw.bounds import bound_matrix, cost_profile
from gw.candidates import candidate_graph, shortlist_tau
from gw.clouds import prepare
from gw.synthetic import planted_fleet
from feature_stores import store_with
from workers.fleet_gw import distance_matrix, plan_fleet
from workers.ray_gw import compute_distances


@pytest.fixture(scope="module")
def fleet():
    return planted_fleet(n_families=4, models_per_family=3, n_points=48, dim=32, seed=11)


@pytest.fixture(scope="module")
def full(fleet, tmp_path_factory):
    store, refs = store_with(fleet, tmp_path_factory.mktemp("full"))
    result = compute_distances(store, refs, use_ray=False)
    return result, distance_matrix(store, result["key"], result["ids"])


def test_only_the_shortlisted_pairs_are_solved_and_the_others_never_grouped(fleet, full, tmp_path):
    # in process; the Ray path runs in tests/test_flow.py (test_flow_on_a_shortlist_...)
    store, refs = store_with(fleet, tmp_path)
    result = compute_distances(store, refs, use_ray=False, candidates=2, candidates_tau_quantile=0.1, chunk_size=4)
    ids = result["ids"]
    n = len(ids)
    # the candidates are gw.candidates' graph on bounds computed here, independently of the profile cache
    graph = candidate_graph(bound_matrix([cost_profile(prepare(np.array(fleet.features[i]))) for i in ids]), ids, 2)
    assert result["computed"] == len(graph.pairs) <= 2 * n and result["reused"] == 0
    assert result["not_shortlisted"] == n * (n - 1) // 2 - len(graph.pairs) > 0
    assert result["profiles"] == {"computed": n, "reused": 0}
    rows = store.read_table(result["key"]).to_pylist()
    assert len(rows) == n * (n - 1) // 2
    listed = {(ids[i], ids[j]) for i, j in graph.pairs}
    for row in rows:
        shortlisted = (row["a"], row["b"]) in listed
        assert (row["solver"] == "not-shortlisted") == row["skipped"] == (not shortlisted)
        assert math.isnan(row["value"]) == (not shortlisted)
    _, D = full
    S = distance_matrix(store, result["key"], ids)
    mask = graph.mask
    assert np.array_equal(S[mask], D[mask])  # the same pairs, bit for bit
    assert result["tau"] == shortlist_tau(graph, S, 0.1)
    # the 12 family pairs are the closest and all shortlisted: the 0.1-quantile tau is the full matrix's
    assert result["tau"] == pytest.approx(float(np.quantile(D[np.triu_indices(n, 1)], 0.1)), abs=1e-12)
    plan = plan_fleet(S, ids, tau=shortlist_tau(graph, S, 1.0), tau_quantile=1.0, k=3)
    assert set(plan.groups) == {tuple(sorted(fleet.members(f))) for f in range(4)}
    assert all(mask[ids.index(a), ids.index(b)] for g in plan.groups for a in g for b in g if a < b)
    assert result["key"] != full[0]["key"]

    again = compute_distances(store, refs, use_ray=False, candidates=2, candidates_tau_quantile=0.1)
    assert again["computed"] == 0 and again["reused"] == len(graph.pairs)
    assert again["profiles"] == {"computed": 0, "reused": n} and again["key"] == result["key"]


def test_bad_shortlist_arguments(fleet, tmp_path):
    store, refs = store_with(fleet, tmp_path)
    with pytest.raises(ValueError, match="candidates must be"):
        compute_distances(store, refs, use_ray=False, candidates=-1)
    with pytest.raises(ValueError, match="do not combine"):
        compute_distances(store, refs, use_ray=False, candidates=3, skip_tau_quantile=0.5)


def test_the_flow_setting_picks_all_pairs_for_small_fleets_a_shortlist_for_large_ones():
    from flows.nightly import _skipping
    from gw.plan import DEFAULT_TAU_QUANTILE
    from gw.shortlist_size import ALL_PAIRS_UP_TO, DEFAULT_CANDIDATES

    assert ConsolidateConfig().gw_candidates is None  # by the fleet's size
    assert "candidates" not in _skipping(ConsolidateConfig(), ALL_PAIRS_UP_TO)
    assert _skipping(ConsolidateConfig(), ALL_PAIRS_UP_TO + 1) == {
        "candidates": DEFAULT_CANDIDATES, "candidates_tau_quantile": DEFAULT_TAU_QUANTILE}
    assert "candidates" not in _skipping(ConsolidateConfig(planner="linkage"), 500)  # linkage reads every pair
    assert "candidates" not in _skipping(ConsolidateConfig(gw_candidates=0), 500)  # asked for all pairs
    parsed = ConsolidateConfig.from_dict(_consolidate_config(build_parser().parse_args(
        ["consolidate", "--store", "X", "--gw-candidates", "7", "--tau-quantile", "0.3"])))
    assert parsed == ConsolidateConfig(gw_candidates=7, tau_quantile=0.3)
    assert _skipping(parsed, 20) == {"candidates": 7, "candidates_tau_quantile": 0.3}
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="gw_candidates must be"):
            ConsolidateConfig(gw_candidates=bad)
    with pytest.raises(ValueError, match="linkage"):
        ConsolidateConfig(gw_candidates=5, planner="linkage")
    ConsolidateConfig(gw_candidates=5, planner="measured")  # its shortlist reads only measured GW pairs
