"""The pairwise GW matrix of a fleet as bounded Ray tasks, cached per pair in the store.

Each finished pair is stored under `gw/pairs/<options>/<key_a>__<key_b>.json`, keyed by the content
keys of the two feature files (which carry checkpoint, data and extraction hashes) and the solver
options, so adding one scorer to a fleet of n computes only its n new pairs and a rerun with nothing
changed computes none. Missing pairs go to Ray in chunks (a chunk shares one load and one preparation
of each cloud); at most `max_in_flight` chunks run at once and every wait has a timeout.
The result is written as the long-form distances table of docs/architecture.md §3.4 (plus a `skipped` column).

Skipping by lower bounds: the schedule of `gw.matrix.gw_matrix` (`gw.schedule.BoundSchedule`; see
`gw.matrix` for why it is exact). With `skip_tau` or `skip_tau_quantile`, each feature set gets one
cost profile (`gw.bounds`), computed where the features are and cached under
`gw/profiles/<hash of feature key + profile settings>.json`. The uncached pairs are submitted in
ascending order of their bound; pairs not yet submitted whose bound reaches the cutoff (explicit
tau, or the quantile's over the known values, cached pairs included, after each finished chunk) are
dropped. With `third_bound` a chunk also carries the pairs worth Mémoli's third lower bound, which
the task computes from the clouds it has loaded, before solving, skipping those it lifts to the
chunk's cutoff. A dropped pair is recorded at its bound (`skipped` True, solver "bound") and never
written to the pair cache, so a later run with another tau can still solve it.

Shortlist (`candidates = m`, issue 13): for fleets too large for all pairs, only each scorer's m
nearest partners by the same cost profiles' bound are solved (`gw.candidates`); every other pair is
recorded with value NaN (`skipped` True, solver "not-shortlisted": never grouped by the planner) and
the result's `tau` is `gw.candidates.shortlist_tau` at `candidates_tau_quantile`.
"""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

import torch

from gw.bounds import (DEFAULT_BINS, DEFAULT_LEVELS, CostProfile, bound_matrix, cost_profile, row_profiles,
                       third_lower_bound)
from gw.candidates import candidate_graph, shortlist_tau, sparse_distances
from gw.clouds import PreparedCloud, prepare
from gw.keys import content_key
from gw.matrix import pair_cache_key as gw_pair_key
from gw.matrix import solver_config
from gw.schedule import Batch, BoundSchedule, check_skipping
from gw.solvers import EntropicOptions, entropic_gw_batch, gw_pair
from infra.storage import Store
from workers.extract import FeatureRef, read_features
from workers.ray_jobs import run_all as _run_all
from workers.ray_jobs import runner as _make_runner

PAIRS_PREFIX = "gw/pairs"
PROFILES_PREFIX = "gw/profiles"
DISTANCES_PREFIX = "gw/distances"
# Everything a profile depends on besides the features (prepare's defaults, as compute_chunk uses them).
PROFILE_SETTINGS = {"normalisation": "mean", "dtype": "float32", "n_levels": DEFAULT_LEVELS, "n_bins": DEFAULT_BINS}


def _short(text: str) -> str:
    return content_key(text, length=20)


def pair_cache_key(solver: str, options: EntropicOptions | None, a: FeatureRef, b: FeatureRef) -> str:
    """Store key of a finished pair: gw.matrix's content key (both feature keys, solver settings)."""
    config = solver_config(solver, options, "mean", torch.float32)
    return f"{PAIRS_PREFIX}/{gw_pair_key(a.key, b.key, config).removeprefix('gw:')}.json"


def profile_cache_key(ref: FeatureRef) -> str:
    """Store key of a feature set's cost profile: its feature key and the profile settings."""
    return f"{PROFILES_PREFIX}/{_short(json.dumps({'features': ref.key, **PROFILE_SETTINGS}, sort_keys=True))}.json"


def _prepared(store: Store, ref: FeatureRef) -> PreparedCloud:
    """A feature set prepared exactly as the solver sees it."""
    return prepare(np.array(read_features(store, ref)[1]), key=ref.key, name=ref.scorer_id)


def compute_profile(store: Store, ref: FeatureRef, cache_key: str) -> dict:
    """The cost profile of one feature set, written under `cache_key`; returns the stored record."""
    profile = cost_profile(_prepared(store, ref), n_levels=PROFILE_SETTINGS["n_levels"],
                           n_bins=PROFILE_SETTINGS["n_bins"])
    record = {"key": ref.key, **PROFILE_SETTINGS, "lower": profile.lower.tolist(), "upper": profile.upper.tolist()}
    store.write_json(cache_key, record)
    return record


def _as_profile(record: dict) -> CostProfile:
    return CostProfile(lower=np.asarray(record["lower"], dtype=np.float64),
                       upper=np.asarray(record["upper"], dtype=np.float64))


def compute_chunk(store: Store, refs: Sequence[FeatureRef], batch: Batch, solver: str,
                  options: EntropicOptions | None, cache_keys: Mapping[tuple[int, int], str]) -> dict:
    """Solve a batch of pairs (indices into `refs`), write each under its cache key.

    First the third lower bound of the pairs in `batch.tighten`; `batch.split` says which of them
    are then skipped. Returns {"records": one per solved pair, in batch order, "third_bounds":
    {pair: bound}}. The driver names the cache keys, so reader and writer agree even if a worker
    runs other code.
    """
    clouds: dict[int, PreparedCloud] = {}

    def cloud(i: int) -> PreparedCloud:
        if i not in clouds:
            clouds[i] = _prepared(store, refs[i])
        return clouds[i]

    third_bounds = {}
    if batch.tighten:
        rows = {i: row_profiles(cloud(i)) for i in sorted({i for pair in batch.tighten for i in pair})}
        third_bounds = {(i, j): third_lower_bound(rows[i], rows[j]) for i, j in batch.tighten}
    pairs, _ = batch.split(third_bounds)
    # Solve each pair in a canonical order (by content key) so its value never depends on id order.
    ordered = [(i, j) if refs[i].key <= refs[j].key else (j, i) for i, j in pairs]
    if not ordered:
        results = []
    elif solver == "entropic":
        results = entropic_gw_batch([(cloud(i), cloud(j)) for i, j in ordered], options)
    else:
        results = [gw_pair(cloud(i), cloud(j), solver=solver) for i, j in ordered]
    records = []
    for (i, j), result in zip(pairs, results):
        # n_a / n_b follow a / b, not the canonical order the solver saw.
        record = {"a": refs[i].scorer_id, "b": refs[j].scorer_id, "key_a": refs[i].key, "key_b": refs[j].key,
                  **result.to_dict(), "n_a": clouds[i].n_points, "n_b": clouds[j].n_points}
        store.write_json(cache_keys[(i, j)], record)
        records.append(record)
    return {"records": records, "third_bounds": third_bounds}


# --------------------------------------------------------------------------------------------------
# Skipping by lower bounds
# --------------------------------------------------------------------------------------------------


def load_profiles(store: Store, refs: Sequence[FeatureRef], needed: Sequence[int], make_runner: Callable
                  ) -> tuple[dict[int, CostProfile], int]:
    """Cost profiles of `refs[needed]`: cached ones read, the others computed (as tasks); (profiles, computed)."""
    profiles, missing = {}, []
    for i in needed:
        key = profile_cache_key(refs[i])
        if (profile := store.read_cached(key)) is not None:
            profiles[i] = _as_profile(profile)
        else:
            missing.append(i)
    if missing:
        runner, window = make_runner(compute_profile, (store,))
        _run_all(runner, window, [(i, refs[i], profile_cache_key(refs[i])) for i in missing],
                 lambda i, record: profiles.__setitem__(i, _as_profile(record)))
    return profiles, len(missing)


def pair_bounds(profiles: Mapping[int, CostProfile], pairs: Sequence[tuple[int, int]]) -> dict[tuple[int, int], float]:
    """Lower bound of each pair (indices into the fleet) from the profiles of its two feature sets."""
    order = sorted(profiles)
    at = {i: n for n, i in enumerate(order)}
    matrix = bound_matrix([profiles[i] for i in order])
    return {(i, j): float(matrix[at[i], at[j]]) for i, j in pairs}


def _unsolved_record(refs: Sequence[FeatureRef], i: int, j: int, value: float, solver: str) -> dict:
    """A pair recorded without a solve: at its lower bound (solver "bound") or not shortlisted (NaN)."""
    return {"a": refs[i].scorer_id, "b": refs[j].scorer_id, "key_a": refs[i].key, "key_b": refs[j].key,
            "value": float(value), "solver": solver, "n_a": refs[i].n, "n_b": refs[j].n, "seconds": 0.0,
            "skipped": True}


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------


def compute_distances(store: Store, features: Mapping[str, FeatureRef], *, solver: str = "entropic",
                      options: EntropicOptions | None = None, chunk_size: int = 8, max_in_flight: int | None = None,
                      progress: Callable[[int, int], None] | None = None, timeout_s: float = 3600.0,
                      use_ray: bool = True, skip_tau: float | None = None,
                      skip_tau_quantile: float | None = None, third_bound: bool = True, candidates: int = 0,
                      candidates_tau_quantile: float | None = None) -> dict:
    """All pairwise GW distances, or all that a threshold needs (`skip_tau` / `skip_tau_quantile`), or
    only each scorer's `candidates` nearest partners by the bound (0: all pairs).

    `third_bound`: also try Mémoli's third lower bound on the pairs about to be solved that the
    schedule names (`gw.schedule`), as `gw.matrix.gw_matrix` does.

    Returns {key (distances table), ids, computed, reused, skipped, not_shortlisted, tau, profiles
    {computed, reused}, seconds}; `tau` is the explicit tau or the exact quantile tau of the full matrix
    (None without skipping), or with `candidates` the shortlist's tau at `candidates_tau_quantile`.
    """
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    if solver not in ("entropic", "exact"):
        raise ValueError(f"solver must be 'entropic' or 'exact', got {solver!r}")
    check_skipping(skip_tau, skip_tau_quantile)
    skipping = skip_tau is not None or skip_tau_quantile is not None
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 0:
        raise ValueError(f"candidates must be an integer >= 0, got {candidates!r}")
    if candidates and skipping:
        raise ValueError("a shortlist (candidates) and skipping by a threshold do not combine: give one")
    ids = sorted(features)
    if len(ids) < 2:
        raise ValueError(f"need at least two feature sets for a distance matrix, got {ids}")
    refs = [features[i] for i in ids]

    def make_runner(fn: Callable, shared: tuple):
        return _make_runner(fn, shared, use_ray, max_in_flight, deadline, timeout_s, label="GW matrix")

    graph, profiles_computed = None, 0
    wanted = list(itertools.combinations(range(len(ids)), 2))
    if candidates:  # the bound of every pair, from one cached profile per feature set
        profiles, profiles_computed = load_profiles(store, refs, range(len(ids)), make_runner)
        graph = candidate_graph(bound_matrix([profiles[i] for i in range(len(ids))]), ids, candidates)
        wanted = list(graph.pairs)
    records: dict[tuple[int, int], dict] = {}
    todo, keys = [], {}
    for i, j in wanted:
        keys[(i, j)] = cached = pair_cache_key(solver, options, refs[i], refs[j])
        if (record := store.read_cached(cached)) is not None:
            records[(i, j)] = record
        else:
            todo.append((i, j))
    reused, total = len(records), len(records) + len(todo)
    if progress:
        progress(reused, total)

    bounds, needed = None, sorted({k for pair in todo for k in pair})
    if skipping and todo:
        profiles, profiles_computed = load_profiles(store, refs, needed, make_runner)
        bounds = pair_bounds(profiles, todo)
    schedule = BoundSchedule(todo, total, [float(r["value"]) for r in records.values()], bounds=bounds,
                             skip_tau=skip_tau, skip_tau_quantile=skip_tau_quantile, third_bound=third_bound)

    def on_chunk(batch: Batch, result: dict) -> None:
        solved = schedule.settle(batch, result["third_bounds"])
        for pair, record in zip(solved, result["records"], strict=True):
            records[pair] = record
        schedule.add(float(record["value"]) for record in result["records"])
        if progress:
            progress(len(records) + len(schedule.skipped), total)

    _solve_in_bound_order(schedule, chunk_size, lambda: make_runner(compute_chunk, (store, list(refs))),
                          lambda batch: (batch, solver, options, {p: keys[p] for p in batch.pairs}), on_chunk)
    for (i, j), bound in schedule.skipped.items():
        records[(i, j)] = _unsolved_record(refs, i, j, bound, "bound")
    if schedule.skipped and progress:
        progress(total, total)
    tau = _tau(records, skip_tau, skip_tau_quantile)
    if graph is not None:
        if candidates_tau_quantile is not None:
            tau = shortlist_tau(graph, sparse_distances(graph, {p: float(records[p]["value"]) for p in graph.pairs}),
                                float(candidates_tau_quantile))
        for pair in itertools.combinations(range(len(ids)), 2):
            records.setdefault(pair, _unsolved_record(refs, *pair, float("nan"), "not-shortlisted"))

    key = _write_table(store, refs, records, solver, options, skip_tau, skip_tau_quantile, candidates)
    n_profiled = len(ids) if candidates else len(needed) if skipping else 0
    return {"key": key, "ids": ids, "computed": len(todo) - len(schedule.skipped), "reused": reused,
            "skipped": len(schedule.skipped), "candidates": candidates, "not_shortlisted": len(records) - total,
            "tau": tau,
            "profiles": {"computed": profiles_computed, "reused": n_profiled - profiles_computed},
            "seconds": round(time.perf_counter() - started, 3)}


def _solve_in_bound_order(schedule: BoundSchedule, chunk_size: int, make_runner: Callable, job_args: Callable,
                          on_chunk: Callable) -> None:
    """Submit the schedule's batches while the window has room; after each finished one, ask again."""
    runner = window = None
    while True:
        schedule.drop_reaching()
        if not len(schedule) and not (runner and len(runner)):
            return
        if runner is None:  # only now, so a run with nothing left to solve never starts Ray
            runner, window = make_runner()
        while len(schedule) and len(runner) < window:
            batch = schedule.next_batch(chunk_size)
            if not batch.pairs:
                break
            runner.submit(batch, *job_args(batch))
        if not len(runner):
            continue
        for batch, result in runner.wait():
            on_chunk(batch, result)


def _tau(records: Mapping, skip_tau: float | None, skip_tau_quantile: float | None) -> float | None:
    if skip_tau is not None:
        return float(skip_tau)
    if skip_tau_quantile is not None:  # exact: skipped pairs sit at bounds >= the full matrix's tau
        return float(np.quantile([float(r["value"]) for r in records.values()], float(skip_tau_quantile)))
    return None


def _write_table(store: Store, refs: Sequence[FeatureRef], records: Mapping, solver: str,
                 options: EntropicOptions | None, skip_tau: float | None, skip_tau_quantile: float | None,
                 candidates: int = 0) -> str:
    """Write the distances table; its key names the feature keys, the solver, any skipping threshold or shortlist."""
    table = pa.Table.from_pylist([_row(records[pair]) for pair in sorted(records)])
    parts: list = [[r.key for r in refs], solver_config(solver, options, "mean", torch.float32)]
    if skip_tau is not None or skip_tau_quantile is not None:  # unchanged key without skipping
        parts.append({"skip_tau": skip_tau, "skip_tau_quantile": skip_tau_quantile})
    if candidates:
        parts.append({"candidates": candidates})
    key = f"{DISTANCES_PREFIX}/{_short(json.dumps(parts, default=str))}.parquet"
    store.write_table(key, table)
    return key


def _row(record: dict) -> dict:
    return {"a": record["a"], "b": record["b"], "value": float(record["value"]), "solver": record["solver"],
            "n_a": int(record["n_a"]), "n_b": int(record["n_b"]), "seconds": float(record.get("seconds", 0.0)),
            "key_a": record["key_a"], "key_b": record["key_b"], "converged": bool(record.get("converged", True)),
            "marginal_error": float(record.get("marginal_error", 0.0)), "skipped": bool(record.get("skipped", False))}
