"""The pairwise GW matrix of a fleet as bounded Ray tasks, cached per pair in the store.

Each finished pair is stored under `gw/pairs/<options>/<key_a>__<key_b>.json`, keyed by the content
keys of the two feature files (which carry checkpoint, data and extraction hashes) and the solver
options, so adding one scorer to a fleet of n computes only its n new pairs and a rerun with nothing
changed computes none. Missing pairs go to Ray in chunks (a chunk shares one load and one preparation
of each cloud); at most `max_in_flight` chunks run at once and every wait has a timeout.
The result is written as the long-form distances table of DESIGN §4.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

import torch

from gw.clouds import prepare
from gw.matrix import pair_cache_key as gw_pair_key
from gw.matrix import solver_config
from gw.solvers import EntropicOptions, entropic_gw_batch, gw_pair
from infra.storage import Store
from workers.extract import FeatureRef, read_features

PAIRS_PREFIX = "gw/pairs"
DISTANCES_PREFIX = "gw/distances"


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def pair_cache_key(solver: str, options: EntropicOptions | None, a: FeatureRef, b: FeatureRef) -> str:
    """Store key of a finished pair: gw.matrix's content key (both feature keys, solver settings)."""
    config = solver_config(solver, options, "mean", torch.float32)
    return f"{PAIRS_PREFIX}/{gw_pair_key(a.key, b.key, config).removeprefix('gw:')}.json"


def compute_chunk(store: Store, refs: Sequence[FeatureRef], pairs: Sequence[tuple[int, int]], solver: str,
                  options: EntropicOptions | None, cache_keys: Sequence[str]) -> list[dict]:
    """Solve `pairs` (indices into `refs`), write each under its cache key, return their records.

    The driver names the cache keys, so reader and writer agree even if a worker runs other code.
    """
    needed = sorted({i for pair in pairs for i in pair})
    clouds = {i: prepare(np.array(read_features(store, refs[i])[1]), key=refs[i].key, name=refs[i].scorer_id)
              for i in needed}
    # Solve each pair in a canonical order (by content key) so its value never depends on id order.
    ordered = [(i, j) if refs[i].key <= refs[j].key else (j, i) for i, j in pairs]
    if solver == "entropic":
        results = entropic_gw_batch([(clouds[i], clouds[j]) for i, j in ordered], options)
    else:
        results = [gw_pair(clouds[i], clouds[j], solver=solver) for i, j in ordered]
    records = []
    for (i, j), result, cache_key in zip(pairs, results, cache_keys):
        record = {"a": refs[i].scorer_id, "b": refs[j].scorer_id, "key_a": refs[i].key, "key_b": refs[j].key,
                  **result.to_dict()}
        store.write_json(cache_key, record)
        records.append(record)
    return records


def compute_distances(store: Store, features: Mapping[str, FeatureRef], *, solver: str = "entropic",
                      options: EntropicOptions | None = None, chunk_size: int = 8, max_in_flight: int | None = None,
                      progress: Callable[[int, int], None] | None = None, timeout_s: float = 3600.0,
                      use_ray: bool = True) -> dict:
    """All pairwise GW distances; returns {key (distances table), ids, computed, reused, skipped, seconds}."""
    started = time.perf_counter()
    if solver not in ("entropic", "exact"):
        raise ValueError(f"solver must be 'entropic' or 'exact', got {solver!r}")
    ids = sorted(features)
    if len(ids) < 2:
        raise ValueError(f"need at least two feature sets for a distance matrix, got {ids}")
    refs = [features[i] for i in ids]
    records: dict[tuple[int, int], dict] = {}
    todo, keys = [], {}
    for i, j in itertools.combinations(range(len(ids)), 2):
        keys[(i, j)] = cached = pair_cache_key(solver, options, refs[i], refs[j])
        if store.exists(cached):
            records[(i, j)] = store.read_json(cached)
        else:
            todo.append((i, j))
    reused, total = len(records), len(records) + len(todo)
    if progress:
        progress(reused, total)
    chunks = [todo[n:n + chunk_size] for n in range(0, len(todo), chunk_size)]
    if chunks and use_ray:
        _run_on_ray(store, refs, chunks, solver, options, keys, records, max_in_flight, timeout_s,
                    lambda: progress(len(records), total) if progress else None)
    else:
        for chunk in chunks:
            for (i, j), record in zip(chunk, compute_chunk(store, refs, chunk, solver, options, [keys[p] for p in chunk])):
                records[(i, j)] = record
            if progress:
                progress(len(records), total)
    table = pa.Table.from_pylist([_row(records[pair]) for pair in sorted(records)])
    tag = json.dumps([[r.key for r in refs], solver_config(solver, options, "mean", torch.float32)], default=str)
    key = f"{DISTANCES_PREFIX}/{_short(tag)}.parquet"
    store.write_table(key, table)
    return {"key": key, "ids": ids, "computed": len(todo), "reused": reused,
            "skipped": sum(bool(r.get("skipped")) for r in records.values()),
            "seconds": round(time.perf_counter() - started, 3)}


def _row(record: dict) -> dict:
    return {"a": record["a"], "b": record["b"], "value": float(record["value"]), "solver": record["solver"],
            "n_a": int(record["n_a"]), "n_b": int(record["n_b"]), "seconds": float(record.get("seconds", 0.0)),
            "key_a": record["key_a"], "key_b": record["key_b"], "converged": bool(record.get("converged", True)),
            "marginal_error": float(record.get("marginal_error", 0.0))}


def _run_on_ray(store: Store, refs: Sequence[FeatureRef], chunks: list, solver: str,
                options: EntropicOptions | None, keys: dict, records: dict,
                max_in_flight: int | None, timeout_s: float, on_done: Callable[[], None]) -> None:
    import ray

    from infra.ray_conn import ensure_ray

    ensure_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    window = max_in_flight or cpus
    # Half a CPU each: never wait forever for CPUs that extraction actors or other jobs hold.
    remote = ray.remote(num_cpus=0.5, max_retries=2)(compute_chunk)
    pending: dict = {}
    queue = list(chunks)
    deadline = time.monotonic() + timeout_s
    while queue or pending:
        while queue and len(pending) < window:
            chunk = queue.pop(0)
            pending[remote.remote(store, list(refs), chunk, solver, options, [keys[p] for p in chunk])] = chunk
        left = deadline - time.monotonic()
        if left <= 0:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise TimeoutError(f"GW matrix: {len(pending) + len(queue)} chunks still unfinished after {timeout_s} s")
        done, _ = ray.wait(list(pending), num_returns=1, timeout=min(left, 60.0))
        for ref in done:
            chunk = pending.pop(ref)
            for pair, record in zip(chunk, ray.get(ref, timeout=60.0)):
                records[pair] = record
            on_done()
