"""Cached, self-contained consolidation jobs: an item's own scores, a group's sweep, a consolidated group,
an item kept on its own.

Each job loads what it needs from the store, writes its result under a content-addressed key and
returns it; a rerun with nothing changed returns the stored result without loading a model. Keys hash
everything a result depends on (member checkpoints and responses, the base model, the merge settings):

    candidates/own/<key>.json           an item's own scorer scored on validation and test
    candidates/sweeps/<key>.json        a group merged at every grid candidate, both head settings
    candidates/groups/<key>/record.json a planned group tuned and gated (checkpoint/ beside it)
    candidates/items/<key>/record.json  an item kept on its own scorer, in the consolidated format

A record is written last and keeps the sha256 of each file of its checkpoint: a reuse checks them, and a
damaged checkpoint (or an unreadable JSON entry) is computed again. A sweep does not depend on the gate or
the head setting, so changing δ or the gate rule re-gates from cached sweeps. Jobs take and return small JSON-safe values: they run the same in-process or as Ray
tasks (the flow's merge step).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

from gw.keys import json_key
from infra.manifest import MANIFEST_KEY, FleetManifest, load_manifest
from infra.storage import Store
from workers.consolidate import GroupConsolidator, MergeConfig
from workers.multihead import MultiHeadScorer
from workers.publish_fleet import checkpoint_digests, save_checkpoint
from workers.extract.run import load_spec_scorer
from workers.scorer_io import checkpoint_hash, split_model

RECORD = "record.json"
DIGESTS = "files"  # the record's sha256 of each checkpoint file, checked before the record is reused
SWEEP_VERSION = 1  # bump when what a sweep records changes


def job_key(*parts) -> str:
    return json_key(parts, length=24)


def job_inputs(store: Store, manifest: FleetManifest, member_ids: Sequence[str],
               hashes: dict | None = None) -> list:
    """What a result about these members depends on: their checkpoints and responses, and the base.

    `hashes` (a dict the caller keeps while keying one batch of jobs) remembers each scorer's hashes
    (and, under None, the base's), so keying many pairs streams each checkpoint once, not once a pair."""
    hashes = {} if hashes is None else hashes
    for i in member_ids:
        if i not in hashes:
            spec = manifest.scorer(i)
            hashes[i] = (i, checkpoint_hash(store, spec.checkpoint), store.size_and_sha256(spec.responses)[1])
    if None not in hashes:
        hashes[None] = checkpoint_hash(store, manifest.base_model)
    return [sorted(hashes[i] for i in member_ids), hashes[None]]


def group_key(store: Store, member_ids: Sequence[str], config: MergeConfig,
              manifest_key: str = MANIFEST_KEY) -> str:
    manifest = load_manifest(store, manifest_key)
    return job_key("group", job_inputs(store, manifest, member_ids), config.to_dict(), config.candidates())


def _cached_json(store: Store, key: str, compute) -> dict:
    if (result := store.read_cached(key)) is not None:
        return result
    result = compute()
    store.write_json(key, result)
    return result


def group_prefix(key: str) -> str:
    return f"candidates/groups/{key}"


def cached_record(store: Store, prefix: str) -> dict | None:
    """A saving job's cached record, as it returns it, when the record and its checkpoint are whole; None
    (redo the job) when either is missing, truncated or changed since it was written."""
    record = store.read_cached(f"{prefix}/{RECORD}")
    if record is None:
        return None
    digests = record.pop(DIGESTS, None)
    if record.get("checkpoint") and digests is not None and checkpoint_digests(store, record["checkpoint"]) != digests:
        warnings.warn(f"{store.uri_for(record['checkpoint'])}: a file no longer matches its recorded sha256; "
                      "redoing the job", stacklevel=2)
        return None
    return {**record, "reused": True}


def _save_record(store: Store, prefix: str, record: dict) -> dict:
    """Write a saving job's record last, with its checkpoint's digests; the record as the job returns it."""
    digests = checkpoint_digests(store, record["checkpoint"]) if record.get("checkpoint") else None
    store.write_json(f"{prefix}/{RECORD}", {**record, DIGESTS: digests})
    return {**record, "reused": False}


def own_job(store: Store, item: str, *, manifest_key: str = MANIFEST_KEY,
            consolidator: GroupConsolidator | None = None) -> dict:
    """The item's own scorer on validation and test (what the gate and the reports compare with)."""
    manifest = consolidator.manifest if consolidator else load_manifest(store, manifest_key)
    return _own(store, manifest, item, consolidator)


def _own(store: Store, manifest: FleetManifest, item: str, consolidator: GroupConsolidator | None = None,
         hashes: dict | None = None) -> dict:
    def compute() -> dict:  # a consolidator loads the base model: only when the scores are not stored
        return (consolidator or GroupConsolidator(store, manifest)).own(manifest.scorer(item))

    return _cached_json(store, _own_key(store, manifest, item, hashes), compute)


def _own_key(store: Store, manifest: FleetManifest, item: str, hashes: dict | None = None) -> str:
    return f"candidates/own/{job_key('own', job_inputs(store, manifest, [item], hashes))}.json"


def sweep_job(store: Store, member_ids: Sequence[str], config: MergeConfig, *,
              manifest_key: str = MANIFEST_KEY, consolidator: GroupConsolidator | None = None) -> dict:
    """The group merged at every candidate of the config's grid, every member scored (cached)."""
    consolidator = consolidator or GroupConsolidator(store, load_manifest(store, manifest_key))
    members = list(member_ids)
    # The correction joins the key only when on, so the sweeps cached before it existed stay valid.
    correction = [config.correction()] if config.item_correction else []
    key = job_key("sweep", SWEEP_VERSION, job_inputs(store, consolidator.manifest, members), config.method,
                  dict(config.params or {}), config.candidates(), config.seed, *correction)
    return _cached_json(store, f"candidates/sweeps/{key}.json",
                        lambda: consolidator.sweep([consolidator.manifest.scorer(i) for i in members], config))


def consolidate_group_job(store: Store, member_ids: Sequence[str], config: MergeConfig, *,
                          manifest_key: str = MANIFEST_KEY, device: str | None = None,
                          key: str | None = None, consolidator: GroupConsolidator | None = None) -> dict:
    """Tune and gate one planned group; save the accepted checkpoint; return the (cached) record."""
    key = key or group_key(store, member_ids, config, manifest_key)
    prefix = group_prefix(key)
    if (record := cached_record(store, prefix)) is not None:
        return record
    consolidator = consolidator or GroupConsolidator(store, load_manifest(store, manifest_key), device=device)
    specs = [consolidator.manifest.scorer(i) for i in member_ids]
    own = {i: own_job(store, i, consolidator=consolidator) for i in member_ids}
    outcome = consolidator.consolidate(
        specs, config, own=own,
        sweep=lambda group: sweep_job(store, [s.id for s in group], config, consolidator=consolidator))
    record = outcome.record() | {"key": key, "config": config.to_dict(), "checkpoint": None}
    if outcome.candidate is not None:
        accepted = [consolidator.manifest.scorer(i) for i in outcome.accepted]
        # The sweep keeps scores, not weights: merge the chosen parameters again (deterministic).
        _, model = consolidator.evaluate(accepted, outcome.candidate["params"], config)
        save_checkpoint(store, f"{prefix}/checkpoint", model, consolidator.tokenizer,
                        {"group": outcome.accepted, "merge": outcome.candidate["merge"],
                         "params": outcome.candidate["params"], "gate": outcome.decision.to_dict(),
                         **({"correction": record["correction"]} if record["correction"] else {}),
                         "validation": record["merged_validation"], "test": record["merged_test"]})
        record["checkpoint"] = f"{prefix}/checkpoint"
    return _save_record(store, prefix, record)


def individual_job(store: Store, item: str, *, manifest_key: str = MANIFEST_KEY) -> dict:
    """An item kept on its own scorer, saved in the consolidated format (cached by its checkpoint hash)."""
    return _individual(store, load_manifest(store, manifest_key), item)


def _individual(store: Store, manifest: FleetManifest, item: str, hashes: dict | None = None) -> dict:
    spec = manifest.scorer(item)
    key = _item_key(store, manifest, item, hashes)
    prefix = _item_prefix(key)
    if (record := cached_record(store, prefix)) is not None:
        return record
    scorer = load_spec_scorer(store, spec, "cpu", base_model=manifest.base_model)
    backbone, head = split_model(scorer.model, manifest.head_modules)
    model = MultiHeadScorer(scorer.model.config, backbone, {item: head}, {item: {"task": spec.task, "labels": spec.labels}})
    save_checkpoint(store, f"{prefix}/checkpoint", model, scorer.tokenizer, {"group": [item], "merge": None})
    return _save_record(store, prefix, {"item": item, "key": key, "checkpoint": f"{prefix}/checkpoint"})


def _item_prefix(key: str) -> str:
    return f"candidates/items/{key}"


def _item_key(store: Store, manifest: FleetManifest, item: str, hashes: dict | None = None) -> str:
    spec = manifest.scorer(item)
    if hashes is not None and item in hashes:
        weights = hashes[item][1]  # job_inputs' entry: (item, checkpoint hash, responses hash)
    else:
        weights = checkpoint_hash(store, spec.checkpoint)
    return job_key("item", item, weights, spec.labels, spec.task)


def kept_item_job(store: Store, item: str, *, manifest_key: str = MANIFEST_KEY) -> dict:
    """An item the published run keeps on its own scorer: its consolidated checkpoint and its own figures.

    Runs as a Ray task in the flow (it loads the scorer, and scores it when no group job has), so the
    driver never loads a model."""
    manifest, hashes = load_manifest(store, manifest_key), {}  # each file of the item hashed once
    own = _own(store, manifest, item, hashes=hashes)
    return _kept(_individual(store, manifest, item, hashes), own)


def cached_kept_item(store: Store, item: str, *, manifest_key: str = MANIFEST_KEY) -> dict | None:
    """`kept_item_job`'s result when both its parts are stored and whole (no model loaded), else None."""
    manifest = load_manifest(store, manifest_key)
    hashes: dict = {}
    own = store.read_cached(_own_key(store, manifest, item, hashes))
    if own is None:
        return None
    record = cached_record(store, _item_prefix(_item_key(store, manifest, item, hashes)))
    return None if record is None else _kept(record, own)


def _kept(record: dict, own: dict) -> dict:
    return {**record, "validation_macro_f1": own["validation"]["macro_f1"], "test_macro_f1": own["test"]["macro_f1"]}
