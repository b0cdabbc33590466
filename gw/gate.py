"""The accuracy gate, pure: no I/O, no models, JSON-safe records.

A merged group is published only if no member's scoring quality falls by more than a margin. Each
member is judged on its validation answers, scored by its own scorer and by the merged model (both
give probabilities). Two rules:

- ``"delta"`` (the original rule): the observed validation macro F1 may fall by at most δ.
- ``"bound"`` (the default): a member is rejected when its paired evidence shows a real fall: the
  upper one-sided 90 % bound of the change in the class-balanced mean probability of the true label
  is below 0, or its observed macro F1 fell by more than 0.2.

Why not the δ-rule. Beetle's validation splits hold 5 to 26 answers (median 12 to 17). With hard
predictions only, a test is Poisson-limited: for a true accuracy fall of 0.10 the merged model must
be wrong on at least 0.1·n answers the own scorer gets right, and at n = 17 the two agree on every
validation answer with probability ≥ 0.9^17 ≈ 0.17 even in the most favourable case; no sensible
rule rejects a merge that agrees with the own scorer everywhere, so no rule on hard predictions
alone rejects a 0.10 fall in 95 % of draws. Meanwhile one answer moves accuracy by ~0.06, three
times δ = 0.02: the δ-rule rejects unchanged merges in ~40 % of draws (`gw.gate_sim`). Training
answers are no honest evidence for the own scorer (it was fine-tuned on them).

So the "bound" rule reads what each answer says beyond its flip: the probability q each model gives
the true label. Per answer the paired difference d_i = q_merged − q_own; its mean is class-balanced
(each label's answers weigh equally, as in macro F1) and its standard error comes from the same
weights. The mean probability of the true label is a bounded score: unlike log-loss, one
over-confident error of the fine-tuned own head cannot outweigh everything else, so a refit head's
different calibration counts little. A large observed fall of macro F1 (> 0.2) rejects too: it
catches a merge whose probabilities barely move while its decisions do.

Operating characteristic (`gw.gate_sim`, `bench/gate_oc.py`; 3 classes with Beetle's priors
0.45/0.15/0.40, own accuracy 0.65, the merged model's noise correlated with the own model's at ρ):
at n = 17 and ρ = 0.95 it accepts a true change of 0 in ~85 % of draws and rejects a true macro F1
fall of 0.10 in ~95 % (the δ-rule: 66 % and 78 %). The acceptance target (≥ 80 %) holds from n = 12 at
every ρ (at n = 6, ~78 %); the rejection target (≥ 95 %) needs ρ ≳ 0.95 and n ≳ 17: at ρ = 0.8 (the merged
model's errors only loosely follow the own scorer's) it rejects a 0.10 fall in ~66 % of draws, and at n = 12, ρ = 0.95 in ~91 %. No
rule on these answers can do much better there; more labelled validation answers can.

A group of three or more that fails tries its sub-pairs and keeps the best passing pair (smallest
largest observed macro F1 fall, then smallest mean fall, then member order). Whatever is not in an
accepted group stays on its own scorer.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gw.metrics import classification_metrics

DEFAULT_DELTA = 0.02
GATE_RULES = ("bound", "delta")
DEFAULT_GATE = "bound"
STRATEGIES = ("all", "first")
# Drops within this of δ count as equal to δ, so 0.9 − 0.88 = 0.020000000000000018 passes at δ = 0.02.
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Evidence:
    """One model's predictions on one item's validation answers."""

    task: str  # "multiclass" | "multilabel"
    labels: np.ndarray  # [n] int classes, or [n, L] 0/1 for multilabel
    probs: np.ndarray  # [n, C] class probabilities (rows sum to 1), or [n, L] per-label probabilities

    def __post_init__(self):
        labels, probs = np.asarray(self.labels), np.asarray(self.probs, dtype=np.float64)
        if self.task not in ("multiclass", "multilabel"):
            raise ValueError(f"task must be multiclass or multilabel, got {self.task!r}")
        if probs.ndim != 2 or len(labels) != len(probs):
            raise ValueError(f"need probs [n, C] for n labels: got {len(labels)} labels and probs {probs.shape}")
        if not np.all(np.isfinite(probs)) or probs.min(initial=0) < 0 or probs.max(initial=0) > 1:
            raise ValueError("probabilities must be finite and within [0, 1]")
        if self.task == "multiclass" and len(probs) and not np.allclose(probs.sum(-1), 1, atol=1e-3):
            raise ValueError("multiclass probabilities must sum to 1 per answer")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "probs", probs)

    @property
    def n(self) -> int:
        return len(self.labels)

    def predictions(self) -> np.ndarray:
        return (self.probs > 0.5).astype(np.int64) if self.task == "multilabel" else self.probs.argmax(-1)

    def macro_f1(self) -> float:
        labels = list(range(self.probs.shape[1])) if self.task == "multiclass" else None
        return float(classification_metrics(self.task, self.labels, self.predictions(), labels)["macro_f1"])

    def true_label_probs(self) -> tuple[np.ndarray, np.ndarray]:
        """(q, class): the probability given to each true label, and that label's class for balancing.

        Multi-label items count each (answer, label) pair: q = p if the label is on, else 1 − p."""
        if self.task == "multiclass":
            return self.probs[np.arange(self.n), self.labels.astype(np.int64)], self.labels.astype(np.int64)
        on = self.labels.astype(bool)
        q = np.where(on, self.probs, 1 - self.probs)
        cls = np.arange(on.shape[1])[None, :] * 2 + on  # per label, on and off balanced apart
        return q.ravel(), cls.ravel()


@dataclass(frozen=True)
class MemberCheck:
    """One member's verdict: its observed macro F1 change, the rule's statistic, and why."""

    member: str
    passed: bool
    macro_f1_own: float
    macro_f1_merged: float
    change: float  # merged − own macro F1 (negative: a fall)
    statistic: float | None  # "bound": the upper bound of the true-label probability change
    n: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def balanced_change(own: Evidence, merged: Evidence) -> tuple[float, float]:
    """Class-balanced mean of the paired true-label probability change, and its standard error."""
    if own.n != merged.n or not np.array_equal(own.labels, merged.labels):
        raise ValueError("own and merged evidence must score the same answers with the same labels")
    q_own, cls = own.true_label_probs()
    q_merged, _ = merged.true_label_probs()
    d = q_merged - q_own
    classes, counts = np.unique(cls, return_counts=True)
    if len(d) < 2:
        return float(d.mean()) if len(d) else 0.0, math.inf
    weight = 1.0 / (counts[np.searchsorted(classes, cls)] * len(classes))
    mean = float(np.sum(weight * d))
    se = float(np.sqrt(np.sum(weight ** 2 * (d - mean) ** 2) * len(d) / (len(d) - 1)))
    return mean, se


@dataclass(frozen=True)
class DeltaRule:
    """The original rule: the observed validation macro F1 may fall by at most δ."""

    delta: float = DEFAULT_DELTA
    name: str = "delta"

    def check(self, member: str, own: Evidence, merged: Evidence) -> MemberCheck:
        before, after = own.macro_f1(), merged.macro_f1()
        change = after - before
        passed = -change <= self.delta + _TOLERANCE
        reason = (f"macro F1 {_moved(change)}, within δ={self.delta:g}" if passed
                  else f"macro F1 fell {-change:.3f}, more than δ={self.delta:g}")
        return MemberCheck(member, passed, before, after, change, None, own.n, reason)


@dataclass(frozen=True)
class BoundRule:
    """Reject on evidence of a real fall (see the module docstring). `delta` is recorded but not used:
    this rule's tolerance is its confidence level (z) and `max_fall`; δ belongs to the δ-rule."""

    delta: float = DEFAULT_DELTA
    z: float = 1.2816  # one-sided 90 %
    max_fall: float = 0.2  # an observed macro F1 fall this large rejects whatever the probabilities say
    name: str = "bound"

    def check(self, member: str, own: Evidence, merged: Evidence) -> MemberCheck:
        before, after = own.macro_f1(), merged.macro_f1()
        change = after - before
        mean, se = balanced_change(own, merged)
        upper = mean + self.z * se
        if -change > self.max_fall + _TOLERANCE:
            passed, reason = False, f"macro F1 fell {-change:.3f}, more than {self.max_fall:g}"
        elif upper < 0:
            passed, reason = False, (f"true-label probability fell {-mean:.3f} (90% upper bound {upper:+.3f}) "
                                     f"on {own.n} answers; macro F1 {_moved(change)}")
        else:
            passed, reason = True, f"no evidence of a fall on {own.n} answers (macro F1 {_moved(change)})"
        return MemberCheck(member, passed, before, after, change, round(upper, 6) if math.isfinite(upper) else None,
                           own.n, reason)


GateRule = DeltaRule | BoundRule


def make_rule(name: str = DEFAULT_GATE, delta: float = DEFAULT_DELTA) -> GateRule:
    delta = float(delta)
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite non-negative number, got {delta}")
    if name == "delta":
        return DeltaRule(delta)
    if name == "bound":
        return BoundRule(delta)
    raise ValueError(f"unknown gate rule {name!r}; known: {', '.join(GATE_RULES)}")


def _moved(change: float) -> str:
    return f"rose {change:.3f}" if change > 0 else ("unchanged" if change == 0 else f"fell {-change:.3f}")


@dataclass(frozen=True)
class GroupCheck:
    """One evaluated (sub-)group: each member's check and the verdict."""

    members: list[str]
    passed: bool
    checks: list[MemberCheck]
    worst_member: str
    max_drop: float  # the largest observed macro F1 fall
    reason: str

    @property
    def drops(self) -> dict[str, float]:
        return {c.member: -c.change for c in self.checks}

    def to_dict(self) -> dict[str, Any]:
        return {"members": self.members, "passed": self.passed, "checks": [c.to_dict() for c in self.checks],
                "worst_member": self.worst_member, "max_drop": self.max_drop, "reason": self.reason}


@dataclass(frozen=True)
class GateDecision:
    """The gate's decision for one planned group; `to_dict()` is JSON-safe."""

    members: list[str]
    passed: bool  # True when some merged group (the whole group or a pair) was accepted
    accepted: list[str]  # members of the accepted merged group, [] if none
    individual: list[str]  # members kept on their own scorers
    delta: float
    rule: str
    reason: str
    attempts: list[GroupCheck] = field(default_factory=list)
    metric: str = "macro_f1"

    def to_dict(self) -> dict[str, Any]:
        record = {k: v for k, v in asdict(self).items() if k != "attempts"}
        record["attempts"] = [attempt.to_dict() for attempt in self.attempts]
        return record


SubgroupEvaluator = Callable[[tuple[str, ...]], Mapping[str, Evidence]]


def check_group(members: Sequence[str], own: Mapping[str, Evidence], merged: Mapping[str, Evidence],
                rule: GateRule) -> GroupCheck:
    members = _check_members(members)
    checks = [rule.check(m, _get(own, m, "own"), _get(merged, m, "merged")) for m in members]
    worst = max(checks, key=lambda c: -c.change)  # first of equals, in member order
    failing = [c for c in checks if not c.passed]
    if failing:
        reason = "; ".join(f"{c.member}: {c.reason}" for c in failing)
    else:
        reason = ("every member passed (" + (f"largest macro F1 fall {-worst.change:.3f}, {worst.member})"
                                             if worst.change < 0 else "no member's macro F1 fell)"))
    return GroupCheck(list(members), not failing, checks, worst.member, -worst.change, reason)


def _get(evidence: Mapping[str, Evidence], member: str, what: str) -> Evidence:
    if member not in evidence:
        raise ValueError(f"no {what} evidence for member {member!r}")
    return evidence[member]


def _check_members(members: Sequence[str]) -> list[str]:
    if isinstance(members, str):
        raise ValueError("members must be a sequence of item ids, not a single string")
    members = list(members)
    if len(set(members)) != len(members):
        raise ValueError(f"members contains duplicates: {members}")
    return members


def gate_group(members: Sequence[str], own: Mapping[str, Evidence], evaluate: SubgroupEvaluator, *,
               rule: GateRule | None = None, strategy: str = "all") -> GateDecision:
    """Gate one planned group; on failure fall back to a smaller part of it.

    own: each member's own-scorer evidence. evaluate(sub_group) returns the merged model's evidence
    for each member of that sub-group. A failed group of 4 or more sheds the member that fell most and
    is merged again without it, one member at a time, down to 3 (at most k − 3 more merges, never every
    subset); the first sub-group that passes is kept and the shed members stay on their own scorers. A
    failed trio (planned, or what the shedding left) then tries its pairs: strategy "all" evaluates
    every pair and keeps the best passing one; "first" tries pairs without the member that fell most
    first, then by the pair's summed fall in the trio, and keeps the first that passes (fewer merges
    when a merge is costly).
    """
    rule = rule or make_rule()
    members = _check_members(members)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for member in members:
        _get(own, member, "own")

    def decide(accepted: list[str], reason: str, attempts: list[GroupCheck]) -> GateDecision:
        individual = [m for m in members if m not in accepted]
        return GateDecision(members, bool(accepted), accepted, individual, rule.delta, rule.name, reason, attempts)

    if len(members) < 2:
        return decide([], "a single member: nothing to merge", [])
    whole = check_group(members, own, evaluate(tuple(members)), rule)
    if whole.passed:
        return decide(list(members), f"merged: {whole.reason}", [whole])
    if len(members) == 2:
        return decide([], f"kept on own scorers: {whole.reason}", [whole])

    attempts, trio, shed = [whole], whole, []
    while len(trio.members) > 3:  # shed the failing member that fell most, one at a time
        failing = [c for c in trio.checks if not c.passed] or trio.checks
        shed.append(max(failing, key=lambda c: -c.change).member)
        rest = tuple(m for m in trio.members if m != shed[-1])
        trio = check_group(rest, own, evaluate(rest), rule)
        attempts.append(trio)
        if trio.passed:
            return decide(list(rest), f"fallback group {' + '.join(rest)} ({', '.join(shed)} kept on their own "
                                      f"scorers, shed as the failing members that fell most): the whole group failed "
                                      f"({whole.reason}); without them it passed", attempts)
    pairs = list(itertools.combinations(trio.members, 2))
    if strategy == "first":
        pairs.sort(key=lambda pair: (trio.worst_member in pair, sum(trio.drops[m] for m in pair)))
    passing = []
    for pair in pairs:
        check = check_group(pair, own, evaluate(pair), rule)
        attempts.append(check)
        if check.passed:
            passing.append(check)
            if strategy == "first":
                break
    if not passing:
        return decide([], f"kept on own scorers: the group failed ({whole.reason}) and no pair passed", attempts)
    best = min(passing, key=lambda c: (c.max_drop, sum(c.drops.values()) / len(c.drops)))
    left = [m for m in members if m not in best.members]
    # The pair is merged on its own, so a member that failed in the whole group may pass in it.
    return decide(list(best.members), f"fallback pair {' + '.join(best.members)} ({', '.join(left)} kept on "
                                      f"its own scorer): the whole group failed ({whole.reason}); the pair, "
                                      "merged on its own, passed", attempts)
