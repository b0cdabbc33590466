"""The accuracy gate: accept, split a failed trio to its best pair, reject; JSON-safe records."""
from __future__ import annotations

import json

import pytest

from gw.gate import DEFAULT_DELTA, check_group, gate_group, lookup_evaluator

BASELINE = {"a": 0.80, "b": 0.70, "c": 0.60}


class CountingEvaluator:
    """Precomputed merged scores per sub-group; records which sub-groups the gate asked for."""

    def __init__(self, results):
        self.lookup = lookup_evaluator(results)
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, group):
        self.calls.append(tuple(group))
        return self.lookup(group)


def test_group_within_delta_passes():
    evaluate = CountingEvaluator({("a", "b", "c"): {"a": 0.79, "b": 0.68, "c": 0.61}})
    decision = gate_group(["a", "b", "c"], BASELINE, evaluate)
    assert decision.passed and decision.accepted == ["a", "b", "c"] and decision.individual == []
    assert decision.delta == DEFAULT_DELTA and decision.metric == "macro_f1"
    assert decision.attempts[0].drops == pytest.approx({"a": 0.01, "b": 0.02, "c": -0.01})
    assert evaluate.calls == [("a", "b", "c")]
    json.dumps(decision.to_dict())


def test_drop_of_exactly_delta_passes_and_just_above_fails():
    assert check_group(["a"], {"a": 0.9}, {"a": 0.88}).passed  # 0.9 − 0.88 = 0.020000000000000018
    failed = check_group(["a", "b"], {"a": 0.9, "b": 0.5}, {"a": 0.8789, "b": 0.6})
    assert not failed.passed and failed.worst_member == "a" and "a" in failed.reason


def test_failed_trio_falls_back_to_its_best_passing_pair():
    results = {
        ("a", "b", "c"): {"a": 0.79, "b": 0.60, "c": 0.59},  # b drops 0.10
        ("a", "b"): {"a": 0.79, "b": 0.66},  # fails
        ("a", "c"): {"a": 0.785, "c": 0.595},  # passes, worst drop 0.015
        ("b", "c"): {"b": 0.695, "c": 0.595},  # passes, worst drop 0.005: the best
    }
    evaluate = CountingEvaluator(results)
    decision = gate_group(["a", "b", "c"], BASELINE, evaluate)
    assert decision.passed and decision.accepted == ["b", "c"] and decision.individual == ["a"]
    assert len(decision.attempts) == 4 and not decision.attempts[0].passed
    assert "best passing pair" in decision.reason
    json.loads(json.dumps(decision.to_dict()))


def test_first_strategy_tries_pairs_without_the_worst_member_first():
    results = {
        ("a", "b", "c"): {"a": 0.79, "b": 0.60, "c": 0.59},
        ("a", "c"): {"a": 0.79, "c": 0.60},
        ("b", "c"): {"b": 0.69, "c": 0.60},
        ("a", "b"): {"a": 0.79, "b": 0.69},
    }
    evaluate = CountingEvaluator(results)
    decision = gate_group(["a", "b", "c"], BASELINE, evaluate, strategy="first")
    assert evaluate.calls == [("a", "b", "c"), ("a", "c")]  # b dropped most: the pair without b first
    assert decision.accepted == ["a", "c"] and decision.individual == ["b"]


def test_everything_fails_and_members_stay_individual():
    bad = {"a": 0.5, "b": 0.5, "c": 0.5}
    evaluate = CountingEvaluator({group: bad for group in [("a", "b", "c"), ("a", "b"), ("a", "c"), ("b", "c")]})
    decision = gate_group(["a", "b", "c"], BASELINE, evaluate)
    assert not decision.passed and decision.accepted == [] and decision.individual == ["a", "b", "c"]
    assert len(decision.attempts) == 4 and "no pair passed" in decision.reason


def test_failed_pair_is_rejected_without_sub_groups():
    evaluate = CountingEvaluator({("a", "b"): {"a": 0.5, "b": 0.7}})
    decision = gate_group(["a", "b"], BASELINE, evaluate)
    assert not decision.passed and decision.individual == ["a", "b"] and evaluate.calls == [("a", "b")]


def test_precomputed_whole_group_scores_and_custom_delta():
    evaluate = CountingEvaluator({})
    decision = gate_group(["a", "b"], BASELINE, evaluate, merged={"a": 0.75, "b": 0.70}, delta=0.05)
    assert decision.passed and evaluate.calls == []


def test_single_member_and_input_errors():
    decision = gate_group(["a"], BASELINE, CountingEvaluator({}))
    assert not decision.passed and decision.individual == ["a"] and decision.attempts == []
    with pytest.raises(ValueError, match="baseline score for member 'd'"):
        gate_group(["a", "d"], BASELINE, CountingEvaluator({}))
    with pytest.raises(ValueError, match="merged score"):
        gate_group(["a", "b"], BASELINE, lookup_evaluator({("a", "b"): {"a": 0.8}}))
    with pytest.raises(ValueError, match="finite"):
        check_group(["a"], {"a": float("nan")}, {"a": 0.5})
    with pytest.raises(ValueError, match="delta"):
        check_group(["a"], BASELINE, BASELINE, delta=-0.1)
    with pytest.raises(ValueError, match="duplicates"):
        gate_group(["a", "a"], BASELINE, CountingEvaluator({}))
    with pytest.raises(ValueError, match="strategy"):
        gate_group(["a", "b"], BASELINE, CountingEvaluator({}), strategy="greedy")
    with pytest.raises(KeyError, match="sub-group"):
        lookup_evaluator({})(("a", "b"))
