"""Content-hash keys (gw/keys.py): every key that names a cached file is byte-identical to what the
helpers it replaced gave (a changed key silently recomputes a user's cache)."""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from gw.clouds import feature_key as cloud_key
from gw.keys import content_key, json_key
from gw.matrix import pair_cache_key, solver_config
from infra.storage import open_store
from workers import ray_gw
from workers.extract import ExtractConfig, FeatureRef
from workers.extract.keys import data_hash
from workers.finetune import FinetuneConfig
from workers.fleet_build import ItemInfo, _build_key
from workers.group_jobs import job_key
from workers.scorer_io import checkpoint_hash


def test_content_key_is_a_truncated_sha256_of_the_parts_in_order():
    assert content_key(b"ab", "c", length=64) == hashlib.sha256(b"abc").hexdigest()
    assert content_key("é", length=10) == hashlib.sha256("é".encode()).hexdigest()[:10]
    assert json_key({"b": 1, "a": [2]}, length=24) == hashlib.sha256(b'{"a": [2], "b": 1}').hexdigest()[:24]
    with pytest.raises(ValueError):
        content_key(b"x", length=0)


def test_cache_keys_are_unchanged(tmp_path):
    """Golden values from the helpers before gw.keys (commit 3ef32da); the entropic pair and distances
    keys as of SOLVER_REVISION 2 (a solver fix that changed cached values)."""
    assert pair_cache_key("k1", "k2", solver_config("entropic", None, "mean", torch.float32)) == \
        "gw:f6d51c1bdfe709248abbe93c94bb0bb9de7a0784"
    assert cloud_key(np.arange(12, dtype=np.float64).reshape(4, 3) / 7) == "d4d618648ee7bfd813d3d5948d313c70"
    assert ExtractConfig().config_hash() == "b09909e942a9adc59f9516175f04c597"
    assert data_hash(["r1", "r2"], ["héllo", "world"]) == "9bc927a06e65aacccdb25aa5de9b1cca"
    a = FeatureRef("s1", "features/s1/x.parquet", 10, 4, "c", "d", "e")
    b = FeatureRef("s2", "features/s2/y.parquet", 10, 4, "c", "d", "e")
    assert ray_gw.profile_cache_key(a) == "gw/profiles/e4ca64c38be0c2184794.json"
    assert ray_gw.pair_cache_key("entropic", None, a, b) == "gw/pairs/1e03c3d1a693e50aaa9a10c51c9c4d2baf5cc3db.json"
    record = {"a": "s1", "b": "s2", "value": 0.1, "solver": "entropic", "n_a": 1, "n_b": 1, "key_a": "k", "key_b": "l"}
    table_key = ray_gw._write_table(open_store(str(tmp_path / "store")), [a, b], {(0, 1): record}, "entropic", None,
                                    None, 0.25)
    assert table_key == "gw/distances/ff3bcbac35d74287b168.parquet"
    assert job_key("group", [[("a", "h1", "h2")], "b"], {"x": 1.5}, [{"t": None}]) == "272e54ddc70071f6b1e31ecf"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (ckpt / "config.json").write_bytes(b'{"model_type": "bert"}')
    assert checkpoint_hash(ckpt) == "4d691ad234ca3504e2916d20cde1a009"
    table = pa.table({"response_id": ["r1"], "text": ["t"], "label": [1], "split": ["train"]})
    assert _build_key("basehash", table, ItemInfo("q1", "multiclass", ("a", "b"), None, None), FinetuneConfig()) == \
        "01228ad9b90d808d0762ee7b38e07221"
