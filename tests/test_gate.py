"""The accuracy gate: both rules, the fallback to the best pair, clear reasons, JSON-safe records."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gw.gate import BoundRule, Evidence, balanced_change, gate_group, make_rule

LABELS = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])


def confident(labels, correct: np.ndarray, p: float = 0.8) -> Evidence:
    """Evidence that gives the true label p where `correct`, else puts p on the next class."""
    probs = np.full((len(labels), 3), (1 - p) / 2)
    target = np.where(correct, labels, (labels + 1) % 3)
    probs[np.arange(len(labels)), target] = p
    return Evidence("multiclass", labels, probs)


OWN = confident(LABELS, np.ones(10, bool))


class Evaluator:
    """Merged evidence per sub-group; records which sub-groups the gate asked for."""

    def __init__(self, results):
        self.results = {frozenset(k): v for k, v in results.items()}
        self.calls = []

    def __call__(self, group):
        self.calls.append(tuple(group))
        return self.results[frozenset(group)]


def test_unchanged_members_pass_both_rules_and_records_are_json():
    for name in ("bound", "delta"):
        evaluate = Evaluator({("a", "b", "c"): {m: OWN for m in "abc"}})
        decision = gate_group(list("abc"), {m: OWN for m in "abc"}, evaluate, rule=make_rule(name))
        assert decision.passed and decision.accepted == list("abc") and decision.rule == name
        assert decision.reason.startswith("merged") and evaluate.calls == [("a", "b", "c")]
        json.dumps(decision.to_dict())


def test_a_member_that_falls_sends_the_trio_to_its_best_pair():
    bad = confident(LABELS, np.arange(10) % 2 == 0, p=0.9)  # half its answers wrong, confidently
    slight = confident(LABELS, np.ones(10, bool), p=0.78)
    evaluate = Evaluator({("a", "b", "c"): {"a": OWN, "b": slight, "c": bad},
                          ("a", "b"): {"a": OWN, "b": OWN}, ("a", "c"): {"a": OWN, "c": bad},
                          ("b", "c"): {"b": slight, "c": bad}})
    decision = gate_group(list("abc"), {m: OWN for m in "abc"}, evaluate)
    assert decision.accepted == ["a", "b"] and decision.individual == ["c"]
    assert "fallback pair a + b" in decision.reason and "c kept on its own scorer" in decision.reason
    assert len(decision.attempts) == 4 and not decision.attempts[0].passed


def test_a_failed_pair_keeps_both_members_on_their_own_scorers():
    bad = confident(LABELS, np.arange(10) % 2 == 0, p=0.9)
    decision = gate_group(["a", "b"], {"a": OWN, "b": OWN}, Evaluator({("a", "b"): {"a": OWN, "b": bad}}))
    assert not decision.passed and decision.individual == ["a", "b"] and decision.reason.startswith("kept on own")


def test_delta_rule_counts_the_observed_macro_f1_fall_only():
    one_wrong = confident(LABELS, np.arange(10) != 0)
    check = make_rule("delta", 0.02).check("m", OWN, one_wrong)
    assert not check.passed and check.change < -0.02 and "more than δ=0.02" in check.reason
    assert make_rule("delta", 0.5).check("m", OWN, one_wrong).passed


def test_bound_rule_tolerates_one_flip_but_not_a_consistent_fall():
    probs = OWN.probs.copy()
    probs[0] = [0.45, 0.5, 0.05]  # a near-tie lost; the rest as sure as before
    check = make_rule("bound").check("m", OWN, Evidence("multiclass", LABELS, probs))
    assert check.passed and check.change < -0.02  # the δ-rule would have rejected it
    weaker = confident(LABELS, np.ones(10, bool), p=0.5)  # right everywhere, but surer of nothing
    check = make_rule("bound").check("m", OWN, weaker)
    assert not check.passed and "probability fell" in check.reason and check.statistic < 0
    disaster = confident(LABELS, np.zeros(10, bool), p=0.34)
    assert "more than 0.2" in BoundRule().check("m", OWN, disaster).reason


def test_balanced_change_weighs_each_label_equally():
    merged = OWN.probs.copy()
    merged[4:6] = [[0.1, 0.6, 0.3]] * 2  # the two answers of label 1 lose 0.2 each
    mean, se = balanced_change(OWN, Evidence("multiclass", LABELS, merged))
    assert mean == pytest.approx(-0.2 / 3) and se > 0


def test_multilabel_evidence_uses_each_label_of_each_answer():
    labels = np.array([[1, 0], [0, 1], [1, 1]])
    own = Evidence("multilabel", labels, np.where(labels == 1, 0.9, 0.1))
    assert make_rule("bound").check("m", own, own).passed
    assert own.macro_f1() == pytest.approx(1.0)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown gate rule 'strict'; known: bound, delta"):
        make_rule("strict")
    with pytest.raises(ValueError, match="sum to 1"):
        Evidence("multiclass", LABELS, np.full((10, 3), 0.5))
    with pytest.raises(ValueError, match="10 labels and probs"):
        Evidence("multiclass", LABELS, np.full((9, 3), 1 / 3))
    with pytest.raises(ValueError, match="same answers"):
        balanced_change(OWN, confident(LABELS[:9], np.ones(9, bool)))
    with pytest.raises(ValueError, match="duplicates"):
        gate_group(["a", "a"], {"a": OWN}, Evaluator({}))
    with pytest.raises(ValueError, match="no own evidence"):
        gate_group(["a", "b"], {"a": OWN}, Evaluator({}))
    with pytest.raises(ValueError, match="strategy"):
        gate_group(["a", "b"], {"a": OWN, "b": OWN}, Evaluator({}), strategy="greedy")


def test_a_failed_group_of_five_sheds_its_failing_members_one_at_a_time_not_every_subset():
    bad = confident(LABELS, np.arange(10) % 2 == 0, p=0.9)
    worse = confident(LABELS, np.arange(10) % 3 == 0, p=0.9)
    results = {tuple("abcde"): {"a": OWN, "b": OWN, "c": bad, "d": OWN, "e": worse},
               tuple("abcd"): {"a": OWN, "b": OWN, "c": bad, "d": OWN},  # e shed first: it fell most
               tuple("abd"): {m: OWN for m in "abd"}}
    evaluate = Evaluator(results)
    decision = gate_group(list("abcde"), {m: OWN for m in "abcde"}, evaluate)
    assert decision.accepted == ["a", "b", "d"] and decision.individual == ["c", "e"]
    assert evaluate.calls == [tuple("abcde"), tuple("abcd"), tuple("abd")]
    assert "fallback group a + b + d (e, c kept on their own scorers" in decision.reason


def test_a_group_of_four_that_sheds_down_to_a_failing_trio_tries_that_trios_pairs():
    bad = confident(LABELS, np.arange(10) % 2 == 0, p=0.9)
    evaluate = Evaluator({tuple("abcd"): {"a": OWN, "b": bad, "c": bad, "d": OWN},
                          tuple("acd"): {"a": OWN, "c": bad, "d": OWN},  # b shed (first of the equal falls)
                          ("a", "c"): {"a": OWN, "c": bad}, ("a", "d"): {"a": OWN, "d": OWN},
                          ("c", "d"): {"c": bad, "d": OWN}})
    decision = gate_group(list("abcd"), {m: OWN for m in "abcd"}, evaluate)
    assert decision.accepted == ["a", "d"] and decision.individual == ["b", "c"]
    assert len(evaluate.calls) == 2 + 3 and "fallback pair a + d" in decision.reason
