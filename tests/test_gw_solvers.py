"""GW solvers, clouds and bounds (gw/clouds.py, gw/entropic.py, gw/solvers.py, gw/bounds.py)."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch

from gw.bounds import (bound_matrix, cost_profile, profile_bound, row_profiles, second_lower_bound,
                       third_lower_bound, wasserstein2_1d)
from gw.clouds import coarsen, feature_key, prepare
from gw.entropic import EntropicOptions, entropic_gw, entropic_gw_batch
from gw.result import GWResult
from gw.solvers import exact_gw, gw_distance, gw_pair
from gw.synthetic import planted_fleet, random_rotation

# Small ε and the product start reproduce POT's entropic iteration; the default start is multiscale.
POT_LIKE = EntropicOptions(epsilon=0.05, init="product", tol=1e-6, marginal_tol=1e-6, max_inner=3000)


@pytest.fixture(scope="module")
def fleet():
    return planted_fleet(n_families=3, models_per_family=2, n_points=60, dim=24, seed=7)


def _pot_loss(a, b, coupling):
    c1, c2 = a.costs().double().numpy(), b.costs().double().numpy()
    constc, hc1, hc2 = ot.gromov.init_matrix(c1, c2, coupling.sum(1), coupling.sum(0), "square_loss")
    return float(ot.gromov.gwloss(constc, hc1, hc2, coupling))


# ---------------------------------------------------------------------------------------------
# Agreement with POT
# ---------------------------------------------------------------------------------------------


def test_entropic_matches_pot_entropic_same_epsilon(fleet):
    a = prepare(fleet.features["f0_m0"], device="cpu", dtype=torch.float64)
    b = prepare(fleet.features["f1_m0"], device="cpu", dtype=torch.float64)
    ours = entropic_gw(a, b, POT_LIKE)
    c1, c2 = a.costs().numpy(), b.costs().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ot.gromov.entropic_gromov_wasserstein2(c1, c2, epsilon=POT_LIKE.epsilon, max_iter=2000, tol=1e-11)
    assert ours.converged
    assert ours.value == pytest.approx(theirs, rel=1e-3)


def test_large_float32_pairs_match_pot_and_beat_the_independent_coupling():
    """The product's setting (float32, defaults, pair-after-pair Sinkhorn from 128 x 128) on a pair
    that needs ~20 outer iterations: a drift of the column potentials (doubling each iteration) once
    sent it back to p q^T, the worst of the feasible couplings an entropic solve can end at."""
    fl = planted_fleet(n_families=2, models_per_family=1, n_points=500, dim=384, seed=0)
    a, b = (prepare(fl.features[k], device="cpu") for k in ("f0_m0", "f1_m0"))
    ours = entropic_gw(a, b)
    # and held there for 60 outer iterations (no stopping): the optimum is a fixed point
    held = entropic_gw(a, b, EntropicOptions(tol=1e-12, coupling_tol=1e-12, max_iter=60))
    c1, c2 = a.costs().double().numpy(), b.costs().double().numpy()
    p = np.full(a.n_points, 1.0 / a.n_points)
    independent = float(p @ (c1 * c1) @ p + p @ (c2 * c2) @ p - 2.0 * (p @ c1 @ p) * (p @ c2 @ p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ot.gromov.entropic_gromov_wasserstein2(c1, c2, p, p, "square_loss", epsilon=ours.epsilon)
    assert ours.converged
    assert ours.value < 0.5 * independent  # was 0.714 = the independent coupling's value
    assert ours.value == pytest.approx(theirs, rel=0.02)
    assert held.value == pytest.approx(ours.value, rel=0.01)
    wide = entropic_gw(*(prepare(fl.features[k], device="cpu", dtype=torch.float64) for k in ("f0_m0", "f1_m0")))
    assert ours.value == pytest.approx(wide.value, rel=1e-3)


def test_entropic_close_to_exact_on_small_clouds(fleet):
    for first, second in [("f0_m0", "f1_m1"), ("f1_m0", "f2_m0"), ("f0_m1", "f2_m1")]:
        a = prepare(fleet.features[first], device="cpu")
        b = prepare(fleet.features[second], device="cpu")
        exact = exact_gw(a, b)
        values = [entropic_gw(a, b, EntropicOptions(epsilon=eps)).value for eps in (0.1, 0.02, 0.005)]
        assert exact.converged
        # the entropic blur shrinks with epsilon, down to the exact objective
        assert values[0] > values[1] > values[2]
        assert values[2] == pytest.approx(exact.value, rel=0.02), (first, second)


def test_value_is_the_objective_of_the_returned_coupling(fleet):
    a = prepare(fleet.features["f0_m0"], device="cpu")
    b = prepare(fleet.features["f2_m1"], device="cpu")
    for result in (entropic_gw(a, b, return_coupling=True), exact_gw(a, b, return_coupling=True)):
        coupling = result.coupling
        assert coupling.shape == (a.n_points, b.n_points)
        assert coupling.sum() == pytest.approx(1.0, abs=1e-3)
        assert result.value == pytest.approx(_pot_loss(a, b, coupling), rel=1e-5, abs=1e-8)
        assert result.marginal_error == pytest.approx(
            np.abs(coupling.sum(1) - 1 / a.n_points).sum() + np.abs(coupling.sum(0) - 1 / b.n_points).sum(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Invariances
# ---------------------------------------------------------------------------------------------


def test_rotation_translation_scale_leave_gw_unchanged(fleet):
    rng = np.random.default_rng(0)
    X, Y = fleet.features["f0_m0"], fleet.features["f1_m0"]
    moved = 3.0 * X @ random_rotation(X.shape[1], rng) + 50.0
    for solver in ("exact", "entropic"):
        base = gw_distance(X, Y, solver=solver).value
        assert gw_distance(moved, Y, solver=solver).value == pytest.approx(base, rel=1e-3), solver


def test_cloud_against_itself_is_near_zero(fleet):
    rng = np.random.default_rng(1)
    X = fleet.features["f2_m0"]
    rotated = X @ random_rotation(X.shape[1], rng)
    assert gw_distance(X, rotated, solver="exact").value < 1e-8
    own = gw_distance(X, rotated).value  # entropic: only the blur remains
    other = gw_distance(X, fleet.features["f0_m0"]).value
    assert 0.0 <= own < 0.25 * other


def test_symmetric_in_its_arguments(fleet):
    X, Y = fleet.features["f0_m1"], fleet.features["f1_m1"]
    assert gw_distance(X, Y).value == pytest.approx(gw_distance(Y, X).value, rel=1e-3)


def test_different_dimensions_and_sizes_are_fine():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 8))
    Y = rng.normal(size=(70, 3))
    exact = gw_distance(X, Y, solver="exact")
    ours = gw_distance(X, Y, options=EntropicOptions(epsilon=0.02))
    assert (ours.n_a, ours.n_b) == (50, 70)
    assert ours.value == pytest.approx(exact.value, rel=0.1)


# ---------------------------------------------------------------------------------------------
# Solver variants agree
# ---------------------------------------------------------------------------------------------


def test_dense_and_factored_products_agree(fleet):
    a = prepare(fleet.features["f0_m0"], device="cpu")
    b = prepare(fleet.features["f1_m1"], device="cpu")
    tight = dict(init="product", tol=1e-6, coupling_tol=1e-4, marginal_tol=1e-5, max_inner=1000)
    dense = entropic_gw(a, b, EntropicOptions(representation="dense", **tight))
    factored = entropic_gw(a, b, EntropicOptions(representation="factored", **tight))
    assert dense.value == pytest.approx(factored.value, rel=1e-4)


def test_multiscale_start_reaches_the_same_value():
    fl = planted_fleet(n_families=2, models_per_family=1, n_points=200, dim=32, seed=3)
    a, b = (prepare(fl.features[i], device="cpu") for i in ("f0_m0", "f1_m0"))
    multiscale = entropic_gw(a, b, EntropicOptions(init="multiscale"))
    product = entropic_gw(a, b, EntropicOptions(init="product"))
    assert multiscale.converged and product.converged
    assert multiscale.value == pytest.approx(product.value, rel=0.02)
    assert multiscale.iterations <= product.iterations


# product start; multiscale start, odd sizes; pair-after-pair Sinkhorn (>= 128 x 128) with cached C * C
@pytest.mark.parametrize("n_points", [60, 101, 150])
def test_batch_results_do_not_depend_on_batch_mates(n_points):
    fl = planted_fleet(n_families=3, models_per_family=2, n_points=n_points, dim=24, seed=7)
    clouds = {k: prepare(v, device="cpu") for k, v in fl.features.items()}
    pairs = [(clouds["f0_m0"], clouds["f1_m0"]), (clouds["f0_m1"], clouds["f2_m0"]), (clouds["f1_m1"], clouds["f2_m1"])]
    together = entropic_gw_batch(pairs)
    reversed_ = entropic_gw_batch(pairs[::-1])[::-1]
    alone = [entropic_gw(a, b) for a, b in pairs]
    assert [r.value for r in together] == [r.value for r in alone] == [r.value for r in reversed_]


def test_weights_are_honoured():
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(30, 4)), rng.normal(size=(25, 4))
    wx, wy = rng.uniform(0.5, 2.0, 30), rng.uniform(0.5, 2.0, 25)
    ours = gw_distance(X, Y, weights_x=wx, weights_y=wy, options=EntropicOptions(epsilon=0.02), return_coupling=True)
    exact = gw_distance(X, Y, weights_x=wx, weights_y=wy, solver="exact")
    np.testing.assert_allclose(ours.coupling.sum(1), wx / wx.sum(), atol=1e-3)
    assert ours.value == pytest.approx(exact.value, rel=0.1)


# ---------------------------------------------------------------------------------------------
# Robustness: float32, large scales, duplicates
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["huge_scale", "far_offset", "duplicates", "two_points"])
def test_no_nan_in_float32(case):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(80, 16)).astype(np.float32)
    Y = rng.normal(size=(90, 16)).astype(np.float32) ** 3
    if case == "huge_scale":
        X, Y = X * 1e15, Y * 1e-12
    elif case == "far_offset":
        X, Y = X + 1e6, Y - 3e5
    elif case == "duplicates":
        X = np.repeat(X[:4], 20, axis=0)
        Y = np.concatenate([Y[:2]] * 40 + [Y[2:12]])
    else:
        X, Y = X[:2], Y[:3]
    for init in ("multiscale", "product"):
        result = gw_distance(X, Y, options=EntropicOptions(init=init))
        assert np.isfinite(result.value) and result.value >= 0.0
        assert result.marginal_error < 1e-2
    assert np.isfinite(gw_distance(X, Y, solver="exact").value)


def test_coarsen_handles_few_distinct_points():
    X = np.repeat(np.eye(3, 5), 40, axis=0)  # 120 points, 3 distinct
    cloud = prepare(X, device="cpu")
    assert coarsen(cloud, 8) is None
    assert coarsen(cloud, 3) is not None


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or infinite"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "NaN or infinite"),
        (np.zeros((1, 4)), "at least 2 points"),
        (np.zeros((0, 4)), "empty"),
        (np.zeros((3, 0)), "empty"),
        (np.zeros(5), "2-D"),
        (np.zeros((2, 3, 4)), "2-D"),
        (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
        (np.ones((5, 3)), "coincide"),
    ],
)
def test_bad_clouds_are_rejected(bad, message):
    good = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=message):
        gw_distance(bad, good)
    with pytest.raises(ValueError, match=message):
        gw_distance(good, bad)


def test_bad_settings_are_rejected():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="solver"):
        gw_distance(X, X, solver="fast")
    with pytest.raises(ValueError, match="epsilon"):
        EntropicOptions(epsilon=0.0)
    with pytest.raises(ValueError, match="normalisation"):
        prepare(X, normalisation="median")
    with pytest.raises(ValueError, match="weights"):
        prepare(X, weights=np.ones(4))
    with pytest.raises(ValueError, match="weights"):
        prepare(X, weights=-np.ones(10))
    a = prepare(X, device="cpu")
    b = prepare(X, normalisation="max", device="cpu")
    with pytest.raises(ValueError, match="normalised differently"):
        gw_pair(a, b)


def test_max_normalisation_scales_costs_to_one():
    cloud = prepare(np.random.default_rng(0).normal(size=(40, 6)), normalisation="max", device="cpu")
    assert float(cloud.costs().max()) == pytest.approx(1.0, rel=1e-5)
    mean_cloud = prepare(np.random.default_rng(0).normal(size=(40, 6)), device="cpu")
    assert float(mean_cloud.costs().mean()) == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Lower bounds
# ---------------------------------------------------------------------------------------------


def test_lower_bounds_never_exceed_gw():
    rng = np.random.default_rng(8)
    for trial in range(6):
        n, m = rng.integers(20, 60, size=2)
        X = rng.normal(size=(n, 5)) * rng.uniform(0.5, 3.0, size=5)
        Y = rng.standard_t(3, size=(m, 7))
        a, b = prepare(X, device="cpu"), prepare(Y, device="cpu")
        exact_slb = second_lower_bound(a, b)
        approx = profile_bound(cost_profile(a, n_levels=64), cost_profile(b, n_levels=64))
        tlb = third_lower_bound(row_profiles(a, n_levels=8), row_profiles(b, n_levels=8))
        exact = exact_gw(a, b).value
        ours = entropic_gw(a, b)
        assert approx <= exact_slb + 1e-12, trial
        assert exact_slb <= exact + 1e-9, trial
        assert 0.0 <= tlb <= exact + 1e-9, trial
        assert max(exact_slb, tlb) <= ours.value + 2 * ours.marginal_error, trial


def test_third_bound_is_below_the_exact_tlb():
    rng = np.random.default_rng(10)
    a = prepare(rng.normal(size=(40, 4)), device="cpu", dtype=torch.float64)
    b = prepare(rng.normal(size=(40, 6)) ** 2, device="cpu", dtype=torch.float64)
    # exact TLB: 1-D W2^2 between every pair of cost rows, then an exact transport
    ca, cb = a.costs().numpy(), b.costs().numpy()
    gamma = np.array([[wasserstein2_1d(ca[i], np.ones(40), cb[j], np.ones(40)) for j in range(40)] for i in range(40)])
    exact_tlb = ot.emd2(np.full(40, 1 / 40), np.full(40, 1 / 40), gamma)
    ours = third_lower_bound(row_profiles(a, n_levels=40), row_profiles(b, n_levels=40), iterations=60)
    assert ours <= exact_tlb + 1e-9
    assert ours >= 0.9 * exact_tlb  # K = N segments: exact rows; the dual is nearly optimal


def test_bound_separates_families_and_is_zero_within(fleet):
    clouds = [prepare(fleet.features[i], device="cpu") for i in fleet.ids]
    bounds = bound_matrix([cost_profile(c) for c in clouds])
    assert np.allclose(bounds, bounds.T) and np.all(np.diag(bounds) == 0)
    fam = np.array([fleet.family[i] for i in fleet.ids])
    same = fam[:, None] == fam[None, :]
    off = ~np.eye(len(fam), dtype=bool)
    assert bounds[same & off].max() < bounds[~same].min()


def test_wasserstein_1d_matches_pot():
    rng = np.random.default_rng(9)
    u, v = rng.normal(size=30), rng.normal(1.0, 2.0, size=45)
    wu, wv = rng.uniform(size=30), rng.uniform(size=45)
    ours = wasserstein2_1d(u, wu, v, wv)
    theirs = ot.emd2_1d(u, v, wu / wu.sum(), wv / wv.sum(), metric="sqeuclidean")
    assert ours == pytest.approx(theirs, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Keys and results
# ---------------------------------------------------------------------------------------------


def test_feature_key_is_deterministic_and_content_based():
    X = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    key = feature_key(X)
    assert key == feature_key(X.astype(np.float64)) == feature_key(torch.from_numpy(X)) == feature_key(X.copy())
    Y = X.copy()
    Y[2, 1] += 1e-3
    assert feature_key(Y) != key
    assert feature_key(X.reshape(3, 5)) != key


def test_result_round_trips_through_a_dict(fleet):
    res = gw_distance(fleet.features["f0_m0"], fleet.features["f1_m0"], return_coupling=True)
    again = GWResult.from_dict(res.to_dict())
    assert again == res and again.coupling is None
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in res.to_dict().values())


def test_floored_logsumexp_and_exp_match_torch():
    from gw.entropic import _exp, _logsumexp

    x = torch.randn(37, 53) * 60.0 - 40.0  # many entries far below the float32 exp range
    assert torch.allclose(_logsumexp(x, 0), torch.logsumexp(x, 0), rtol=1e-6, atol=1e-5)
    assert torch.allclose(_logsumexp(x, 1), torch.logsumexp(x, 1), rtol=1e-6, atol=1e-5)
    floored = _exp(x)
    assert torch.all(floored > 0) and torch.allclose(floored, x.exp(), rtol=1e-6, atol=1e-37)


def test_principal_coordinates_keep_the_leading_gram():
    from gw.clouds import principal_coordinates

    rng = np.random.default_rng(12)
    for n, d in ((80, 30), (30, 80)):
        x = torch.from_numpy(rng.normal(size=(n, d)) * np.geomspace(1.0, 1e-3, d)).double()
        coords = principal_coordinates(x, 1e-4)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        energy = s ** 4
        rank = int((torch.cumsum(energy, 0) / energy.sum() < 1 - 1e-4).sum()) + 1
        assert coords.shape == (n, rank)
        ref = u[:, :rank] * s[:rank]
        assert torch.allclose(coords @ coords.T, ref @ ref.T, atol=1e-9 * float(s[0] ** 2))
