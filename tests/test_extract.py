"""Feature extraction without Ray: layer choice, pooling, batching, sampling, feature files and their cache."""
from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from infra.manifest import load_manifest
from infra.storage import open_store
from workers.extract import run as extract_run  # extract_for_spec looks extract_features up there
from workers.extract import (ExtractConfig, extract_features, extract_for_spec, feature_metadata, plan_extraction,
                             read_features, resolve_layer, select_responses, store_checkpoint_hash, stratified_sample)
from workers.scorer_io import checkpoint_hash, load_scorer
from workers.tiny import write_tiny_bert

TEXTS = [
    "the bulb lights because the circuit is closed",
    "no",
    "a",
    "the battery pushes the current through every bulb in the series path and back again to it",
    "it is not a closed path",
    "yes because the switch is closed and the loop is complete",
    "plants make glucose",
    "the roots take up water from the soil and it travels up",
    "",
    "the current is the same",
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads spin-wait (~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def deep_scorer(tmp_path_factory):
    """A tiny BERT with 4 layers, so hidden_states[-3] is an inner layer (not the embeddings)."""
    path = write_tiny_bert(tmp_path_factory.mktemp("tiny-4-layers"), layers=4, seed=3)
    return load_scorer(path)


@pytest.fixture()
def fleet_store(tmp_path, tiny_fleet_dir):
    """A private copy of the tiny fleet (tests write features and change checkpoints in it)."""
    shutil.copytree(tiny_fleet_dir, tmp_path / "fleet")
    return open_store(str(tmp_path / "fleet"))


def manual_hidden_states(scorer, text: str) -> tuple[torch.Tensor, ...]:
    batch = scorer.tokenizer([text], truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        return scorer.model.base_model(**batch, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("layer", [-3, -1, 0, 2])
def test_cls_features_are_the_chosen_hidden_state(deep_scorer, layer):
    features = extract_features(deep_scorer, TEXTS, ExtractConfig(layer=layer, batch_size=4))
    assert features.shape == (len(TEXTS), 32) and features.dtype == np.float32
    expected = np.stack([manual_hidden_states(deep_scorer, t)[layer][0, 0].numpy() for t in TEXTS])
    np.testing.assert_allclose(features, expected, atol=1e-5)


def test_default_layer_is_third_from_last_and_later_layers_are_skipped(deep_scorer):
    calls = Counter()
    layers = deep_scorer.model.base_model.encoder.layer
    handles = [layer.register_forward_hook(lambda m, i, o, n=n: calls.update([n])) for n, layer in enumerate(layers)]
    try:
        features = extract_features(deep_scorer, TEXTS[:3], ExtractConfig())
    finally:
        for handle in handles:
            handle.remove()
    assert ExtractConfig().layer == -3
    expected = np.stack([manual_hidden_states(deep_scorer, t)[-3][0, 0].numpy() for t in TEXTS[:3]])
    np.testing.assert_allclose(features, expected, atol=1e-5)
    assert calls[0] > 0 and calls[1] > 0 and calls[2] == 0 and calls[3] == 0  # layers 3 and 4 never ran


def test_mean_pooling_averages_real_tokens_only(deep_scorer):
    features = extract_features(deep_scorer, TEXTS, ExtractConfig(pooling="mean", batch_size=5))
    expected = np.stack([manual_hidden_states(deep_scorer, t)[-3][0].mean(dim=0).numpy() for t in TEXTS])
    np.testing.assert_allclose(features, expected, atol=1e-5)
    cls = extract_features(deep_scorer, TEXTS, ExtractConfig(pooling="cls"))
    assert not np.allclose(features, cls, atol=1e-3)


def test_sorted_batches_equal_one_by_one_and_do_not_depend_on_batch_size(deep_scorer):
    one_by_one = np.concatenate([extract_features(deep_scorer, [t], ExtractConfig(batch_size=1)) for t in TEXTS])
    for batch_size in (2, 3, 64):
        batched = extract_features(deep_scorer, TEXTS, ExtractConfig(batch_size=batch_size))
        np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_layer_out_of_range_and_bad_config_are_refused(deep_scorer):
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        extract_features(deep_scorer, TEXTS, ExtractConfig(layer=5))
    assert resolve_layer(-5, 4) == 0 and resolve_layer(4, 4) == 4
    with pytest.raises(ValueError, match="pooling"):
        ExtractConfig(pooling="max")
    with pytest.raises(ValueError, match="max_responses"):
        ExtractConfig(max_responses=0)


def test_no_texts_gives_an_empty_matrix(deep_scorer):
    assert extract_features(deep_scorer, [], ExtractConfig()).shape == (0, 32)


def test_features_that_ignore_the_input_are_refused():
    from workers.extract import check_spread

    same = np.full((10, 8), 0.9, dtype=np.float32) + np.float32(1e-8) * np.arange(10, dtype=np.float32)[:, None]
    with pytest.raises(ValueError, match="'item-7'.*same for every response"):
        check_spread(same, "item-7", ExtractConfig())
    check_spread(np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32), "item-7", ExtractConfig())


def test_stratified_sample_keeps_label_shares_and_is_seeded():
    rng = np.random.default_rng(7)
    labels = rng.permutation(np.repeat([0, 1, 2], [613, 291, 96])).tolist()
    rows = stratified_sample(labels, 100, seed=5)
    assert len(rows) == 100 and len(set(rows.tolist())) == 100 and np.all(np.diff(rows) > 0)
    full, sample = Counter(labels), Counter(labels[i] for i in rows)
    for label in full:
        assert abs(sample[label] / 100 - full[label] / len(labels)) <= 1 / 100
    np.testing.assert_array_equal(rows, stratified_sample(labels, 100, seed=5))
    assert not np.array_equal(rows, stratified_sample(labels, 100, seed=6))
    np.testing.assert_array_equal(stratified_sample(labels[:50], 100, seed=5), np.arange(50))


def test_select_responses_uses_the_split_and_label_patterns():
    patterns = [[1, 0], [0, 1], [1, 1], [0, 0]]
    counts = [40, 30, 20, 10]
    labels = [p for p, c in zip(patterns, counts) for _ in range(c)]
    n = len(labels)
    table = pa.table({
        "response_id": [f"r{i}" for i in range(n + 20)],
        "text": [f"text {i}" for i in range(n + 20)],
        "labels": pa.array(labels + [[1, 1]] * 20, pa.list_(pa.int64())),
        "split": ["train"] * n + ["test"] * 20,
    })
    chosen = select_responses(table, "multilabel", ExtractConfig(max_responses=20, seed=1))
    assert chosen.num_rows == 20 and set(chosen.column("split").to_pylist()) == {"train"}
    got = Counter(tuple(v) for v in chosen.column("labels").to_pylist())
    assert got == {(1, 0): 8, (0, 1): 6, (1, 1): 4, (0, 0): 2}
    everything = select_responses(table, "multilabel", ExtractConfig(split=None, max_responses=1000))
    assert everything.num_rows == n + 20
    with pytest.raises(ValueError, match="no responses in split 'validation'"):
        select_responses(table, "multilabel", ExtractConfig(split="validation"))


def test_extract_for_spec_writes_keyed_parquet_and_reuses_it(fleet_store, monkeypatch):
    spec = load_manifest(fleet_store).scorers[0]
    config = ExtractConfig(max_responses=25)
    ref = extract_for_spec(fleet_store, spec, config, "cpu")
    assert ref.key == (f"features/{spec.id}/{ref.checkpoint_hash[:16]}-{ref.data_hash[:16]}-"
                       f"{ref.config_hash[:16]}.parquet")
    assert ref.n == 25 and ref.dim == 32
    ids, vectors = read_features(fleet_store, ref)
    plan = plan_extraction(fleet_store, spec, config)
    assert ids == list(plan.response_ids)
    scorer = load_scorer(fleet_store.local_path(spec.checkpoint))
    np.testing.assert_allclose(vectors, extract_features(scorer, plan.texts, config), atol=1e-6)

    schema = pq.read_schema(fleet_store.local_path(ref.key))
    assert schema.field("vector").type == pa.list_(pa.float32(), 32)
    meta = feature_metadata(fleet_store, ref.key)
    assert (meta["checkpoint_hash"], meta["data_hash"], meta["config_hash"]) == (
        ref.checkpoint_hash, ref.data_hash, ref.config_hash)
    assert meta["precision"] == "float32" and meta["device"] == "cpu"

    # Same inputs: the file is reused, the model never runs.
    def must_not_run(*args, **kwargs):
        raise AssertionError("features were recomputed although the key exists")

    monkeypatch.setattr(extract_run, "extract_features", must_not_run)
    assert extract_for_spec(fleet_store, spec, config, "cpu") == ref
    # A different sample (fewer responses) or a different seed is different data.
    for changed in (ExtractConfig(max_responses=20), ExtractConfig(max_responses=25, seed=1)):
        other = plan_extraction(fleet_store, spec, changed)
        assert other.data_hash != ref.data_hash and other.checkpoint_hash == ref.checkpoint_hash
    # Pooling changes the config hash only; batch size changes nothing.
    pooled = plan_extraction(fleet_store, spec, ExtractConfig(max_responses=25, pooling="mean"))
    assert pooled.config_hash != ref.config_hash and pooled.data_hash == ref.data_hash
    assert plan_extraction(fleet_store, spec, ExtractConfig(max_responses=25, batch_size=7)).key == ref.key
    monkeypatch.undo()

    # A changed checkpoint gets a new key and new vectors.
    checkpoint = fleet_store.local_path(spec.checkpoint)
    model = load_scorer(checkpoint).model
    with torch.no_grad():
        model.base_model.embeddings.word_embeddings.weight.mul_(1.5)
    model.save_pretrained(str(checkpoint), safe_serialization=True)
    changed = extract_for_spec(fleet_store, spec, config, "cpu")
    assert changed.checkpoint_hash != ref.checkpoint_hash and changed.data_hash == ref.data_hash
    assert changed.key != ref.key and fleet_store.exists(ref.key) and fleet_store.exists(changed.key)
    assert not np.allclose(read_features(fleet_store, changed)[1], vectors, atol=1e-4)


def test_store_checkpoint_hash_equals_scorer_io_hash(fleet_store):
    spec = load_manifest(fleet_store).scorers[0]
    local = fleet_store.local_path(spec.checkpoint)
    assert store_checkpoint_hash(fleet_store, spec.checkpoint) == checkpoint_hash(local)


def test_read_features_checks_the_reference(fleet_store):
    spec = load_manifest(fleet_store).scorers[1]
    ref = extract_for_spec(fleet_store, spec, ExtractConfig(max_responses=10), "cpu")
    from dataclasses import replace

    with pytest.raises(ValueError, match="expected 16 float32"):
        read_features(fleet_store, replace(ref, dim=16))
    with pytest.raises(ValueError, match="rows"):
        read_features(fleet_store, replace(ref, n=11))
    assert type(ref).from_dict(ref.to_dict()) == ref


def test_extract_for_spec_on_an_s3_store_matches_the_local_store(tiny_fleet_dir, s3_store):
    """S3 checkpoints are hashed by streaming and downloaded to load; the file and its reuse work the same."""
    from pathlib import Path

    local = open_store(str(tiny_fleet_dir))
    spec = load_manifest(local).scorers[2]
    for prefix in (spec.checkpoint, spec.responses):
        source = Path(tiny_fleet_dir) / prefix
        if source.is_dir():
            s3_store.upload_dir(source, prefix)
        else:
            s3_store.write_bytes(prefix, source.read_bytes())
    config = ExtractConfig(max_responses=12)
    ref = extract_for_spec(s3_store, spec, config, "cpu")
    local_plan = plan_extraction(local, spec, config)
    assert (ref.checkpoint_hash, ref.data_hash, ref.key) == (local_plan.checkpoint_hash, local_plan.data_hash,
                                                             local_plan.key)
    ids, vectors = read_features(s3_store, ref)
    scorer = load_scorer(local.local_path(spec.checkpoint))
    assert ids == list(local_plan.response_ids)
    np.testing.assert_allclose(vectors, extract_features(scorer, local_plan.texts, config), atol=1e-6)
    assert feature_metadata(s3_store, ref.key)["data_hash"] == ref.data_hash
    assert extract_for_spec(s3_store, spec, config, "cpu") == ref
