"""Shortlisted GW for fleets too large for all pairs: a candidate graph from lower bounds, GW on its edges.

At N scorers all pairs cost N(N - 1)/2 solves (~125,000 at N = 500). The plan (:mod:`gw.plan`) only
groups close pairs, so only those need a GW value:

1. **Bounds.** One :class:`~gw.bounds.CostProfile` per cloud, then Mémoli's second lower bound
   (SLB; Mémoli 2011, section 6) for every pair from the profiles (:func:`gw.bounds.bound_matrix`,
   O(K) a pair: all 125,000 pairs in well under a second).
2. **Candidate graph.** Each scorer's ``m`` nearest partners by the bound
   (:func:`gw.mergeability.shortlist`: the rule the trial merges use, ties by id), symmetrised: a
   pair is a candidate when either end names the other. At most ``m * N`` pairs.
3. **GW on candidates only**, batched (:func:`gw.entropic.entropic_gw_batch`), cached under the same
   keys as :func:`gw.matrix.gw_matrix`, so a pair solved by one is reused by the other.
4. **Plan on the sparse matrix**: non-candidate pairs are NaN, which :func:`gw.plan.solve_plan`
   never groups.

Why the bound: it needs nothing but each cloud's law of intra-cloud costs (one O(N^2 d) pass per
cloud, then O(K) a pair), and it is invariant to everything GW is invariant to (rotations,
translations, and scale after normalisation), so it ranks a scorer's family first on the planted
fleets (tests/test_gw_candidates.py). It is too loose to *certify* the ranking, though: a pair left
out has ``GW >= bound``, but across planted families the bound is ~0.005 while entropic GW within a
family is ~0.03 (its blur at epsilon = 0.1), so no scorer's nearest partners are provably inside.

The threshold. ``solve_plan``'s quantile tau over the sparse matrix would be a quantile of the
nearest pairs only. :func:`shortlist_tau` takes the quantile over *all* pairs, counting each pair not
solved as farther than every solved one. Adding pairs only lowers order statistics, so this is never
below the full matrix's tau, and it is exactly the full matrix's tau whenever the pairs up to the
quantile's rank are all candidates (a tight threshold on a fleet whose close pairs the bound finds:
the regime where the shortlist is meant to work). Beyond the candidates' count (e.g. quantile 1.0:
the farthest pair, never a candidate) no solved pair says where the quantile is; then the matrix
completed by the bounds (candidates at their values, the others at their bounds) gives a value never
above the full matrix's tau (every entry is at most the true one), which is used instead.

What it loses is measured, not proved: ``bench/scale.py`` compares the shortlist plan with the
full-matrix plan on a fleet where both fit.

Pure math: numpy and torch; no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import numpy as np
import torch

from .bounds import DEFAULT_LEVELS, bound_matrix, cost_profile
from .clouds import DEFAULT_NORMALISATION, Normalisation, check_cloud, feature_key
from .matrix import _solve_pairs, pair_cache_key, prepare_fleet, solver_config
from .mergeability import shortlist
from .result import GWResult
from .shortlist_size import DEFAULT_CANDIDATES
from .solvers import EntropicOptions

__all__ = ["DEFAULT_CANDIDATES", "CandidateGraph", "ShortlistMatrix", "candidate_graph", "completed_tau",
           "shortlist_gw", "shortlist_tau", "sparse_distances"]

Pair = tuple[int, int]


@dataclass(frozen=True, eq=False)
class CandidateGraph:
    """The pairs worth a GW solve.

    Attributes:
        ids: the scorer ids, in row order.
        bounds: [n, n] symmetric lower bounds on GW (zero diagonal).
        pairs: candidate pairs (i < j, indices into ``ids``), sorted.
        m: partners asked per scorer.
    """

    ids: tuple[str, ...]
    bounds: np.ndarray
    pairs: tuple[Pair, ...]
    m: int

    @property
    def mask(self) -> np.ndarray:
        """Boolean [n, n], True on candidate pairs (both orders); False on the diagonal."""
        n = len(self.ids)
        out = np.zeros((n, n), dtype=bool)
        if self.pairs:
            i, j = np.array(self.pairs).T
            out[i, j] = out[j, i] = True
        return out


def candidate_graph(bounds: np.ndarray, ids: Sequence[str], m: int = DEFAULT_CANDIDATES) -> CandidateGraph:
    """Each scorer's ``m`` nearest partners by ``bounds`` (ties by id), as one symmetric graph."""
    ids = tuple(str(i) for i in ids)
    bounds = np.asarray(bounds, dtype=np.float64)
    if bounds.shape != (len(ids), len(ids)):
        raise ValueError(f"bounds must be [{len(ids)}, {len(ids)}] for {len(ids)} ids, got {bounds.shape}")
    if not np.allclose(bounds, bounds.T, rtol=1e-9, atol=0.0, equal_nan=True):
        raise ValueError("bounds must be symmetric")
    index = {s: n for n, s in enumerate(ids)}
    named = shortlist(bounds, ids, m) if len(ids) > 1 else []
    pairs = sorted(tuple(sorted((index[a], index[b]))) for a, b in named)
    return CandidateGraph(ids=ids, bounds=bounds, pairs=tuple(pairs), m=int(m))


def sparse_distances(graph: CandidateGraph, values: Mapping[Pair, float]) -> np.ndarray:
    """[n, n]: ``values`` on the candidate pairs, NaN (never group) elsewhere, 0 on the diagonal."""
    n = len(graph.ids)
    out = np.full((n, n), np.nan)
    np.fill_diagonal(out, 0.0)
    for i, j in graph.pairs:
        if (i, j) not in values:
            raise ValueError(f"no value for candidate pair ({graph.ids[i]!r}, {graph.ids[j]!r})")
        out[i, j] = out[j, i] = float(values[(i, j)])
    return out


def completed_tau(graph: CandidateGraph, D: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of all pairs with the non-candidates at their bounds (<= the full matrix's tau)."""
    return float(np.quantile(_upper(np.where(graph.mask, np.asarray(D, dtype=np.float64), graph.bounds),
                                    graph, quantile), quantile))


def shortlist_tau(graph: CandidateGraph, D: np.ndarray, quantile: float) -> float:
    """The plan's threshold from the candidates' values: the ``quantile`` of all pairs, non-candidates
    counted as farther than every candidate (numpy's linear interpolation between ranks
    ``floor(q (M - 1))`` and ``ceil(q (M - 1))`` of the M pairs); where that rank is past the
    candidates, :func:`completed_tau`. See the module docstring for when each is exact."""
    values = np.sort(_upper(np.where(graph.mask, np.asarray(D, dtype=np.float64), np.inf), graph, quantile))
    position = quantile * (values.size - 1)
    lo, hi = math.floor(position), math.ceil(position)
    if not math.isfinite(values[hi]):
        return completed_tau(graph, D, quantile)
    return float(values[lo] + (values[hi] - values[lo]) * (position - lo))


def _upper(filled: np.ndarray, graph: CandidateGraph, quantile: float) -> np.ndarray:
    if not 0.0 <= quantile <= 1.0 or math.isnan(quantile):
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    n = len(graph.ids)
    if n < 2:
        raise ValueError("a threshold needs at least two scorers")
    if not np.isfinite(np.asarray(filled)[graph.mask]).all():
        raise ValueError("every candidate pair needs a finite value")
    return filled[np.triu_indices(n, k=1)]


@dataclass(frozen=True, eq=False)
class ShortlistMatrix:
    """GW on a candidate graph.

    Attributes:
        graph: the :class:`CandidateGraph`.
        values: [n, n] GW values on candidate pairs, NaN elsewhere, 0 on the diagonal.
        results: ``(a, b) -> GWResult`` (ids, a < b) for every candidate pair.
        n_computed, n_cached: candidate pairs solved in this call and read from the cache.
    """

    graph: CandidateGraph
    values: np.ndarray
    results: Mapping[tuple[str, str], GWResult]
    n_computed: int
    n_cached: int

    @property
    def ids(self) -> tuple[str, ...]:
        return self.graph.ids


def shortlist_gw(
    features: Mapping[str, Any],
    m: int = DEFAULT_CANDIDATES,
    *,
    options: EntropicOptions | None = None,
    normalisation: Normalisation = DEFAULT_NORMALISATION,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    keys: Mapping[str, str] | None = None,
    cache: MutableMapping[str, GWResult] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    bound_levels: int = DEFAULT_LEVELS,
    batch_size: int = 16,
) -> ShortlistMatrix:
    """Entropic GW on each scorer's ``m`` nearest partners by the SLB (see the module docstring).

    Args mirror :func:`gw.matrix.gw_matrix` (``cache`` uses its keys; a batch's pairs are written
    as soon as they are solved, so an interrupted call resumes). ``progress(stage, done, total)`` is
    called with stage ``"prepare"``, ``"bounds"`` and ``"pairs"``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ids = tuple(sorted(features))
    checked = {i: check_cloud(features[i], name=f"features[{i!r}]") for i in ids}
    content_keys = {i: (keys or {}).get(i) or feature_key(checked[i]) for i in ids}
    report = progress or (lambda stage, done, total: None)
    clouds = prepare_fleet(checked, normalisation=normalisation, device=device, dtype=dtype, keys=content_keys,
                           options=options)
    report("prepare", len(ids), len(ids))
    profiles = []
    for n, i in enumerate(ids):
        profiles.append(cost_profile(clouds[i], n_levels=bound_levels))
        report("bounds", n + 1, len(ids))
    graph = candidate_graph(bound_matrix(profiles), ids, m)

    config = solver_config("entropic", options, normalisation, dtype)
    cache_keys = {(i, j): pair_cache_key(content_keys[ids[i]], content_keys[ids[j]], config) for i, j in graph.pairs}
    found: dict[Pair, GWResult] = {}
    todo: list[Pair] = []
    for pair in graph.pairs:
        hit = cache.get(cache_keys[pair]) if cache is not None else None
        if hit is not None:
            found[pair] = hit
        else:
            todo.append(pair)
    n_cached = len(found)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        for pair, res in zip(batch, _solve_pairs(clouds, ids, batch, "entropic", options)):
            found[pair] = res.without_coupling()
            if cache is not None:
                cache[cache_keys[pair]] = found[pair]
        report("pairs", n_cached + start + len(batch), len(graph.pairs))
    values = sparse_distances(graph, {pair: res.value for pair, res in found.items()})
    results = {(ids[i], ids[j]): res for (i, j), res in found.items()}
    return ShortlistMatrix(graph=graph, values=values, results=results, n_computed=len(todo), n_cached=n_cached)
