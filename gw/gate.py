"""The accuracy gate (DESIGN §5 "Evaluate and gate"), pure: no I/O, no models, JSON-safe records.

A merged group passes only if no member's primary validation metric (macro F1) falls by more than δ
(default 0.02) from its own scorer's to the consolidated model's: drop = baseline − merged ≤ δ for every
member. A group of three or more that fails tries its sub-pairs, and keeps the best pair that passes
(smallest worst drop, then smallest mean drop, then the order of `members`); the caller supplies the
evaluation of a sub-group merge as a callback (or precomputed results through `lookup_evaluator`).
Whatever is not in an accepted group stays individual (served by its own scorer).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_DELTA = 0.02
# Drops within this of δ count as equal to δ, so 0.9 − 0.88 = 0.020000000000000018 passes at δ = 0.02.
_TOLERANCE = 1e-9
STRATEGIES = ("all", "first")

# Given a sub-group (members in the order of the group), the merged model's validation metric of each
# of its members.
SubgroupEvaluator = Callable[[tuple[str, ...]], Mapping[str, float]]


@dataclass(frozen=True)
class GroupCheck:
    """One evaluated (sub-)group: per-member baseline and merged metric, drops, and the verdict."""

    members: list[str]
    passed: bool
    baseline: dict[str, float]
    merged: dict[str, float]
    drops: dict[str, float]
    worst_member: str
    max_drop: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GateDecision:
    """The gate's decision for one planned group; `to_dict()` is JSON-safe."""

    members: list[str]
    passed: bool  # True when some merged group (the whole group or a pair) was accepted
    accepted: list[str]  # members of the accepted merged group, [] if none
    individual: list[str]  # members kept as they were
    delta: float
    metric: str
    reason: str
    attempts: list[GroupCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["attempts"] = [attempt.to_dict() for attempt in self.attempts]
        return record


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(f"delta must be a finite non-negative number, got {delta}")
    return delta


def _score(scores: Mapping[str, float], member: str, what: str) -> float:
    if member not in scores:
        raise ValueError(f"no {what} score for member {member!r}")
    value = scores[member]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{what} score of {member!r} must be a finite number, got {value!r}")
    return float(value)


def check_group(
    members: Sequence[str],
    baseline: Mapping[str, float],
    merged: Mapping[str, float],
    *,
    delta: float = DEFAULT_DELTA,
) -> GroupCheck:
    """Whether one merged (sub-)group passes: every member's drop = baseline − merged ≤ delta."""
    delta = _check_delta(delta)
    members = _check_members(members)
    base = {m: _score(baseline, m, "baseline") for m in members}
    after = {m: _score(merged, m, "merged") for m in members}
    drops = {m: base[m] - after[m] for m in members}
    worst = max(members, key=lambda m: drops[m])  # first of equals, in member order
    passed = drops[worst] <= delta + _TOLERANCE
    if passed:
        reason = f"every member within δ={delta:g} (largest drop {drops[worst]:.4f}, {worst})"
    else:
        failing = [m for m in members if drops[m] > delta + _TOLERANCE]
        reason = f"drop above δ={delta:g} for {', '.join(failing)} (largest {drops[worst]:.4f}, {worst})"
    return GroupCheck(
        members=list(members),
        passed=passed,
        baseline=base,
        merged=after,
        drops=drops,
        worst_member=worst,
        max_drop=drops[worst],
        reason=reason,
    )


def _check_members(members: Sequence[str]) -> list[str]:
    if isinstance(members, str):
        raise ValueError("members must be a sequence of item ids, not a single string")
    members = list(members)
    if len(set(members)) != len(members):
        raise ValueError(f"members contains duplicates: {members}")
    return members


def gate_group(
    members: Sequence[str],
    baseline: Mapping[str, float],
    evaluate: SubgroupEvaluator,
    *,
    delta: float = DEFAULT_DELTA,
    metric: str = "macro_f1",
    strategy: str = "all",
    merged: Mapping[str, float] | None = None,
) -> GateDecision:
    """Gate one planned group; on failure (3+ members) fall back to its best passing pair.

    baseline: each member's validation metric with its own scorer. evaluate(sub_group) returns the
    merged model's metric for each member of that sub-group; it is called for the whole group (unless
    `merged` gives those scores already) and, if that fails, for candidate pairs. strategy "all"
    evaluates every pair and keeps the best passing one; "first" tries pairs in order of promise —
    pairs without the member that dropped most in the whole group first, then by the sum of the pair's
    drops in the whole group — and keeps the first that passes (fewer merges when a merge is costly).
    """
    delta = _check_delta(delta)
    members = _check_members(members)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    for member in members:
        _score(baseline, member, "baseline")

    def decide(passed: bool, accepted: list[str], reason: str, attempts: list[GroupCheck]) -> GateDecision:
        individual = [m for m in members if m not in accepted]
        return GateDecision(members, passed, accepted, individual, delta, metric, reason, attempts)

    if len(members) < 2:
        return decide(False, [], "a single member: nothing to merge", [])

    whole = check_group(members, baseline, merged if merged is not None else evaluate(tuple(members)), delta=delta)
    if whole.passed:
        return decide(True, list(members), f"group passed: {whole.reason}", [whole])
    if len(members) == 2:
        return decide(False, [], f"pair failed, members stay individual: {whole.reason}", [whole])

    pairs = list(itertools.combinations(members, 2))
    if strategy == "first":
        pairs.sort(key=lambda pair: (whole.worst_member in pair, sum(whole.drops[m] for m in pair)))
    attempts = [whole]
    passing: list[GroupCheck] = []
    for pair in pairs:
        check = check_group(pair, baseline, evaluate(pair), delta=delta)
        attempts.append(check)
        if check.passed:
            passing.append(check)
            if strategy == "first":
                break
    if not passing:
        return decide(
            False, [], f"group failed ({whole.reason}) and no pair passed: members stay individual", attempts
        )
    best = min(passing, key=lambda c: (c.max_drop, sum(c.drops.values()) / len(c.drops)))
    return decide(
        True,
        list(best.members),
        f"group failed ({whole.reason}); best passing pair {best.members}: {best.reason}",
        attempts,
    )


def lookup_evaluator(results: Mapping[Any, Mapping[str, float]]) -> SubgroupEvaluator:
    """An evaluator from precomputed results keyed by sub-group (any order: tuple, frozenset, list).

    Raises KeyError naming the sub-group when the gate asks for one that was not precomputed.
    """
    table = {frozenset(group): scores for group, scores in results.items()}

    def evaluate(group: tuple[str, ...]) -> Mapping[str, float]:
        key = frozenset(group)
        if key not in table:
            raise KeyError(f"no precomputed merged scores for sub-group {sorted(group)}")
        return table[key]

    return evaluate
