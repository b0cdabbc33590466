"""Linear CKA on a shared probe set (workers.probe_cka): the `--shortlist-by cka` signal encodes one probe
set with every scorer, equals CKA computed by hand from the scorers, and re-encodes only changed scorers."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from gw.similarity import linear_cka
from infra.manifest import load_manifest
from infra.storage import open_store
from workers.evaluate import split_rows
from workers.extract import ExtractConfig
from workers.extract.encoder import extract_features
from workers.extract.run import load_spec_scorer
from workers.probe_cka import PROBE_PREFIX, cka_distances, probe_features, probe_texts

CONFIG = ExtractConfig(layer=-1, pooling="cls")


def test_probe_texts_are_a_seeded_draw_of_training_answers_over_the_fleet(tiny_fleet_dir):
    store = open_store(str(tiny_fleet_dir))
    manifest = load_manifest(store)
    ids = [s.id for s in manifest.scorers]
    train = set()
    for i in ids:
        train |= set(split_rows(store.read_table(manifest.scorer(i).responses), "train").column("text").to_pylist())
    texts = probe_texts(store, ids, size=40, seed=0)
    assert len(texts) == 40 and set(texts) <= train
    assert texts == probe_texts(store, list(reversed(ids)), size=40, seed=0)  # the order of ids does not matter
    assert texts != probe_texts(store, ids, size=40, seed=1)


def test_cka_distances_equal_cka_of_each_scorers_probe_features_and_are_reused(tmp_path, tiny_fleet_dir):
    shutil.copytree(tiny_fleet_dir, tmp_path / "fleet")
    store = open_store(str(tmp_path / "fleet"))
    manifest = load_manifest(store)
    ids = [s.id for s in manifest.scorers][:3]
    first = probe_features(store, ids, CONFIG, use_ray=False, chunk_size=2)
    assert (first["computed"], first["reused"]) == (3, 0) and len(store.list(PROBE_PREFIX)) == 3
    texts = probe_texts(store, ids)
    by_hand = {i: extract_features(load_spec_scorer(store, manifest.scorer(i), "cpu", base_model=manifest.base_model),
                                   texts, CONFIG) for i in ids}
    for i in ids:
        np.testing.assert_allclose(first["features"][i], by_hand[i], rtol=1e-4, atol=1e-5)
    D = cka_distances(store, ids, CONFIG, use_ray=False)
    assert D.shape == (3, 3) and np.all(np.diag(D) == 0) and np.allclose(D, D.T)
    assert D[0, 1] == pytest.approx(1 - linear_cka(by_hand[ids[0]], by_hand[ids[1]]), abs=1e-5)
    again = probe_features(store, ids, CONFIG, use_ray=False)
    assert (again["computed"], again["reused"]) == (0, 3)
    # Another extraction setting is another key: nothing stale is read back.
    other = probe_features(store, ids[:1], ExtractConfig(layer=-1, pooling="mean"), use_ray=False)
    assert other["computed"] == 1
