"""Trial merges of candidate pairs, as Ray tasks cached by content hash (issue 11; the math: gw.mergeability).

A trial merge is the product's merge at a cheap setting: the configured method with its default
parameters (no grid), the members' own heads (no refit), each member scored against its own scorer on the
item's train and validation responses by every signal of `gw.mergeability.TRIAL_SIGNALS` (agreement and
the true-label probability change: one merge, so a planner may read either). Each finished pair is
stored under

    candidates/pairs/<key>.json

keyed by both members' checkpoints and responses, the base model and the cheap setting, so a nightly
rerun with one changed scorer re-measures only that scorer's pairs. Uncached pairs go to Ray in
chunks that share members (a chunk loads each of its scorers once).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from gw.gate import Evidence
from gw.head_fit import crossfit_probabilities
from gw.mergeability import TRIAL_SIGNALS, agreement, pair_outcome, true_label_change
from infra.manifest import MANIFEST_KEY, load_manifest
from infra.storage import Store
from workers.consolidate import GroupConsolidator, MergeConfig
from workers.group_jobs import job_inputs, job_key
from workers.ray_jobs import run_all, runner

PAIRS_PREFIX = "candidates/pairs"
PAIR_VERSION = 3  # bump when what a trial merge measures changes (2: the true-label change; 3: the refit change)
AGREEMENT_SPLITS = ("train", "validation")  # never the test split


def trial_config(config: MergeConfig) -> MergeConfig:
    """The cheap setting of `config`'s merge: its method at default parameters, own heads."""
    return MergeConfig(method=config.method, params=config.params, grid=[], refit_heads=False, seed=config.seed,
                       batch_size=config.batch_size, max_length=config.max_length)


def pair_key(store: Store, pair: Sequence[str], config: MergeConfig, manifest_key: str = MANIFEST_KEY, *,
             manifest=None, hashes: dict | None = None) -> str:
    """The trial merge's cache key; `manifest` and `hashes` (see job_inputs) let a caller key many pairs
    reading each checkpoint once."""
    manifest = manifest or load_manifest(store, manifest_key)
    trial = trial_config(config)
    key = job_key("pair", PAIR_VERSION, job_inputs(store, manifest, sorted(pair), hashes), trial.method,
                  dict(trial.params or {}), trial.seed, AGREEMENT_SPLITS)
    return f"{PAIRS_PREFIX}/{key}.json"


def measure_chunk(store: Store, manifest_key: str, pairs: Sequence[tuple[str, str]], config: MergeConfig,
                  keys: Sequence[str]) -> list[dict]:
    """Trial-merge each pair, write each record under its key (the driver names them); return the records."""
    consolidator = GroupConsolidator(store, load_manifest(store, manifest_key))
    manifest, trial = consolidator.manifest, trial_config(config)
    references: dict[str, Evidence] = {}
    refit_references: dict[str, Evidence] = {}

    def texts(item: str) -> list[str]:
        member = consolidator.member(manifest.scorer(item))
        return [t for split in AGREEMENT_SPLITS for t in member.texts[split]]

    def labels(item: str) -> np.ndarray:
        member = consolidator.member(manifest.scorer(item))
        return np.concatenate([np.asarray(member.labels[split]) for split in AGREEMENT_SPLITS])

    def refitted(item: str, features: np.ndarray) -> Evidence:
        """Heads refitted on `features` (a backbone's, of the member's answers), cross-fitted."""
        task = manifest.scorer(item).task
        head = consolidator.member(manifest.scorer(item)).head
        return Evidence(task, labels(item), crossfit_probabilities(features, labels(item), head, task=task,
                                                                   seed=trial.seed))

    def reference(item: str) -> Evidence:
        """The member's own scorer on its answers (and, in refit_references, its own backbone's refits)."""
        if item not in references:
            own = consolidator.individual(manifest.scorer(item))
            features = consolidator.features(own, texts(item))
            references[item] = Evidence(manifest.scorer(item).task, labels(item),
                                        consolidator.probabilities(own, item, features))
            refit_references[item] = refitted(item, features)
        return references[item]

    records = []
    for pair, key in zip(pairs, keys, strict=True):
        started = time.perf_counter()
        specs = [manifest.scorer(i) for i in pair]
        for spec in specs:
            reference(spec.id)
        model, merged = consolidator.merged_model(specs, {}, trial)
        scores: dict[str, dict[str, float]] = {signal: {} for signal in TRIAL_SIGNALS}
        for spec in specs:
            own = reference(spec.id)
            features = consolidator.features(model, texts(spec.id))
            probs = consolidator.probabilities(model, spec.id, features)
            scores["agreement"][spec.id] = agreement(own.probs, probs, spec.task)
            scores["true_label"][spec.id] = true_label_change(own, Evidence(spec.task, own.labels, probs))
            scores["refit"][spec.id] = true_label_change(refit_references[spec.id], refitted(spec.id, features))
        record = {"pair": list(pair), **{s: {i: round(v, 6) for i, v in scores[s].items()} for s in TRIAL_SIGNALS},
                  "outcome": {s: round(pair_outcome(scores[s]), 6) for s in TRIAL_SIGNALS},
                  "n": {i: reference(i).n for i in pair}, "method": trial.method, "params": merged["params"],
                  "seconds": round(time.perf_counter() - started, 3)}
        store.write_json(key, record)
        records.append(record)
    return records


def _chunks(pairs: Sequence[tuple[str, str]], size: int) -> list[list[tuple[str, str]]]:
    """Consecutive sorted pairs, so a chunk mostly shares its first member."""
    ordered = sorted(pairs)
    return [ordered[n:n + size] for n in range(0, len(ordered), size)]


def measure_pairs(store: Store, pairs: Sequence[Sequence[str]], config: MergeConfig, *,
                  manifest_key: str = MANIFEST_KEY, use_ray: bool = True, chunk_size: int = 6,
                  max_in_flight: int | None = None, progress: Callable[[int, int], None] | None = None,
                  timeout_s: float = 3600.0) -> dict:
    """The trial merge of every pair (or larger group: a planned trio is checked the same way; cached ones
    read, the rest computed as Ray tasks).

    Returns {"pairs": records sorted by pair, "computed", "reused", "seconds" (this call),
    "merge_seconds" (the records' own seconds, cached ones included: what the measurement costs cold)}."""
    started = time.perf_counter()
    wanted = sorted({tuple(sorted(p)) for p in pairs})
    bad = [p for p in wanted if len(p) < 2 or len(set(p)) != len(p)]
    if bad:
        raise ValueError(f"trial merges need two or more different scorers each, got {bad}")
    manifest, hashes = load_manifest(store, manifest_key), {}
    keys = {p: pair_key(store, p, config, manifest_key, manifest=manifest, hashes=hashes) for p in wanted}
    records, todo = {}, []
    for p in wanted:
        if (record := store.read_cached(keys[p])) is not None:
            records[p] = record
        else:
            todo.append(p)
    reused = len(records)
    if progress:
        progress(reused, len(wanted))
    if todo:
        jobs_runner, window = runner(measure_chunk, (store, manifest_key), use_ray, max_in_flight,
                                     time.monotonic() + timeout_s, timeout_s, label="trial merges")

        def on_result(chunk, result) -> None:
            for p, record in zip(chunk, result, strict=True):
                records[p] = record
            if progress:
                progress(len(records), len(wanted))

        run_all(jobs_runner, window, [(tuple(c), c, config, [keys[p] for p in c]) for c in _chunks(todo, chunk_size)],
                on_result)
    out = [records[p] for p in wanted]
    return {"pairs": out, "computed": len(todo), "reused": reused, "seconds": round(time.perf_counter() - started, 2),
            "merge_seconds": round(sum(r["seconds"] for r in out), 2)}


def outcomes(result: dict, signal: str = "agreement") -> dict[tuple[str, ...], float]:
    """{(a, b): outcome by `signal` (gw.mergeability.TRIAL_SIGNALS)} of a `measure_pairs` result (members
    sorted)."""
    if signal not in TRIAL_SIGNALS:
        raise ValueError(f"trial signal must be one of {list(TRIAL_SIGNALS)}, got {signal!r}")
    return {tuple(r["pair"]): float(r["outcome"][signal]) for r in result["pairs"]}
