"""Cached, self-contained consolidation jobs: one merged group, or one item kept on its own.

Each job loads what it needs from the store, writes its checkpoint under a content-addressed prefix
(`candidates/groups/<key>/`, `candidates/items/<key>/`) and its record (`record.json`, written last),
and returns that record. The key hashes everything the result depends on (member checkpoints, the
base model, the merge config), so a rerun with nothing changed returns the stored record without
loading a model. Jobs take and return only small JSON-safe values: they run the same in-process or as
Ray tasks (`ray_job`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from infra.manifest import load_manifest
from infra.storage import Store
from infra.validation import sub_store
from workers.consolidate import GroupConsolidator, MergeConfig
from workers.extract import store_checkpoint_hash
from workers.multihead import MultiHeadScorer
from workers.publish_fleet import save_checkpoint
from workers.scorer_io import load_scorer, split_model

RECORD = "record.json"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def group_key(store: Store, member_ids: Sequence[str], config: MergeConfig) -> str:
    manifest = load_manifest(store)
    hashes = {i: store_checkpoint_hash(store, manifest.scorer(i).checkpoint) for i in member_ids}
    base = store_checkpoint_hash(store, manifest.base_model)
    responses = {i: store.size_and_sha256(manifest.scorer(i).responses)[1] for i in member_ids}
    return _key("group", sorted(hashes.items()), base, sorted(responses.items()), config.to_dict())


def consolidate_group_job(store: Store, member_ids: Sequence[str], config: MergeConfig, *, device: str | None = None,
                          key: str | None = None) -> dict:
    """Merge, tune and gate one planned group; save the accepted checkpoint; return the (cached) record."""
    key = key or group_key(store, member_ids, config)
    prefix = f"candidates/groups/{key}"
    if store.exists(f"{prefix}/{RECORD}"):
        return {**store.read_json(f"{prefix}/{RECORD}"), "reused": True}
    manifest = load_manifest(store)
    consolidator = GroupConsolidator(store, manifest, device=device)
    specs = [manifest.scorer(i) for i in member_ids]
    outcome = consolidator.consolidate(specs, config)
    record = outcome.record() | {"key": key, "config": config.to_dict(), "checkpoint": None}
    record["baseline_test"] = {s.id: consolidator.test_scores(consolidator.individual(s), [s.id])[s.id] for s in specs}
    if outcome.candidate is not None:
        accepted = list(outcome.candidate.members)
        record["merged_test"] = consolidator.test_scores(outcome.candidate.model, accepted)
        save_checkpoint(store, f"{prefix}/checkpoint", outcome.candidate.model, consolidator.tokenizer,
                        {"group": accepted, "merge": outcome.candidate.merge_record, "params": outcome.candidate.params,
                         "gate": outcome.decision.to_dict(), "validation": outcome.candidate.validation,
                         "test": record["merged_test"]})
        record["checkpoint"] = f"{prefix}/checkpoint"
    store.write_json(f"{prefix}/{RECORD}", record)
    return {**record, "reused": False}


def individual_job(store: Store, item: str) -> dict:
    """An item kept on its own scorer, saved in the consolidated format (cached by its checkpoint hash)."""
    manifest = load_manifest(store)
    spec = manifest.scorer(item)
    key = _key("item", item, store_checkpoint_hash(store, spec.checkpoint), spec.labels, spec.task)
    prefix = f"candidates/items/{key}"
    if store.exists(f"{prefix}/{RECORD}"):
        return {**store.read_json(f"{prefix}/{RECORD}"), "reused": True}
    with sub_store(store, spec.checkpoint).local_dir("") as path:
        scorer = load_scorer(path, task=spec.task)
    backbone, head = split_model(scorer.model, manifest.head_modules)
    model = MultiHeadScorer(scorer.model.config, backbone, {item: head}, {item: {"task": spec.task, "labels": spec.labels}})
    save_checkpoint(store, f"{prefix}/checkpoint", model, scorer.tokenizer, {"group": [item], "merge": None})
    record = {"item": item, "key": key, "checkpoint": f"{prefix}/checkpoint"}
    store.write_json(f"{prefix}/{RECORD}", record)
    return {**record, "reused": False}
