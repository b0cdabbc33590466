"""Task-vector sketches (gw.similarity.sketch_task_vector, workers.task_vectors): the checkpoint-only
shortlist signal estimates task-vector cosines, and a fleet's sketches are cached by checkpoint."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from gw.similarity import cosine_similarity_matrix, sketch_task_vector, task_vector_cosine
from infra.manifest import load_manifest
from infra.storage import open_store
from workers.task_vectors import SKETCHES_PREFIX, backbone_of, sketch_fleet, task_vector_distances


def _deltas(seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = {"a.weight": torch.randn(300, 200, generator=g), "b.bias": torch.randn(5000, generator=g)}
    # three task vectors: two sharing a direction (cosine ~0.8), one unrelated
    noise = lambda: {k: torch.randn(v.shape, generator=g) for k, v in shared.items()}  # noqa: E731
    one, two, three = noise(), noise(), noise()
    return [{k: 2 * shared[k] + one[k] for k in shared}, {k: 2 * shared[k] + two[k] for k in shared}, three]


def test_sketch_cosines_estimate_the_exact_task_vector_cosines():
    deltas = _deltas()
    exact = task_vector_cosine(deltas)
    sketched = cosine_similarity_matrix(np.stack([sketch_task_vector(d, 1 << 14) for d in deltas]))
    assert exact[0, 1] == pytest.approx(0.8, abs=0.02) and abs(exact[0, 2]) < 0.02
    np.testing.assert_allclose(sketched, exact, atol=4 / np.sqrt(1 << 14))


def test_a_sketch_is_linear_deterministic_and_independent_of_key_order():
    a, b, _ = _deltas(1)
    s = lambda d: sketch_task_vector(d, 4096)  # noqa: E731
    np.testing.assert_allclose(s({k: a[k] + 3 * b[k] for k in a}), s(a) + 3 * s(b), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(s(a), s(dict(reversed(list(a.items())))))
    assert not np.array_equal(s(a), sketch_task_vector(a, 4096, seed=1))
    with pytest.raises(ValueError, match="'a.weight'.*NaN"):
        sketch_task_vector({"a.weight": torch.tensor([1.0, float("nan")])}, 8)


def test_fleet_sketches_match_the_checkpoints_and_are_reused(tmp_path, tiny_fleet_dir):
    shutil.copytree(tiny_fleet_dir, tmp_path / "fleet")
    store = open_store(str(tmp_path / "fleet"))
    manifest = load_manifest(store)
    ids = [s.id for s in manifest.scorers][:4]
    first = sketch_fleet(store, ids, dim=1 << 12, use_ray=False)
    assert (first["computed"], first["reused"]) == (4, 0) and len(store.list(SKETCHES_PREFIX)) == 4
    # the sketched cosine is close to the exact one computed from the checkpoints
    base = backbone_of(store.sub(manifest.base_model), manifest.head_modules)
    deltas = []
    for i in ids:
        backbone = backbone_of(store.sub(manifest.scorer(i).checkpoint), manifest.head_modules)
        deltas.append({k: backbone[k].float() - base[k].float() for k in backbone if base[k].is_floating_point()})
    np.testing.assert_allclose(cosine_similarity_matrix(first["sketches"]), task_vector_cosine(deltas), atol=0.1)
    again = sketch_fleet(store, ids, dim=1 << 12, use_ray=False)
    assert (again["computed"], again["reused"]) == (0, 4)
    np.testing.assert_array_equal(again["sketches"], first["sketches"])
    D = task_vector_distances(store, ids, dim=1 << 12, use_ray=False)
    assert np.allclose(np.diag(D), 0) and np.allclose(D, D.T)
