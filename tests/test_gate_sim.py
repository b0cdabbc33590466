"""The gate's operating characteristic by simulation at Beetle's validation size (gw.gate_sim)."""
import pytest

from gw.gate import make_rule
from gw.gate_sim import calibrate, simulate_oc


def test_calibration_hits_the_requested_population_change():
    own, unchanged = calibrate(0.95, 0.0)
    _, fallen = calibrate(0.95, -0.10)
    assert unchanged == pytest.approx(own, rel=0.05) and fallen < own


def test_bound_rule_meets_the_targets_where_the_merge_tracks_its_scorer():
    """n = 17 (the official split's median), correlation 0.95: accept a true 0 in >= 80 %, reject a true
    fall of 0.10 in >= 95 % (within the Monte Carlo error of 1000 draws, about 0.7 points)."""
    rule = make_rule("bound")
    assert simulate_oc(rule, 17, 0.0, 0.95, draws=1000) >= 0.80
    assert 1 - simulate_oc(rule, 17, -0.10, 0.95, draws=1000) >= 0.94


def test_bound_rule_accepts_unchanged_members_far_more_often_than_the_delta_rule():
    for n in (12, 17):
        bound = simulate_oc(make_rule("bound"), n, 0.0, 0.8, draws=600)
        delta = simulate_oc(make_rule("delta"), n, 0.0, 0.8, draws=600)
        assert bound >= 0.80 and bound > delta + 0.15
