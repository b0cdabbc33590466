"""Task-vector sketches of a fleet, the checkpoint-only shortlist signal (issue 11; the math:
gw.similarity.sketch_task_vector).

Each scorer's backbone minus the base backbone, count-sketched to `dim` numbers, stored under

    candidates/sketches/<key>.safetensors

keyed by the scorer's checkpoint, the base's and the sketch's size, so a nightly rerun sketches only
changed scorers. Sketching reads each checkpoint once and needs no responses and no forward pass; jobs
run as Ray tasks in chunks (a chunk loads the base once). Cosines of sketches estimate task-vector
cosines within ~1/sqrt(dim).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gw.keys import json_key
from gw.similarity import DEFAULT_SKETCH_DIM, cosine_similarity_matrix, sketch_task_vector
from infra.manifest import MANIFEST_KEY, load_manifest
from infra.storage import Store
from workers.ray_jobs import fill_missing
from workers.scorer_io import checkpoint_hash, load_backbone_state

SKETCHES_PREFIX = "candidates/sketches"
SKETCH_VERSION = 1


def backbone_of(checkpoint: Store, heads: Sequence[str]) -> dict[str, torch.Tensor]:
    """A checkpoint's backbone tensors (heads split off), from safetensors."""
    with checkpoint.local_dir("") as path:
        return load_backbone_state(path, heads)


def sketch_key(store: Store, checkpoint: str, base_checkpoint: str, dim: int) -> str:
    parts = ["sketch", SKETCH_VERSION, checkpoint_hash(store, checkpoint), checkpoint_hash(store, base_checkpoint), dim]
    return f"{SKETCHES_PREFIX}/{json_key(parts, length=24)}.safetensors"


def sketch_chunk(store: Store, manifest_key: str, ids: Sequence[str], dim: int, keys: Sequence[str]) -> list[str]:
    """Sketch each scorer's task vector and write it under its key (the driver names them)."""
    manifest = load_manifest(store, manifest_key)
    heads = manifest.head_modules
    base = backbone_of(store.sub(manifest.base_model), heads)
    for scorer_id, key in zip(ids, keys, strict=True):
        backbone = backbone_of(store.sub(manifest.scorer(scorer_id).checkpoint), heads)
        delta = {k: backbone[k].float() - base[k].float() for k in backbone if k in base and base[k].is_floating_point()}
        store.write_safetensors(key, {"sketch": torch.from_numpy(sketch_task_vector(delta, dim))},
                                metadata={"scorer": scorer_id})
    return list(keys)


def sketch_fleet(store: Store, ids: Sequence[str], *, dim: int = DEFAULT_SKETCH_DIM,
                 manifest_key: str = MANIFEST_KEY, use_ray: bool = True, chunk_size: int = 4,
                 timeout_s: float = 3600.0) -> dict:
    """{"sketches": [n, dim] in `ids` order, "computed", "reused"}; cached sketches are read back."""
    manifest = load_manifest(store, manifest_key)
    keys = {i: sketch_key(store, manifest.scorer(i).checkpoint, manifest.base_model, dim) for i in ids}
    todo = [i for i in ids if store.read_cached(keys[i], store.read_safetensors) is None]
    fill_missing(sketch_chunk, (store, manifest_key), todo, keys, dim, use_ray=use_ray, chunk_size=chunk_size,
                 timeout_s=timeout_s, label="task-vector sketches")
    sketches = np.stack([store.read_safetensors(keys[i])["sketch"].numpy() for i in ids])
    return {"sketches": sketches, "computed": len(todo), "reused": len(ids) - len(todo)}


def task_vector_distances(store: Store, ids: Sequence[str], **kwargs) -> np.ndarray:
    """1 − the (sketched) task-vector cosine between every two scorers; the diagonal 0."""
    D = 1.0 - cosine_similarity_matrix(sketch_fleet(store, ids, **kwargs)["sketches"])
    np.fill_diagonal(D, 0.0)
    return D
