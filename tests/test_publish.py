"""Atomic publish on a local directory and on S3 (moto): manifest last, immutability, LATEST, verify."""
from __future__ import annotations

import hashlib
from typing import Callable

import pytest

from infra.publish import (
    LATEST_NAME,
    MANIFEST_NAME,
    PUBLISHED,
    PublishError,
    latest_run,
    list_runs,
    publish_run,
    read_manifest,
    verify_run,
)
from infra.storage import Store

RUN_FILES = {
    "backbones/g1/model.safetensors": b"weights-" * 100,
    "backbones/g1/config.json": b'{"hidden_size": 32}',
    "heads/q1.safetensors": b"head-q1",
    "heads/q2.safetensors": b"head-q2!",
}


def _writer(store: Store, files: dict[str, bytes] = RUN_FILES) -> Callable[[str], None]:
    def write(prefix: str) -> None:
        for rel, data in files.items():
            store.write_bytes(store.join(prefix, rel), data)

    return write


def _latest_pointer(store: Store, root: str = PUBLISHED) -> str | None:
    key = store.join(root, LATEST_NAME)
    return store.read_bytes(key).decode() if store.exists(key) else None


def test_publish_writes_manifest_with_sizes_and_hashes(any_store: Store) -> None:
    routing = {"q1": {"backbone": "backbones/g1", "head": "heads/q1.safetensors"}}
    manifest = publish_run(any_store, "run-1", _writer(any_store), routing=routing, extra={"fleet": "demo"})
    assert manifest["run_id"] == "run-1"
    assert manifest["routing"] == routing and manifest["extra"] == {"fleet": "demo"}
    assert manifest["created_at"]
    assert manifest["files"] == {
        rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for rel, data in RUN_FILES.items()
    }
    assert MANIFEST_NAME not in manifest["files"]
    assert read_manifest(any_store, "run-1") == manifest
    assert any_store.exists(f"{PUBLISHED}/run-1/{MANIFEST_NAME}")
    assert _latest_pointer(any_store) == "run-1"
    assert latest_run(any_store) == "run-1"
    assert list_runs(any_store) == ["run-1"]
    assert verify_run(any_store, "run-1") == []


def test_publish_files_already_in_place_and_custom_root(any_store: Store) -> None:
    any_store.write_bytes("nightly/2026-01-02/plan.json", b"{}")
    manifest = publish_run(any_store, "2026-01-02", root="nightly")
    assert manifest["files"] == {"plan.json": {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}}
    assert latest_run(any_store, root="nightly") == "2026-01-02"
    assert latest_run(any_store) is None  # the default root is untouched
    assert verify_run(any_store, "2026-01-02", root="nightly") == []


def test_second_publish_of_same_run_is_refused(any_store: Store) -> None:
    publish_run(any_store, "run-1", _writer(any_store))
    calls: list[str] = []
    with pytest.raises(PublishError, match="already published"):
        publish_run(any_store, "run-1", calls.append)
    assert calls == []  # refused before the writer could touch the immutable prefix
    assert verify_run(any_store, "run-1") == []


def test_failed_writer_leaves_no_manifest_and_latest_unchanged(any_store: Store) -> None:
    publish_run(any_store, "run-1", _writer(any_store))

    def failing_writer(prefix: str) -> None:
        any_store.write_bytes(any_store.join(prefix, "heads/q1.safetensors"), b"partial")
        raise RuntimeError("merge crashed")

    with pytest.raises(RuntimeError, match="merge crashed"):
        publish_run(any_store, "run-2", failing_writer, token="attempt-of-run-2")
    assert any_store.exists(f"{PUBLISHED}/run-2/heads/q1.safetensors")  # partial files remain ...
    assert not any_store.exists(f"{PUBLISHED}/run-2/{MANIFEST_NAME}")  # ... but are never published
    with pytest.raises(PublishError, match="not published"):
        read_manifest(any_store, "run-2")
    assert list_runs(any_store) == ["run-1"]
    assert _latest_pointer(any_store) == "run-1"
    assert latest_run(any_store) == "run-1"

    # Another publisher of run-2 is refused: the failed attempt's claim holds the run id ...
    with pytest.raises(PublishError, match="run 'run-2' exists: another publisher claimed it"):
        publish_run(any_store, "run-2", _writer(any_store))
    # ... while its own retry starts from an empty prefix: the leftovers are not in the manifest.
    manifest = publish_run(any_store, "run-2", _writer(any_store, {"heads/q2.safetensors": b"q2"}),
                           token="attempt-of-run-2")
    assert list(manifest["files"]) == ["heads/q2.safetensors"]
    assert latest_run(any_store) == "run-2"


def test_concurrent_publisher_loses_the_manifest_race(any_store: Store) -> None:
    publish_run(any_store, "run-1", _writer(any_store))
    manifest_key = f"{PUBLISHED}/run-2/{MANIFEST_NAME}"

    def writer_racing_another_publisher(prefix: str) -> None:
        _writer(any_store)(prefix)
        # Another process publishes the same run while we are still writing.
        assert any_store.put_if_absent(manifest_key, b'{"run_id": "run-2", "files": {}}')

    with pytest.raises(PublishError, match="concurrently"):
        publish_run(any_store, "run-2", writer_racing_another_publisher)
    assert any_store.read_bytes(manifest_key) == b'{"run_id": "run-2", "files": {}}'  # the winner's, intact
    assert _latest_pointer(any_store) == "run-1"  # the loser does not move LATEST


def test_verify_run_detects_tampering(any_store: Store) -> None:
    publish_run(any_store, "run-1", _writer(any_store))
    prefix = f"{PUBLISHED}/run-1"
    same_size = bytearray(RUN_FILES["heads/q1.safetensors"])
    same_size[0] ^= 0xFF
    any_store.write_bytes(f"{prefix}/heads/q1.safetensors", bytes(same_size))
    any_store.write_bytes(f"{prefix}/heads/q2.safetensors", b"longer than before")
    any_store.delete(f"{prefix}/backbones/g1/config.json")
    any_store.write_bytes(f"{prefix}/heads/q3.safetensors", b"smuggled in")

    problems = verify_run(any_store, "run-1")
    assert len(problems) == 4
    joined = "\n".join(problems)
    assert "heads/q1.safetensors: sha256" in joined
    assert "heads/q2.safetensors: size 18 bytes, manifest says 8" in joined
    assert "backbones/g1/config.json: missing" in joined
    assert "heads/q3.safetensors: not listed in the manifest" in joined


def test_verify_and_read_refuse_unpublished_runs(any_store: Store) -> None:
    _writer(any_store)(f"{PUBLISHED}/draft")
    with pytest.raises(PublishError, match="not published"):
        verify_run(any_store, "draft")
    assert list_runs(any_store) == []
    assert latest_run(any_store) is None


def test_latest_run_falls_back_to_newest_manifest(any_store: Store) -> None:
    assert latest_run(any_store) is None
    publish_run(any_store, "zzz-older", _writer(any_store, {"a": b"1"}))
    publish_run(any_store, "aaa-newer", _writer(any_store, {"a": b"2"}))
    assert latest_run(any_store) == "aaa-newer"

    any_store.write_bytes(f"{PUBLISHED}/{LATEST_NAME}", b"ghost-run")  # points at a run with no manifest
    assert latest_run(any_store) == "aaa-newer"
    any_store.delete(f"{PUBLISHED}/{LATEST_NAME}")
    assert latest_run(any_store) == "aaa-newer"  # newest by created_at, not by name
    any_store.write_bytes(f"{PUBLISHED}/{LATEST_NAME}", b"zzz-older\n")
    assert latest_run(any_store) == "zzz-older"  # a valid pointer wins (e.g. after a rollback)
    assert list_runs(any_store) == ["aaa-newer", "zzz-older"]


@pytest.mark.parametrize("bad_run_id", ["", "a/b", "..", LATEST_NAME, "_hidden", ".dot", "back\\slash"])
def test_invalid_run_ids_are_refused(any_store: Store, bad_run_id: str) -> None:
    with pytest.raises(PublishError, match="run id"):
        publish_run(any_store, bad_run_id, _writer(any_store))
    assert any_store.list() == []


def test_unserialisable_routing_is_refused_before_writing(any_store: Store) -> None:
    calls: list[str] = []
    with pytest.raises(PublishError, match="routing"):
        publish_run(any_store, "run-1", calls.append, routing={"q1": object()})
    assert calls == []
    assert any_store.list() == []
