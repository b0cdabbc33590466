"""Item-description similarity (workers.descriptions): the `--shortlist-by description` signal embeds the
manifest's descriptions with the base model, and a scorer without one is never shortlisted."""
from __future__ import annotations

import numpy as np
import pytest

from gw.mergeability import shortlist
from infra.manifest import load_manifest, save_manifest
from infra.storage import open_store
from workers.descriptions import EMBEDDING, description_distances
from workers.extract.encoder import extract_features
from workers.extract.run import load_spec_scorer


def test_description_distances_are_one_minus_the_cosine_of_base_model_embeddings(tiny_fleet_dir):
    store = open_store(str(tiny_fleet_dir))
    manifest = load_manifest(store)
    ids = [s.id for s in manifest.scorers]
    assert all(manifest.scorer(i).description for i in ids)
    D = description_distances(store, ids, use_ray=False)
    base = load_spec_scorer(store, manifest.scorers[0].model_copy(update={"checkpoint": manifest.base_model}), "cpu",
                            base_model=manifest.base_model)
    E = extract_features(base, [manifest.scorer(i).description for i in ids], EMBEDDING)
    a, b = E[0] / np.linalg.norm(E[0]), E[1] / np.linalg.norm(E[1])
    assert D.shape == (len(ids), len(ids)) and np.all(np.diag(D) == 0) and np.allclose(D, D.T)
    assert D[0, 1] == pytest.approx(1.0 - float(a @ b), abs=1e-5)
    # the order of ids is the order of the rows
    reordered = description_distances(store, ids[::-1], use_ray=False)
    np.testing.assert_allclose(reordered, D[::-1, ::-1], atol=1e-6)


def test_a_scorer_without_a_description_is_never_shortlisted(tmp_path, tiny_fleet_dir):
    import shutil

    shutil.copytree(tiny_fleet_dir, tmp_path / "fleet")
    store = open_store(str(tmp_path / "fleet"))
    manifest = load_manifest(store)
    ids = [s.id for s in manifest.scorers]
    blank = ids[1]
    save_manifest(store, manifest.model_copy(update={"scorers": [
        s.model_copy(update={"description": "  " if s.id == blank else s.description}) for s in manifest.scorers]}))
    D = description_distances(store, ids, use_ray=False)
    assert D[1, 1] == 0 and np.isnan(np.delete(D[1], 1)).all() and np.isnan(np.delete(D[:, 1], 1)).all()
    assert np.isfinite(np.delete(np.delete(D, 1, 0), 1, 1)).all()
    pairs = shortlist(D, ids, 2)
    assert pairs and all(blank not in p for p in pairs)
    # fewer than two described scorers: nothing is near anything
    only = description_distances(store, [blank, ids[0]], use_ray=False)
    assert np.isnan(only[0, 1]) and np.isnan(only[1, 0])
