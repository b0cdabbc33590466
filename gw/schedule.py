"""Bound-ordered pair skipping: which pairs of a fleet to solve next, and which never need solving.

One rule, used by :func:`gw.matrix.gw_matrix` (in process) and ``workers.ray_gw.compute_distances``
(Ray tasks); :mod:`gw.matrix` explains why it is exact. A :class:`BoundSchedule` holds the pairs not
yet solved (in ascending order of their lower bound when skipping) and the values known so far:

* the cutoff is the explicit ``skip_tau``, or for ``skip_tau_quantile = q`` the value ``U`` of
  :func:`quantile_cutoff` over the known values (kept exactly, incrementally: ``U`` is the largest
  of the ``hi + 1`` smallest known values, ``hi = ceil(q (m - 1))``), +inf without skipping;
* :meth:`BoundSchedule.next_batch` drops the pending pairs whose bound reaches the cutoff and takes
  the next ``size`` pairs from the front, as a :class:`Batch` that carries the cutoff it was cut at;
* with ``third_bound``, a batch also names the pairs worth a third lower bound (once a cutoff is
  finite, and only if the second bound is within a factor :data:`TLB_REACH` of it; the third bound
  rarely exceeds 4x the second). Whoever has the clouds computes those bounds;
  :meth:`Batch.split` (pure) says which pairs of the batch are then skipped and which are solved,
  and :meth:`BoundSchedule.settle` records the same outcome in the schedule.

A cutoff only falls as values arrive, so a batch solved (or skipped) by the cutoff it was cut at,
while other batches are still running, stays exact: it only skips later than it could have.

Pure: numpy only; no I/O.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["TLB_REACH", "Batch", "BoundSchedule", "check_skipping", "quantile_cutoff"]

Pair = tuple[int, int]
TLB_REACH = 4.0


def quantile_cutoff(known_values: Sequence[float], n_pairs: int, quantile: float) -> float:
    """``U``: the value at rank ``ceil(q (m - 1))`` of the known values padded with +inf to m pairs.

    Pairs whose lower bound is ``>= U`` never need computing for a q-quantile threshold (see
    :mod:`gw.matrix`). +inf while fewer values than that rank are known.
    """
    if n_pairs < 1:
        raise ValueError("n_pairs must be >= 1")
    hi = math.ceil(quantile * (n_pairs - 1))
    known = np.sort(np.asarray(known_values, dtype=np.float64))
    return float(known[hi]) if known.size > hi else math.inf


def check_skipping(skip_tau: float | None, skip_tau_quantile: float | None) -> None:
    """Raise ValueError unless at most one of an explicit (finite) tau and a quantile in [0, 1] is given."""
    if skip_tau is not None and skip_tau_quantile is not None:
        raise ValueError("give skip_tau or skip_tau_quantile, not both")
    if skip_tau is not None and not math.isfinite(float(skip_tau)):
        raise ValueError(f"skip_tau must be finite, got {skip_tau}")
    if skip_tau_quantile is not None and not 0.0 <= float(skip_tau_quantile) <= 1.0:
        raise ValueError(f"skip_tau_quantile must be in [0, 1], got {skip_tau_quantile}")


@dataclass(frozen=True)
class Batch:
    """Pairs to solve next, the cutoff they were cut at, and those worth a third bound first.

    Attributes:
        pairs: the pairs, in schedule order.
        cutoff: the cutoff when the batch was cut (+inf without skipping).
        bounds: pair -> its bound so far, for the pairs in ``tighten``.
        tighten: the pairs to compute a third lower bound for before solving.
    """

    pairs: tuple[Pair, ...]
    cutoff: float = math.inf
    bounds: Mapping[Pair, float] = field(default_factory=dict)
    tighten: tuple[Pair, ...] = ()

    def split(self, third_bounds: Mapping[Pair, float]) -> tuple[list[Pair], dict[Pair, float]]:
        """(pairs to solve, {skipped pair: its bound}) once the third bounds of ``tighten`` are known."""
        solve, skipped = [], {}
        for pair in self.pairs:
            if pair in third_bounds:
                bound = max(self.bounds[pair], float(third_bounds[pair]))
                if bound >= self.cutoff:
                    skipped[pair] = bound
                    continue
            solve.append(pair)
        return solve, skipped


class BoundSchedule:
    """The pairs of a fleet not solved yet, which to solve next and which to skip (see the module docstring).

    Args:
        pending: the pairs still to decide (e.g. those not in a cache).
        n_pairs: all pairs of the fleet (the m of the quantile).
        known: values already known (cached pairs).
        bounds: pair -> lower bound for every pending pair; needed when skipping.
        skip_tau, skip_tau_quantile: the threshold (at most one; neither: nothing is skipped).
        third_bound: name the pairs worth a third lower bound in each batch.
    """

    def __init__(self, pending: Sequence[Pair], n_pairs: int, known: Iterable[float] = (), *,
                 bounds: Mapping[Pair, float] | None = None, skip_tau: float | None = None,
                 skip_tau_quantile: float | None = None, third_bound: bool = False) -> None:
        check_skipping(skip_tau, skip_tau_quantile)
        self.skipping = skip_tau is not None or skip_tau_quantile is not None
        if self.skipping and bounds is None and pending:
            raise ValueError("skipping needs a bound for every pending pair")
        self.bounds: dict[Pair, float] = dict(bounds or {})
        order = sorted(pending, key=lambda p: (self.bounds[p], p)) if self.skipping else list(pending)
        self._pending = deque(order)
        self.skipped: dict[Pair, float] = {}  # pair -> the bound it is recorded at
        self.third_bound = third_bound
        self._tau = None if skip_tau is None else float(skip_tau)
        self._rank = None  # hi + 1: how many of the smallest known values decide U
        if skip_tau_quantile is not None:
            self._rank = math.ceil(float(skip_tau_quantile) * (max(n_pairs, 1) - 1)) + 1
        self._smallest: list[float] = []  # max-heap (negated) of the `rank` smallest known values
        self.add(known)

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def cutoff(self) -> float:
        """The bound from which a pair is skipped: tau, the current ``U``, or +inf without skipping."""
        if self._tau is not None:
            return self._tau
        if self._rank is None or len(self._smallest) < self._rank:
            return math.inf
        return -self._smallest[0]

    def add(self, values: Iterable[float]) -> None:
        """Record solved values (they lower ``U`` for a quantile threshold)."""
        if self._rank is None:
            return
        for value in values:
            value = float(value)
            if len(self._smallest) < self._rank:
                heapq.heappush(self._smallest, -value)
            elif value < -self._smallest[0]:
                heapq.heapreplace(self._smallest, -value)

    def drop_reaching(self) -> None:
        """Skip the pending pairs whose bound reaches the cutoff (the tail of the bound order)."""
        if not self.skipping:
            return
        cutoff = self.cutoff
        while self._pending and self.bounds[self._pending[-1]] >= cutoff:
            pair = self._pending.pop()
            self.skipped[pair] = self.bounds[pair]

    def next_batch(self, size: int) -> Batch:
        """Drop what reaches the cutoff, then the next ``size`` pairs (empty when none are left)."""
        if size < 1:
            raise ValueError("size must be >= 1")
        self.drop_reaching()
        pairs = tuple(self._pending.popleft() for _ in range(min(size, len(self._pending))))
        cutoff = self.cutoff if self.skipping else math.inf
        tighten: tuple[Pair, ...] = ()
        if self.skipping and self.third_bound and math.isfinite(cutoff):
            tighten = tuple(p for p in pairs if self.bounds[p] * TLB_REACH >= cutoff)
        return Batch(pairs, cutoff, {p: self.bounds[p] for p in tighten}, tighten)

    def settle(self, batch: Batch, third_bounds: Mapping[Pair, float]) -> list[Pair]:
        """Record ``batch``'s third bounds (tightened bounds, pairs they skip); return the pairs to solve."""
        solve, skipped = batch.split(third_bounds)
        for pair, value in third_bounds.items():
            self.bounds[pair] = max(self.bounds[pair], float(value))
        self.skipped.update(skipped)
        return solve
