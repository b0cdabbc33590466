"""The pairwise GW matrix of a fleet: prepared once per cloud, cached per pair, skipped by bounds.

:func:`gw_matrix` takes ``{id: features}`` and returns a :class:`GWMatrix`: the symmetric values
(diagonal 0), each pair's :class:`~gw.solvers.GWResult`, and which pairs a lower bound skipped.

Caching. A finished pair is stored in the caller's ``cache`` (any ``MutableMapping[str, GWResult]``)
under :func:`pair_cache_key`: the two clouds' content keys (:func:`~gw.clouds.feature_key` of the
raw features, or the caller's ``keys``), order-free, plus every setting that changes the value
(solver, its options, normalisation, dtype). Adding one scorer to a fleet of n computes n new pairs;
changing one scorer's features recomputes only its n - 1 pairs. Each pair is always solved in a
canonical order (by key), so a value never depends on which id came first.

Skipping (lower bounds, :mod:`gw.bounds`): a pair whose bound is at least the grouping threshold
``tau`` can never be grouped (the planner never groups ``D >= tau``), so its value is recorded as
the bound and it is flagged in ``skipped``; no plan that uses ``tau`` changes. The bound is
Mémoli's second lower bound for every pair (from one profile per cloud, O(K) a pair), optionally
tightened by his third lower bound for the pairs that are about to be solved (``third_bound``).

* explicit ``skip_tau``: skip every pair with ``bound >= skip_tau``.
* ``skip_tau_quantile = q`` (tau is the q-quantile of the off-diagonal values, as in
  :func:`gw.plan.solve_plan`: numpy's linear interpolation between the order statistics at ranks
  ``lo = floor(q (m - 1))`` and ``hi = ceil(q (m - 1))`` of the m pairs). Pairs are computed in
  ascending order of their bound (cached pairs count as computed). Let ``U`` be the rank-``hi``
  value of {computed values} padded with +inf for every pair not computed yet; ``U`` only falls
  as pairs are computed, and ``U >= tau`` always. A pair whose bound reaches the current ``U`` is
  dropped (its bound then also reaches every later ``U``). At the end every dropped pair has a
  true value ``>= bound >= U``, so the order statistics at ranks ``lo`` and ``hi`` are among the
  computed values: recording the dropped pairs at their bounds (all ``>= U >= tau``) leaves the
  quantile, hence tau, exactly what the full matrix gives, with every pair below tau computed.
  The result carries that tau; passing it, or the same quantile, to the planner yields the plan of
  the full matrix. (Exactly, because a pair's value is bit-for-bit the same whatever is computed
  alongside it; see :mod:`gw.entropic`.) Plans that read every distance (e.g. average linkage)
  need the full matrix: do not skip for them.

Fan-out. A distributed layer can do the same with :func:`prepare_fleet` (prepare once per cloud),
:func:`~gw.solvers.gw_pair` or :func:`~gw.entropic.entropic_gw_batch` (pairs),
:func:`pair_cache_key` / :func:`solver_config` (cache keys), :func:`gw.bounds.bound_matrix` /
:func:`gw.bounds.third_lower_bound` (bounds) and :class:`gw.schedule.BoundSchedule` (the order
and the skipping above, batch by batch; :func:`gw_matrix` runs the same schedule).

Pure math: numpy, torch, POT; no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import numpy as np
import torch

from .bounds import DEFAULT_LEVELS, bound_matrix, cost_profile, row_profiles, third_lower_bound
from .clouds import (DEFAULT_NORMALISATION, Normalisation, PreparedCloud, check_cloud, feature_key, prepare,
                     resolve_device)
from .entropic import SOLVER_REVISION, SQ_COSTS_MAX_POINTS
from .keys import json_key
from .schedule import BoundSchedule, check_skipping, quantile_cutoff
from .solvers import SOLVERS, EntropicOptions, GWResult, entropic_gw_batch, exact_gw, use_dense

__all__ = ["GWMatrix", "check_skipping", "gw_matrix", "pair_cache_key", "prepare_fleet", "quantile_cutoff",
           "solver_config"]

Progress = Callable[[int, int], None]


@dataclass(frozen=True, eq=False)
class GWMatrix:
    """Pairwise GW values of a fleet.

    Attributes:
        ids: the ids, in row order (sorted).
        values: [n, n] symmetric float64, diagonal 0; a skipped pair holds its lower bound.
        results: ``(a, b) -> GWResult`` for every pair with a value (computed or cached), a < b.
        skipped: pairs (a < b) whose value is only their lower bound (never grouped under ``tau``).
        bounds: [n, n] lower bounds when skipping was on, else None.
        tau: the skipping threshold used (explicit, or the exact quantile), else None.
        tau_quantile: the quantile asked for, else None.
        solver: the solver's name.
        n_computed: pairs solved in this call; n_cached: pairs read from the cache.
    """

    ids: tuple[str, ...]
    values: np.ndarray
    results: Mapping[tuple[str, str], GWResult]
    skipped: frozenset[tuple[str, str]]
    bounds: np.ndarray | None = None
    tau: float | None = None
    tau_quantile: float | None = None
    solver: str = "entropic"
    n_computed: int = 0
    n_cached: int = 0
    keys: Mapping[str, str] = field(default_factory=dict)

    def value(self, a: str, b: str) -> float:
        i, j = self.ids.index(a), self.ids.index(b)
        return float(self.values[i, j])

    @property
    def n_pairs(self) -> int:
        n = len(self.ids)
        return n * (n - 1) // 2

    @property
    def skipped_fraction(self) -> float:
        return len(self.skipped) / self.n_pairs if self.n_pairs else 0.0

    def to_records(self) -> list[dict[str, Any]]:
        """Long form, one row per pair (a < b): ids, value, skipped, bound, and the result's fields."""
        rows = []
        n = len(self.ids)
        for i in range(n):
            for j in range(i + 1, n):
                a, b = self.ids[i], self.ids[j]
                row: dict[str, Any] = {"a": a, "b": b, "value": float(self.values[i, j]),
                                       "skipped": (a, b) in self.skipped,
                                       "bound": None if self.bounds is None else float(self.bounds[i, j]),
                                       "key_a": self.keys.get(a), "key_b": self.keys.get(b)}
                res = self.results.get((a, b))
                if res is not None:
                    row.update({k: v for k, v in res.to_dict().items() if k != "value"})
                rows.append(row)
        return rows


def pair_cache_key(key_a: str, key_b: str, config: Mapping[str, Any]) -> str:
    """Cache key of a pair: both content keys (order-free) and every setting that changes the value."""
    first, second = sorted((str(key_a), str(key_b)))
    return "gw:" + json_key({"a": first, "b": second, "config": dict(config)}, length=40)


def solver_config(solver: str, options: EntropicOptions | None, normalisation: str, dtype: torch.dtype) -> dict[str, Any]:
    """The settings that make up a pair's cache key (see :func:`pair_cache_key`)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    config: dict[str, Any] = {"solver": solver, "normalisation": normalisation}
    if solver == "entropic":
        config["options"] = (options or EntropicOptions()).to_dict()
        config["dtype"] = str(dtype)
        config["revision"] = SOLVER_REVISION
    return config


def prepare_fleet(
    features: Mapping[str, Any],
    *,
    normalisation: Normalisation = DEFAULT_NORMALISATION,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    keys: Mapping[str, str] | None = None,
    options: EntropicOptions | None = None,
) -> dict[str, PreparedCloud]:
    """Prepare every cloud once: validated, centred, normalised, keyed by content, with what the
    entropic solver (with ``options``) will reuse across pairs: principal coordinates, k-means
    coarsening, or dense costs."""
    opts = options or EntropicOptions()
    if not features:
        return {}
    first = next(iter(features.values()))
    target = resolve_device(device, first)
    out = {}
    for scorer_id in sorted(features):
        X = check_cloud(features[scorer_id], name=f"features[{scorer_id!r}]")
        key = (keys or {}).get(scorer_id) or feature_key(X)
        cloud = prepare(X, normalisation=normalisation, device=target, dtype=dtype, key=key,
                        name=f"features[{scorer_id!r}]")
        if opts.rank_tol > 0:
            cloud = cloud.with_principal(opts.rank_tol)
            if cloud.n_points <= SQ_COSTS_MAX_POINTS:
                cloud = cloud.with_sq_costs()
        elif use_dense(cloud, cloud, opts.representation):
            cloud = cloud.with_dense_costs()
        out[scorer_id] = cloud.with_coarse() if opts.init == "multiscale" else cloud
    return out


def gw_matrix(
    features: Mapping[str, Any],
    *,
    solver: str = "entropic",
    options: EntropicOptions | None = None,
    normalisation: Normalisation = DEFAULT_NORMALISATION,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    keys: Mapping[str, str] | None = None,
    cache: MutableMapping[str, GWResult] | None = None,
    progress: Progress | None = None,
    skip_tau: float | None = None,
    skip_tau_quantile: float | None = None,
    bound_levels: int = DEFAULT_LEVELS,
    third_bound: bool = True,
    batch_size: int = 16,
) -> GWMatrix:
    """Pairwise GW between feature clouds.

    Args:
        features: id -> [N_id, d_id] features (>= 2 finite points each; sizes and dims may differ).
        solver: ``"entropic"`` (ours; batched) or ``"exact"`` (POT).
        options: entropic solver settings.
        normalisation, device, dtype: see :func:`gw.clouds.prepare`.
        keys: optional id -> content key (e.g. the feature file's hash); default
            :func:`~gw.clouds.feature_key` of the features.
        cache: optional mapping :func:`pair_cache_key` -> :class:`GWResult`; read, and written
            with every newly computed pair.
        progress: called as ``progress(done, total)`` after each batch of pairs.
        skip_tau: skip pairs whose lower bound is >= this threshold.
        skip_tau_quantile: skip with tau = this quantile of the off-diagonal values (exactly; see
            the module docstring). Give at most one of the two.
        bound_levels: resolution of the lower bounds (see :mod:`gw.bounds`).
        third_bound: also try Mémoli's third lower bound (2-4x tighter than the second, and dearer:
            an N x M problem a pair plus one row profile per cloud) on each pair about to be solved
            once a cutoff is known and its second bound is within a factor 4 of it. On the planted
            benchmark fleet (60 x 500 points) it skips 26% of the pairs instead of 15%.
        batch_size: pairs per batched solver call (a pair's value does not depend on its batch
            mates; on CPU bit for bit).

    Returns:
        A :class:`GWMatrix`.
    """
    check_skipping(skip_tau, skip_tau_quantile)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    config = solver_config(solver, options, normalisation, dtype)
    ids = tuple(sorted(features))
    checked = {i: check_cloud(features[i], name=f"features[{i!r}]") for i in ids}
    content_keys = {i: (keys or {}).get(i) or feature_key(checked[i]) for i in ids}
    n = len(ids)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    values = np.zeros((n, n))
    results: dict[tuple[str, str], GWResult] = {}
    cache_keys = {(i, j): pair_cache_key(content_keys[ids[i]], content_keys[ids[j]], config) for i, j in pairs}

    def record(i: int, j: int, res: GWResult) -> None:
        values[i, j] = values[j, i] = res.value
        results[(ids[i], ids[j])] = res

    n_cached = 0
    todo = []
    for i, j in pairs:
        hit = cache.get(cache_keys[(i, j)]) if cache is not None else None
        if hit is not None:
            record(i, j, hit)
            n_cached += 1
        else:
            todo.append((i, j))

    # Only clouds with a pair left to solve are prepared (a rerun with nothing new does ~nothing).
    needed = sorted({k for ij in todo for k in ij})
    clouds = prepare_fleet({ids[k]: checked[ids[k]] for k in needed}, normalisation=normalisation,
                           device=device, dtype=dtype, keys=content_keys,
                           options=options if solver == "entropic" else EntropicOptions(rank_tol=0.0, init="product"))
    bounds = None
    tau = None
    skipping = skip_tau is not None or skip_tau_quantile is not None
    pair_bounds = None
    if skipping and todo:
        bounds = np.zeros((n, n))
        sub = bound_matrix([cost_profile(clouds[ids[k]], n_levels=bound_levels) for k in needed])
        bounds[np.ix_(needed, needed)] = sub
        pair_bounds = {ij: float(bounds[ij]) for ij in todo}
    known = [values[ij] for ij in pairs if (ids[ij[0]], ids[ij[1]]) in results]
    schedule = BoundSchedule(todo, len(pairs), known, bounds=pair_bounds, skip_tau=skip_tau,
                             skip_tau_quantile=skip_tau_quantile, third_bound=third_bound)
    row_laws: dict[str, Any] = {}

    def third_bound_of(i: int, j: int) -> float:
        for k in (i, j):
            if ids[k] not in row_laws:
                row_laws[ids[k]] = row_profiles(clouds[ids[k]])
        return third_lower_bound(row_laws[ids[i]], row_laws[ids[j]])

    done = n_cached
    total = len(pairs)
    n_computed = 0
    while len(schedule):
        batch = schedule.next_batch(batch_size)
        if not batch.pairs:
            break
        # Tighter (and dearer) bound, only for the pairs the schedule names (see gw.schedule).
        solve = schedule.settle(batch, {ij: third_bound_of(*ij) for ij in batch.tighten})
        if not solve:
            continue
        for (i, j), res in zip(solve, _solve_pairs(clouds, ids, solve, solver, options)):
            record(i, j, res)
            if cache is not None:
                cache[cache_keys[(i, j)]] = res.without_coupling()
        schedule.add(values[ij] for ij in solve)
        n_computed += len(solve)
        done += len(solve)
        if progress is not None:
            progress(done, total)

    for (i, j), bound in schedule.bounds.items():  # third bounds included
        bounds[i, j] = bounds[j, i] = bound
    skipped = schedule.skipped
    for (i, j), bound in skipped.items():
        values[i, j] = values[j, i] = bound
    if skip_tau is not None:
        tau = float(skip_tau)
    elif skip_tau_quantile is not None and pairs:
        tau = float(np.quantile(values[np.triu_indices(n, k=1)], float(skip_tau_quantile)))
    if skipped and progress is not None:
        progress(total, total)
    return GWMatrix(
        ids=ids, values=values, results=results,
        skipped=frozenset((ids[i], ids[j]) for i, j in skipped),
        bounds=bounds, tau=tau,
        tau_quantile=None if skip_tau_quantile is None else float(skip_tau_quantile),
        solver=solver, n_computed=n_computed, n_cached=n_cached,
        keys=content_keys,
    )


def _solve_pairs(
    clouds: Mapping[str, PreparedCloud],
    ids: Sequence[str],
    batch: Sequence[tuple[int, int]],
    solver: str,
    options: EntropicOptions | None,
) -> list[GWResult]:
    """Solve a batch of pairs, each in canonical order (by content key, then id)."""
    ordered = []
    for i, j in batch:
        a, b = clouds[ids[i]], clouds[ids[j]]
        ordered.append((a, b) if (a.key, ids[i]) <= (b.key, ids[j]) else (b, a))
    if solver == "entropic":
        return entropic_gw_batch(ordered, options)
    return [exact_gw(a, b) for a, b in ordered]
