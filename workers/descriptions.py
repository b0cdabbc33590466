"""Item-description similarity: the `--shortlist-by description` signal and the `--planner description`
distances (the math: gw.similarity).

Each scorer's item description (its question, from the manifest) is embedded by the fleet's base model
(last layer, mean pooling) and two scorers are as near as the cosine of their embeddings. It reads no
scorer and no response, so it is the cheapest signal the measured planner can shortlist by: one base-model
pass over N short texts, where GW needs every scorer's features and task-vector cosine every checkpoint.
It stands in for what a person who knows the curriculum would group (the description plan of
bench/mergeability.py). The description planner (`--planner description`, the default) packs these
distances themselves: 0.574 test macro F1 on Beetle (3 folds, docs/results/mergeability.md), the one
product plan shown better than random plans. As the measured planner's shortlist, where the trial merges
then judge each shortlisted pair, it keeps none of that gain: 0.554.

A scorer without a description has no neighbours by it (NaN distances): the shortlist never picks it,
so it stays on its own scorer, and the caller says so.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gw.similarity import cosine_similarity_matrix
from infra.manifest import MANIFEST_KEY, load_manifest
from infra.storage import Store
from workers.extract import ExtractConfig

EMBEDDING = ExtractConfig(layer=-1, pooling="mean")


def embed_descriptions(store: Store, manifest_key: str, texts: Sequence[str]) -> np.ndarray:
    """[len(texts), d] base-model embeddings of the texts (one job; models load where it runs)."""
    from workers.extract.encoder import extract_features
    from workers.extract.run import load_spec_scorer
    from workers.models import quiet_transformers

    quiet_transformers()  # the base model has no classifier: transformers would report it freshly initialised
    manifest = load_manifest(store, manifest_key)
    base = manifest.scorers[0].model_copy(update={"id": "base model", "checkpoint": manifest.base_model})
    return extract_features(load_spec_scorer(store, base, "cpu", base_model=manifest.base_model), texts, EMBEDDING)


def described(store: Store, ids: Sequence[str], manifest_key: str = MANIFEST_KEY) -> dict[str, str]:
    """{id: description} for the scorers whose manifest entry has a non-blank one."""
    manifest = load_manifest(store, manifest_key)
    return {i: d.strip() for i in ids if (d := manifest.scorer(i).description or "").strip()}


def description_distances(store: Store, ids: Sequence[str], *, manifest_key: str = MANIFEST_KEY,
                          use_ray: bool = True, timeout_s: float = 600.0) -> np.ndarray:
    """1 − the cosine of the description embeddings between every two scorers, in `ids` order; the
    diagonal 0, NaN in the row and column of a scorer without a description."""
    texts = described(store, ids, manifest_key)
    D = np.full((len(ids), len(ids)), np.nan)
    np.fill_diagonal(D, 0.0)
    have = [n for n, i in enumerate(ids) if i in texts]
    if len(have) < 2:
        return D
    args = (store, manifest_key, [texts[ids[n]] for n in have])
    if use_ray:
        from workers.ray_jobs import run_on_ray

        embeddings = run_on_ray(embed_descriptions, *args, timeout_s=timeout_s)
    else:
        embeddings = embed_descriptions(*args)
    D[np.ix_(have, have)] = 1.0 - cosine_similarity_matrix(embeddings)
    np.fill_diagonal(D, 0.0)
    return D
