"""Linear CKA on a shared probe set, the `--shortlist-by cka` signal (the math: gw.similarity.cka_matrix).

On Beetle this was the only cheap predictor that correlated positively with the measured pair outcome
(docs/results/mergeability.md: Spearman +0.37 on fold 0, where GW on the flow's features was −0.16):
two scorers that map the same answers to similar geometries merge well. Every scorer encodes the same
probe set, `PROBE_SIZE` training answers drawn (seeded) over all items' responses, and keeps the
flow's layer and pooling. Each scorer's probe features are stored under

    candidates/probe/<key>.safetensors

keyed by its checkpoint, the probe texts and the extraction settings, so a nightly rerun with one changed
scorer encodes only that one. Jobs are Ray tasks in chunks.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gw.keys import json_key
from gw.similarity import cka_matrix
from infra.manifest import MANIFEST_KEY, load_manifest
from infra.storage import Store
from workers.evaluate import split_rows
from workers.extract import ExtractConfig
from workers.extract.encoder import extract_features
from workers.extract.run import load_spec_scorer
from workers.ray_jobs import fill_missing
from workers.scorer_io import checkpoint_hash

PROBE_PREFIX = "candidates/probe"
PROBE_SIZE = 256
PROBE_VERSION = 1


def probe_texts(store: Store, ids: Sequence[str], *, manifest_key: str = MANIFEST_KEY, size: int = PROBE_SIZE,
                seed: int = 0) -> list[str]:
    """`size` training answers drawn without replacement over the scorers' items (all of them when fewer),
    in a fixed order: the same fleet and seed give the same probe set."""
    manifest = load_manifest(store, manifest_key)
    texts = []
    for i in sorted(ids):
        texts += split_rows(store.read_table(manifest.scorer(i).responses), "train").column("text").to_pylist()
    if len(texts) < 2:
        raise ValueError(f"linear CKA needs at least 2 training answers over the fleet, found {len(texts)}")
    rng = np.random.default_rng(seed)
    return [texts[n] for n in sorted(rng.choice(len(texts), size=min(size, len(texts)), replace=False))]


def probe_key(store: Store, checkpoint: str, texts: Sequence[str], config: ExtractConfig) -> str:
    parts = ["probe", PROBE_VERSION, checkpoint_hash(store, checkpoint), json_key(list(texts)),
             config.layer, config.pooling, config.max_length]
    return f"{PROBE_PREFIX}/{json_key(parts, length=24)}.safetensors"


def probe_chunk(store: Store, manifest_key: str, ids: Sequence[str], texts: Sequence[str], config: ExtractConfig,
                keys: Sequence[str]) -> list[str]:
    """Encode the probe set with each scorer and write its features under its key (the driver names them)."""
    manifest = load_manifest(store, manifest_key)
    for scorer_id, key in zip(ids, keys, strict=True):
        scorer = load_spec_scorer(store, manifest.scorer(scorer_id), "cpu", base_model=manifest.base_model)
        features = extract_features(scorer, list(texts), config)
        store.write_safetensors(key, {"features": torch.from_numpy(features)}, metadata={"scorer": scorer_id})
    return list(keys)


def probe_features(store: Store, ids: Sequence[str], config: ExtractConfig, *, manifest_key: str = MANIFEST_KEY,
                   seed: int = 0, use_ray: bool = True, chunk_size: int = 4, timeout_s: float = 3600.0) -> dict:
    """{"features": {id: [n_probe, d]}, "computed", "reused"}; stored features are read back."""
    manifest = load_manifest(store, manifest_key)
    texts = probe_texts(store, ids, manifest_key=manifest_key, seed=seed)
    keys = {i: probe_key(store, manifest.scorer(i).checkpoint, texts, config) for i in ids}
    todo = [i for i in ids if store.read_cached(keys[i], store.read_safetensors) is None]
    fill_missing(probe_chunk, (store, manifest_key), todo, keys, texts, config, use_ray=use_ray,
                 chunk_size=chunk_size, timeout_s=timeout_s, label="probe features")
    features = {i: store.read_safetensors(keys[i])["features"].numpy() for i in ids}
    return {"features": features, "computed": len(todo), "reused": len(ids) - len(todo)}


def cka_distances(store: Store, ids: Sequence[str], config: ExtractConfig, **kwargs) -> np.ndarray:
    """1 − linear CKA between every two scorers' probe features (rows in `ids` order); the diagonal 0."""
    features = probe_features(store, ids, config, **kwargs)["features"]
    D = 1.0 - cka_matrix({i: features[i] for i in ids})
    np.fill_diagonal(D, 0.0)
    return D
