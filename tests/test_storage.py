"""Storage API on a local directory and on S3 (moto over HTTP): round trips, listing, keys, dirs."""
from __future__ import annotations

import hashlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import botocore.exceptions
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import infra.storage as storage_module
from infra.settings import OFFLINE_ENV, Settings, offline_env
from infra.storage import KeyNotFoundError, LocalStore, S3Store, StorageError, Store, open_store

BAD_KEYS = ["", "/abs", "a/../b", "..", "a\\b", "a\x00b", "a//b", "a/", "./a", "a/./b"]


def _s3_client(settings: Settings):
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
    )


# -- round trips ----------------------------------------------------------------------------------


def test_bytes_round_trip_and_overwrite(any_store: Store) -> None:
    any_store.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert any_store.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    any_store.write_bytes("a/b/c.bin", b"new")
    assert any_store.read_bytes("a/b/c.bin") == b"new"
    any_store.write_bytes("empty", b"")
    assert any_store.read_bytes("empty") == b""
    assert any_store.size("empty") == 0


def test_read_missing_key_names_it(any_store: Store) -> None:
    with pytest.raises(KeyNotFoundError, match="nothing/here.bin") as info:
        any_store.read_bytes("nothing/here.bin")
    assert isinstance(info.value, FileNotFoundError)
    for reader in (any_store.read_table, any_store.read_safetensors, any_store.read_json, any_store.size):
        with pytest.raises(KeyNotFoundError, match="missing.x"):
            reader("missing.x")


def test_json_round_trip(any_store: Store) -> None:
    obj = {"items": ["q1", "q2"], "score": 0.5, "nested": {"ünïcode": True, "none": None}}
    any_store.write_json("meta/plan.json", obj)
    assert any_store.read_json("meta/plan.json") == obj
    with pytest.raises(StorageError, match="not JSON-serialisable"):
        any_store.write_json("meta/bad.json", {"x": object()})
    any_store.write_bytes("meta/broken.json", b"{not json")
    with pytest.raises(StorageError, match="broken.json"):
        any_store.read_json("meta/broken.json")


def test_a_corrupt_cache_entry_reads_as_absent_and_says_so(any_store: Store) -> None:
    import torch

    any_store.write_json("cache/good.json", {"a": 1})
    any_store.write_bytes("cache/cut.json", b'{"a": 1, "b"')
    any_store.write_safetensors("cache/t.safetensors", {"x": torch.arange(1000, dtype=torch.float32)})
    whole = any_store.read_bytes("cache/t.safetensors")
    any_store.write_bytes("cache/cut.safetensors", whole[: len(whole) // 2])
    assert any_store.read_cached("cache/good.json") == {"a": 1}
    assert any_store.read_cached("cache/none.json") is None
    with pytest.warns(UserWarning, match=r"cut\.json: not valid JSON.*recomputing it"):
        assert any_store.read_cached("cache/cut.json") is None
    with pytest.warns(UserWarning, match=r"cut\.safetensors: not a valid safetensors file"):
        assert any_store.read_cached("cache/cut.safetensors", any_store.read_safetensors) is None
    assert any_store.read_cached("cache/t.safetensors", any_store.read_safetensors)["x"][-1] == 999


def test_table_round_trip_with_vectors_and_column_selection(any_store: Store) -> None:
    vectors = pa.FixedSizeListArray.from_arrays(pa.array([0.5 * i for i in range(12)], pa.float32()), 4)
    table = pa.table({"response_id": ["r1", "r2", "r3"], "label": [0, 2, 1], "vector": vectors})
    any_store.write_table("features/s1.parquet", table)
    assert any_store.read_table("features/s1.parquet").equals(table)
    only_ids = any_store.read_table("features/s1.parquet", columns=["response_id"])
    assert only_ids.column_names == ["response_id"]
    assert only_ids.column("response_id").to_pylist() == ["r1", "r2", "r3"]
    metadata = pq.ParquetFile(io.BytesIO(any_store.read_bytes("features/s1.parquet"))).metadata
    assert metadata.row_group(0).column(0).compression == "ZSTD"


def test_table_errors(any_store: Store) -> None:
    with pytest.raises(TypeError, match="pyarrow.Table"):
        any_store.write_table("t.parquet", {"a": [1]})  # type: ignore[arg-type]
    any_store.write_bytes("not.parquet", b"plain bytes")
    with pytest.raises(StorageError, match="not.parquet"):
        any_store.read_table("not.parquet")


def test_failed_table_write_keeps_previous_object(any_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A serialisation that fails midway must leave the old object intact and no temp files."""
    old = pa.table({"a": [1, 2]})
    any_store.write_table("t/x.parquet", old)

    def fail_midway(table, sink, **kwargs):
        sink.write(b"PAR1 half a file")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(storage_module.base.pq, "write_table", fail_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        any_store.write_table("t/x.parquet", pa.table({"a": [9]}))
    monkeypatch.undo()
    assert any_store.read_table("t/x.parquet").equals(old)
    assert any_store.list("t") == ["t/x.parquet"]
    if isinstance(any_store, LocalStore):
        assert [p.name for p in any_store.root.joinpath("t").iterdir()] == ["x.parquet"]


def test_safetensors_round_trip_dtypes_and_metadata(any_store: Store) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "encoder.weight": torch.randn(4, 3, generator=generator),
        "encoder.bf16": torch.randn(5, generator=generator).to(torch.bfloat16),
        "head.half": torch.randn(2, 2, generator=generator).half(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "transposed": torch.randn(3, 4, generator=generator).t(),  # non-contiguous input
    }
    any_store.write_safetensors("heads/q1.safetensors", tensors, metadata={"item": "q1", "format": "pt"})
    loaded = any_store.read_safetensors("heads/q1.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert torch.equal(loaded[name], tensor), name
    assert any_store.read_safetensors_metadata("heads/q1.safetensors") == {"item": "q1", "format": "pt"}


def test_safetensors_never_unpickles(any_store: Store) -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    any_store.write_bytes("legacy/pytorch_model.bin", buffer.getvalue())
    with pytest.raises(StorageError, match="not a valid safetensors"):
        any_store.read_safetensors("legacy/pytorch_model.bin")
    with pytest.raises(StorageError, match="safetensors header"):
        any_store.read_safetensors_metadata("legacy/pytorch_model.bin")
    with pytest.raises(TypeError, match="torch.Tensor"):
        any_store.write_safetensors("x.safetensors", {"w": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="metadata"):
        any_store.write_safetensors("x.safetensors", {"w": torch.ones(1)}, metadata={"n": 1})  # type: ignore[dict-item]


# -- listing, exists, size, delete ----------------------------------------------------------------


def _populate(store: Store) -> None:
    for key, data in {"a/1": b"1", "a/sub/2": b"22", "ab/3": b"333", "top": b"4444"}.items():
        store.write_bytes(key, data)


def test_list_exists_size(any_store: Store) -> None:
    assert any_store.list() == []
    _populate(any_store)
    assert any_store.list() == ["a/1", "a/sub/2", "ab/3", "top"]
    assert any_store.list("a") == ["a/1", "a/sub/2"]  # not "ab/3": prefixes are whole components
    assert any_store.list("a/") == ["a/1", "a/sub/2"]
    assert any_store.list("top") == ["top"]
    assert any_store.list("nope") == []
    assert any_store.list_sizes("a") == {"a/1": 1, "a/sub/2": 2}
    assert any_store.list_children() == ["a", "ab", "top"]
    assert any_store.list_children("a") == ["1", "sub"]
    assert any_store.exists("a/sub/2") and not any_store.exists("a/sub") and not any_store.exists("zzz")
    assert any_store.size("ab/3") == 3
    with pytest.raises(KeyNotFoundError, match="a/sub"):
        any_store.size("a/sub")
    assert any_store.size_and_sha256("top") == (4, hashlib.sha256(b"4444").hexdigest())


def test_delete_file_prefix_and_missing(any_store: Store) -> None:
    _populate(any_store)
    any_store.delete("top")
    assert not any_store.exists("top")
    any_store.delete("a")
    assert any_store.list() == ["ab/3"]
    any_store.delete("does/not/exist")  # missing is fine
    any_store.delete("ab/")
    assert any_store.list() == []
    with pytest.raises(StorageError, match="whole store"):
        any_store.delete("")


@pytest.mark.parametrize("bad_key", BAD_KEYS)
def test_invalid_keys_are_rejected_by_name(any_store: Store, bad_key: str) -> None:
    with pytest.raises(StorageError, match="invalid key") as info:
        any_store.write_bytes(bad_key, b"x")
    assert repr(bad_key) in str(info.value)
    for operation in (any_store.read_bytes, any_store.exists, any_store.uri_for, any_store.size):
        with pytest.raises(StorageError, match="invalid key"):
            operation(bad_key)


def test_join_and_uri_for(any_store: Store) -> None:
    assert any_store.join("published", "run-1", "heads/q.safetensors") == "published/run-1/heads/q.safetensors"
    assert any_store.join("", "x", "y/") == "x/y"
    for parts in [("a", ".."), ("/a", "b"), ("a", "b\\c"), ("", "")]:
        with pytest.raises(StorageError):
            any_store.join(*parts)
    with pytest.raises(StorageError, match="invalid prefix"):
        any_store.list("../up")
    uri = any_store.uri_for("k/v.bin")
    if isinstance(any_store, S3Store):
        assert uri == f"s3://{any_store.bucket}/fleet/k/v.bin"
        assert any_store.local_path("k/v.bin") is None
    else:
        assert uri == str(any_store.root / "k" / "v.bin")
        assert any_store.local_path("k/v.bin") == any_store.root / "k" / "v.bin"


def test_sub_store_is_rooted_at_a_key_inside_the_store(any_store: Store, tmp_path: Path) -> None:
    from infra.validation import sub_store

    any_store.write_bytes("ckpt/a/config.json", b"{}")
    sub = any_store.sub("ckpt/a")
    assert type(sub) is type(any_store) and sub.settings is any_store.settings
    assert sub.uri == any_store.uri_for("ckpt/a") and sub.read_bytes("config.json") == b"{}"
    assert any_store.sub("") is any_store and any_store.sub("ckpt/").read_bytes("a/config.json") == b"{}"
    for outside in (any_store.uri_for("ckpt"), str(tmp_path / "other"), "/", "../other", "ckpt/../../x"):
        with pytest.raises(StorageError, match="outside the store|not a key inside the store"):
            any_store.sub(outside)
    assert sub_store(any_store, "ckpt/a").uri == sub.uri


# -- conditional create ---------------------------------------------------------------------------


def test_put_if_absent(any_store: Store) -> None:
    assert any_store.put_if_absent("locks/one", b"first") is True
    assert any_store.put_if_absent("locks/one", b"second") is False
    assert any_store.read_bytes("locks/one") == b"first"
    assert any_store.list("locks") == ["locks/one"]  # no temp files left behind


def test_put_if_absent_has_exactly_one_winner(any_store: Store) -> None:
    barrier = threading.Barrier(6)

    def attempt(index: int) -> bool:
        barrier.wait()
        return any_store.put_if_absent("race/manifest", f"writer-{index}".encode())

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(attempt, range(6)))
    assert results.count(True) == 1
    assert any_store.read_bytes("race/manifest") == f"writer-{results.index(True)}".encode()


def test_moto_honours_if_none_match(s3_store: S3Store, s3_settings: Settings) -> None:
    """moto 5.2.5 answers a second If-None-Match: * PUT with 412, so no fallback is needed."""
    client = _s3_client(s3_settings)
    client.put_object(Bucket=s3_store.bucket, Key="probe", Body=b"1", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.put_object(Bucket=s3_store.bucket, Key="probe", Body=b"2", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=s3_store.bucket, Key="probe")["Body"].read() == b"1"


# -- directories ----------------------------------------------------------------------------------


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 32}',
        "model.safetensors": bytes(range(256)) * 40,
        "tokenizer/vocab.txt": b"[PAD]\n[CLS]\n",
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_upload_and_download_dir(any_store: Store, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src")
    keys = any_store.upload_dir(tmp_path / "src", "ckpt/q1")
    assert keys == sorted(f"ckpt/q1/{rel}" for rel in files)
    assert any_store.list("ckpt") == keys
    out = any_store.download_dir("ckpt/q1", tmp_path / "dst")
    assert out == tmp_path / "dst"
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    with pytest.raises(KeyNotFoundError, match="nothing under"):
        any_store.download_dir("ckpt/none", tmp_path / "dst2")
    with pytest.raises(StorageError, match="not a directory"):
        any_store.upload_dir(tmp_path / "missing", "x")


def test_local_dir(any_store: Store, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "src")
    any_store.upload_dir(tmp_path / "src", "ckpt/q1")
    with any_store.local_dir("ckpt/q1") as directory:
        seen = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        assert seen == files
    if isinstance(any_store, LocalStore):
        assert directory == any_store.root / "ckpt" / "q1"
        assert directory.exists()
    else:
        assert not directory.exists()  # the temporary download is removed
    with pytest.raises(KeyNotFoundError):
        with any_store.local_dir("ckpt/none"):
            pass


# -- S3 specifics ---------------------------------------------------------------------------------


def test_s3_listing_and_delete_paginate(s3_store: S3Store, s3_settings: Settings) -> None:
    """More than one page (1,000 keys) must be listed and deleted."""
    client = _s3_client(s3_settings)
    keys = [f"many/{i:05d}.bin" for i in range(1100)]

    def put(key: str) -> None:
        client.put_object(Bucket=s3_store.bucket, Key=f"fleet/{key}", Body=b"x")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(put, keys))
    assert s3_store.list("many") == keys
    assert len(s3_store.list_sizes()) == 1100
    s3_store.delete("many")
    assert s3_store.list() == []
    assert client.list_objects_v2(Bucket=s3_store.bucket).get("KeyCount") == 0  # no directory markers


def test_s3_store_only_sees_its_prefix(s3_store: S3Store, s3_settings: Settings) -> None:
    client = _s3_client(s3_settings)
    client.put_object(Bucket=s3_store.bucket, Key="other/file", Body=b"x")
    client.put_object(Bucket=s3_store.bucket, Key="fleetish/file", Body=b"x")
    s3_store.write_bytes("mine", b"y")
    assert s3_store.list() == ["mine"]
    bucket_root = open_store(f"s3://{s3_store.bucket}", s3_settings)
    assert bucket_root.list() == ["fleet/mine", "fleetish/file", "other/file"]


# -- opening and settings -------------------------------------------------------------------------


def test_open_store_uris(tmp_path: Path, s3_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    by_uri = open_store(f"file://{tmp_path}/st")
    assert isinstance(by_uri, LocalStore) and by_uri.root == tmp_path / "st"
    monkeypatch.chdir(tmp_path)
    relative = open_store("rel/store")
    assert relative.uri == str(tmp_path / "rel" / "store")
    s3 = open_store("s3://bucket-x/some/prefix/", s3_settings)
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket-x/some/prefix"
    assert open_store("s3://bucket-x", s3_settings).uri_for("k") == "s3://bucket-x/k"
    for bad in ["", "gs://bucket/x", "s3://", "s3://bucket/../x", "file://remotehost/x"]:
        with pytest.raises(StorageError):
            open_store(bad, s3_settings)


def test_store_pickles_by_uri(any_store: Store) -> None:
    """Ray ships stores to workers by pickling them; __reduce__ rebuilds them from URI and settings."""
    any_store.write_bytes("k", b"v")
    rebuild, args = any_store.__reduce__()
    clone = rebuild(*args)
    assert type(clone) is type(any_store) and clone.uri == any_store.uri
    assert clone.read_bytes("k") == b"v"


def test_settings_from_env_precedence() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://aws-fallback:9000",
        "AWS_ACCESS_KEY_ID": "aws-key",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "FLEETMERGE_STORE": "s3://b/p",
        "FLEETMERGE_AWS_ACCESS_KEY_ID": "fm-key",
        "FLEETMERGE_AWS_SECRET_ACCESS_KEY": "fm-secret",
        "FLEETMERGE_RAY_ADDRESS": "ray://head:10001",
    }
    settings = Settings.from_env(env)
    assert settings.store == "s3://b/p"
    assert settings.s3_endpoint == "http://aws-fallback:9000"
    assert settings.s3_region == "eu-west-1"
    assert (settings.aws_access_key_id, settings.aws_secret_access_key) == ("fm-key", "fm-secret")
    assert settings.ray_address == "ray://head:10001"
    assert "fm-secret" not in repr(settings)
    overridden = Settings.from_env(env, store="/data", s3_endpoint="minio:9000", ray_address=None)
    assert overridden.store == "/data" and overridden.ray_address is None
    assert overridden.s3_endpoint == "https://minio:9000"  # scheme added: pyarrow needs one
    assert Settings.from_env({}).store == ".fleetmerge"
    with pytest.raises(ValueError, match="unknown setting"):
        Settings.from_env({}, bucket="x")
    with pytest.raises(ValueError, match="together"):
        Settings(aws_access_key_id="only-the-id")
    with pytest.raises(ValueError, match="scheme"):
        Settings(s3_endpoint="ftp://host")


def test_offline_env_uses_setdefault(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a user's explicit choice survives
    applied = offline_env()
    assert applied["HF_HUB_OFFLINE"] == "0"
    assert applied["AWS_EC2_METADATA_DISABLED"] == "true"
    assert applied["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"
    assert all(os.environ[key] == value for key, value in applied.items())
