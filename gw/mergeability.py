"""Measured pair mergeability: how well a merged backbone keeps each member's scoring (issue 11).

A trial merge of two scorers is scored per member on all of its item's train and validation responses
(about 80 per item on Beetle; never the test split) by one of three signals (:data:`TRIAL_SIGNALS`), all
stored with every trial merge; the planner reads one (`ConsolidateConfig.trial_signal`, default refit):

- ``"agreement"`` (no labels): the mean over the responses of the probability mass the member's own
  scorer and the merged model put on the same outcomes, ``sum_c min(p_own, p_merged)`` for one-of-C
  items (1 − total variation), ``1 − |p_own − p_merged|`` averaged over labels for multi-label items.
  1 means the merge left the item's scoring unchanged. It measures how far the merge moves the answers,
  not in which direction, and its scale is the item's: a multi-label item whose probabilities sit near
  0 and 1 agrees more with anything than a 3-way item does, so the worse member of a mixed pair is
  always the 3-way one, and such a pair looks as good as that member's best pairing.
- ``"true_label"``: the class-balanced mean change of the probability given to the true labels,
  merged − own (:func:`gw.gate.balanced_change`, the statistic the gate bounds on validation answers).
  It is signed (a merge that helps an item scores above 0) and on one scale for every item.
- ``"refit"``: the same change, between heads *refitted* on the merged backbone and on the member's own
  backbone, each cross-fitted (:func:`gw.head_fit.crossfit_probabilities`: every answer scored by a
  head fitted on the other folds). The product's merge refits heads; the two signals above keep the
  own head, so they cannot see a merge whose backbone serves the item well once its head is refit (the
  demo's topics: with own heads a merge within a topic costs about as much as one across; with refit
  heads far less, workers/demo_data.py). On Beetle it ranks pairs unlike the other two (Spearman with
  agreement −0.09 over all 1,081 pairs of a fold, docs/results/mergeability.md), and its plan is not told
  apart from theirs.

Why not validation macro F1: Beetle items have about 12 validation answers in the 3-fold split, where
macro F1 moves by a whole class's worth with one answer (the gate's argument, gw/gate.py). The signals
are continuous per response and use about 6x the answers, so their noise falls as 1/sqrt(n) of those.

A pair's outcome is its worse member's signal: the gate judges members one by one, and a group is
only worth planning if every member keeps its scoring. The planner reads ``1 − outcome`` as a distance
(unmeasured pairs are NaN: never grouped), so :func:`gw.plan.solve_plan` packs it as it packs GW
distances.

Which pairs to measure: each scorer's ``m`` nearest partners by a cheap signal (:func:`shortlist`),
at most ``m * N`` pairs for N scorers (fewer when neighbourhoods overlap).

Pure math: numpy only (the refit signal's cross-fitting is gw.head_fit's, called by workers.pair_jobs).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gw.gate import Evidence, balanced_change

DEFAULT_SHORTLIST = 5
"""Partners measured per scorer (m)."""

TRIAL_SIGNALS = ("agreement", "true_label", "refit")
"""What a trial merge's members are scored by (module docstring)."""


def agreement(reference: np.ndarray, merged: np.ndarray, task: str) -> float:
    """Mean probability overlap of two models' outputs on the same responses (1 = identical).

    `reference`, `merged`: [n, C] class probabilities (rows summing to 1) or, for ``task ==
    "multilabel"``, [n, L] per-label probabilities."""
    p, q = np.asarray(reference, dtype=np.float64), np.asarray(merged, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2 or len(p) == 0:
        raise ValueError(f"agreement needs two [n, C] arrays of one shape with n >= 1, got {p.shape} and {q.shape}")
    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        raise ValueError("agreement: probabilities must be finite")
    if task == "multilabel":
        return float(np.mean(1.0 - np.abs(p - q)))
    return float(np.mean(np.minimum(p, q).sum(axis=1)))


def true_label_change(own: Evidence, merged: Evidence) -> float:
    """The ``"true_label"`` signal: the class-balanced mean change, merged − own, of the probability
    given to the true labels of the same answers (the gate's statistic, without its bound)."""
    return balanced_change(own, merged)[0]


def pair_outcome(scores: Mapping[str, float]) -> float:
    """A trial merge's outcome (of a pair, or of a planned group): its worst member's signal."""
    if len(scores) < 2:
        raise ValueError(f"a trial merge's outcome needs at least two members, got {sorted(scores)}")
    return float(min(scores.values()))


def split_weak_groups(groups: Sequence[Sequence[str]], group_outcomes: Mapping[tuple[str, ...], float],
                      pair_outcomes: Mapping[tuple[str, str], float], tau: float
                      ) -> tuple[list[tuple[str, ...]], dict[tuple[str, ...], tuple[str, ...]]]:
    """Check each planned group of 3+ by its own trial merge: the planner scored it by its pairs, but
    a trio's merge can cost a member more than either pair did. A group whose outcome fails the pairs'
    threshold (``1 − outcome >= tau``) is replaced by its best measured pair; its other members go on
    their own. Returns (the groups, {split group: the pair kept})."""
    kept, split = [], {}
    for group in groups:
        group = tuple(sorted(group))
        if len(group) < 3 or 1.0 - group_outcomes[group] < tau:
            kept.append(group)
            continue
        pairs = [(pair_outcomes[p], p) for p in ((a, b) for n, a in enumerate(group) for b in group[n + 1:])
                 if p in pair_outcomes]
        best = max(pairs)[1] if pairs else None
        split[group] = best
        if best is not None:
            kept.append(best)
    return kept, split


def shortlist(D: np.ndarray, ids: Sequence[str], m: int = DEFAULT_SHORTLIST) -> list[tuple[str, str]]:
    """Each scorer's `m` nearest partners by the cheap signal `D` (smaller = closer), as unordered pairs.

    Unknown (NaN / inf) entries are never chosen. Ties go to the earlier id, so the list is
    deterministic; pairs come sorted, each as (smaller id, larger id). At most ``m * len(ids)``."""
    D = np.asarray(D, dtype=np.float64)
    n = len(ids)
    if D.shape != (n, n):
        raise ValueError(f"D must be [{n}, {n}] for {n} ids, got {D.shape}")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"the shortlist size m must be an integer >= 1, got {m!r}")
    order = np.argsort(np.asarray(ids))  # ties by id, whatever the row order
    pairs = set()
    for i in range(n):
        row = D[i, order]
        candidates = [(row[r], ids[j]) for r, j in enumerate(order) if j != i and np.isfinite(row[r])]
        candidates.sort(key=lambda c: c[0])  # stable: equal distances keep id order
        for _, other in candidates[:m]:
            pairs.add(tuple(sorted((ids[i], other))))
    return sorted(pairs)


def outcome_distances(outcomes: Mapping[tuple[str, str], float], ids: Sequence[str]) -> np.ndarray:
    """The planner's matrix: ``1 − outcome`` for measured pairs, NaN (never group) elsewhere, 0 diagonal."""
    index = {i: n for n, i in enumerate(ids)}
    D = np.full((len(ids), len(ids)), np.nan)
    np.fill_diagonal(D, 0.0)
    for (a, b), value in outcomes.items():
        if a not in index or b not in index or a == b:
            raise ValueError(f"outcome for pair ({a!r}, {b!r}) does not name two of the planned scorers")
        if not np.isfinite(value):
            continue
        D[index[a], index[b]] = D[index[b], index[a]] = 1.0 - float(value)
    return D
