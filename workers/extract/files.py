"""Feature files: Parquet tables of response ids and float32 vectors, with their metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from infra.storage import Store, StorageError

from .config import ExtractConfig, ExtractionPlan, FeatureRef
from .keys import FORMAT_VERSION

METADATA_PREFIX = "fleetmerge."


def features_table(response_ids: Sequence[str], vectors: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """`response_id` + `vector` (fixed-size list of float32) with `fleetmerge.*` schema metadata."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(response_ids):
        raise ValueError(f"features_table: vectors of shape {vectors.shape} do not match {len(response_ids)} responses")
    dim = vectors.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    table = pa.table({"response_id": pa.array(list(response_ids), pa.string()), "vector": column})
    return table.replace_schema_metadata({f"{METADATA_PREFIX}{k}": v for k, v in metadata.items()})


def write_features(store: Store, plan: ExtractionPlan, vectors: np.ndarray, config: ExtractConfig, *,
                   device: str = "cpu", precision: str = "float32") -> FeatureRef:
    """Write the plan's feature file (atomically) and return its reference."""
    metadata = {"scorer_id": plan.scorer_id, "checkpoint_hash": plan.checkpoint_hash, "data_hash": plan.data_hash,
                "config_hash": plan.config_hash, "config": json.dumps(config.to_dict(), sort_keys=True),
                "n": str(vectors.shape[0]), "dim": str(vectors.shape[1]), "device": device, "precision": precision,
                "format_version": str(FORMAT_VERSION)}
    store.write_table(plan.key, features_table(plan.response_ids, vectors, metadata))
    return FeatureRef(plan.scorer_id, plan.key, int(vectors.shape[0]), int(vectors.shape[1]), plan.checkpoint_hash,
                      plan.data_hash, plan.config_hash)


def feature_metadata(store: Store, key: str) -> dict[str, str]:
    """The `fleetmerge.*` schema metadata of a feature file (reads only the footer on a local store)."""
    path = store.local_path(key)
    try:
        schema = pq.read_schema(path) if path is not None else pq.read_schema(pa.BufferReader(store.read_bytes(key)))
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{store.uri_for(key)}: not a readable feature file: {exc}") from exc
    raw = schema.metadata or {}
    return {k.decode()[len(METADATA_PREFIX):]: v.decode() for k, v in raw.items()
            if k.decode().startswith(METADATA_PREFIX)}


def cached_ref(store: Store, plan: ExtractionPlan) -> FeatureRef | None:
    """The reference of the plan's feature file if it exists and its metadata matches the plan, else None."""
    if not store.exists(plan.key):
        return None
    try:
        meta = feature_metadata(store, plan.key)
        matches = all(meta.get(name) == getattr(plan, name) for name in ("checkpoint_hash", "data_hash", "config_hash"))
        if not matches or int(meta["n"]) != plan.n:
            return None
        return FeatureRef(plan.scorer_id, plan.key, int(meta["n"]), int(meta["dim"]), plan.checkpoint_hash,
                          plan.data_hash, plan.config_hash)
    except (StorageError, KeyError, ValueError):
        return None  # unreadable or foreign file: recompute and replace it


def read_features(store: Store, ref: FeatureRef) -> tuple[list[str], np.ndarray]:
    """(response ids, float32 array [n, dim]) of a feature file, checked against its reference."""
    table = store.read_table(ref.key)
    if table.column_names[:2] != ["response_id", "vector"]:
        raise ValueError(f"{store.uri_for(ref.key)}: expected columns response_id, vector; got {table.column_names}")
    column = table.column("vector")
    vector_type = column.type
    if not pa.types.is_fixed_size_list(vector_type) or vector_type.list_size != ref.dim:
        raise ValueError(f"{store.uri_for(ref.key)}: vector column is {vector_type}, expected {ref.dim} float32 values")
    if table.num_rows != ref.n:
        raise ValueError(f"{store.uri_for(ref.key)}: {table.num_rows} rows, but the reference says {ref.n}")
    flat = column.combine_chunks().flatten() if table.num_rows else pa.array([], pa.float32())
    vectors = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(table.num_rows, ref.dim)
    return [str(v) for v in table.column("response_id").to_pylist()], vectors
