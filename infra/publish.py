"""Atomic publish of a run: immutable prefix, manifest written last, then the LATEST pointer.

Layout under ``root`` (default ``published``)::

    published/<run_id>/...             the run's files (written first, never changed afterwards)
    published/<run_id>/_MANIFEST.json  {run_id, created_at, files: {key: {size, sha256}}, routing, extra}
    published/LATEST                   the run id of the newest published run (plain text)

A publisher first claims the run id (``root/.claims/<run_id>``, a conditional create holding its
token): of two publishers of the same run exactly one writes its files, the other gets a PublishError
before touching them; a retry with the same token (the same run's next attempt) goes on. The manifest
is created with a conditional write (create-if-absent) too. Readers trust only prefixes that have a manifest: a run whose writer failed
midway has files but no manifest and is invisible. ``LATEST`` is advanced only after the manifest
exists; if it is missing or points at a run without a manifest, readers fall back to the newest run
that has one. Manifest ``files`` keys are relative to the run prefix.
"""
from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from infra.storage import KeyNotFoundError, StorageError, Store, validate_key, validate_prefix

__all__ = [
    "LATEST_NAME",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "PUBLISHED",
    "PublishError",
    "latest_run",
    "list_runs",
    "publish_run",
    "read_manifest",
    "run_prefix",
    "set_latest",
    "verify_run",
]

PUBLISHED = "published"
MANIFEST_NAME = "_MANIFEST.json"
LATEST_NAME = "LATEST"
CLAIMS = ".claims"  # never a run id (ids do not start with '.'), so readers skip it
MANIFEST_VERSION = 1
_HASH_THREADS = 8  # hashing is I/O-bound on S3 and releases the GIL locally


class PublishError(Exception):
    """A run cannot be published or read as published; the message names the run and store."""


def _check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise PublishError(f"run id {run_id!r} must be a non-empty string")
    if "/" in run_id:
        raise PublishError(f"run id {run_id!r} must be a single path component (no '/')")
    if run_id == LATEST_NAME or run_id.startswith((".", "_")):
        raise PublishError(f"run id {run_id!r} is reserved (LATEST, or starts with '.' or '_')")
    try:
        validate_key(run_id)
    except StorageError as exc:
        raise PublishError(f"run id {run_id!r} is not a valid key component: {exc}") from exc
    return run_id


def run_prefix(store: Store, run_id: str, root: str = PUBLISHED) -> str:
    """The store key prefix holding run ``run_id`` (``root/run_id``)."""
    return store.join(root, _check_run_id(run_id))


def _manifest_key(store: Store, run_id: str, root: str) -> str:
    return store.join(run_prefix(store, run_id, root), MANIFEST_NAME)


def _json_checked(value: Mapping | None, what: str) -> dict:
    """A JSON-ready copy of ``value``, refused before any file is written if it cannot be stored."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PublishError(f"{what} must be a mapping, not {type(value).__name__}")
    copy = dict(value)
    try:
        json.dumps(copy)
    except (TypeError, ValueError) as exc:
        raise PublishError(f"{what} is not JSON-serialisable: {exc}") from exc
    return copy


def _hash_all(store: Store, keys: list[str]) -> dict[str, tuple[int, str]]:
    if not keys:
        return {}
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(keys))) as pool:
        return dict(zip(keys, pool.map(store.size_and_sha256, keys)))


def _run_files(store: Store, prefix: str) -> dict[str, int]:
    """Run-relative key -> size for everything under ``prefix`` except the manifest."""
    sizes = store.list_sizes(prefix)
    return {
        key[len(prefix) + 1 :]: size
        for key, size in sizes.items()
        if key.startswith(prefix + "/") and key != f"{prefix}/{MANIFEST_NAME}"
    }


def publish_run(
    store: Store,
    run_id: str,
    write: Callable[[str], None] | None = None,
    *,
    routing: Mapping | None = None,
    extra: Mapping | None = None,
    root: str = PUBLISHED,
    token: str | None = None,
) -> dict:
    """Publish run ``run_id`` atomically and return its manifest.

    ``token`` names this publisher: the run id is claimed with it first, and another publisher (another
    token) of the same run id is refused; pass the same token when retrying a failed attempt.

    ``write(prefix)`` (optional) writes the run's files under ``prefix`` = ``root/run_id``; the
    prefix is emptied first, so a retry after a failed attempt starts clean. Without ``write`` the
    files must already be there. Then every file under the prefix is hashed, the manifest is
    created last with a conditional write, and ``root/LATEST`` is pointed at the run.

    Raises PublishError if the run already has a manifest (before calling ``write``) or another
    publisher created it meanwhile. If ``write`` raises, no manifest is written and the exception
    propagates: the partial files stay but readers never see them.
    """
    prefix = run_prefix(store, run_id, root)
    manifest_key = store.join(prefix, MANIFEST_NAME)
    routing_copy = _json_checked(routing, "routing")
    extra_copy = _json_checked(extra, "extra")
    if store.exists(manifest_key):
        raise PublishError(f"run {run_id!r} is already published at {store.uri_for(manifest_key)}; runs are immutable")
    _claim(store, run_id, root, token or uuid.uuid4().hex)

    if write is not None:
        # Leftovers of an earlier failed attempt would otherwise end up in this run's manifest.
        store.delete(prefix)
        write(prefix)

    relative_keys = sorted(_run_files(store, prefix))
    digests = _hash_all(store, [store.join(prefix, key) for key in relative_keys])
    files = {
        key: {"size": size, "sha256": sha256}
        for key, (size, sha256) in zip(relative_keys, digests.values())
    }
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_id,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "files": files,
        "routing": routing_copy,
        "extra": extra_copy,
    }
    data = (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    if not store.put_if_absent(manifest_key, data):
        raise PublishError(
            f"run {run_id!r} was published concurrently: {store.uri_for(manifest_key)} appeared while publishing"
        )
    _write_latest(store, run_id, root)
    return manifest


def _claim(store: Store, run_id: str, root: str, token: str) -> None:
    """Make this publisher the only one of `run_id` (two runs started in the same second, or given one id)."""
    key = store.join(root, CLAIMS, run_id)
    if store.put_if_absent(key, token.encode("utf-8")):
        return
    if store.read_bytes(key).decode("utf-8", "replace") != token:
        raise PublishError(f"run {run_id!r} exists: another publisher claimed it ({store.uri_for(key)}); "
                           "runs are immutable, publish under another run id")


def set_latest(store: Store, run_id: str, root: str = PUBLISHED) -> None:
    """Point ``root/LATEST`` back at a run that is already published (what serving and reports follow)."""
    read_manifest(store, run_id, root)  # PublishError unless it is published
    _write_latest(store, run_id, root)


def _write_latest(store: Store, run_id: str, root: str) -> None:
    store.write_bytes(store.join(root, LATEST_NAME), run_id.encode("utf-8"))


def read_manifest(store: Store, run_id: str, root: str = PUBLISHED) -> dict:
    """The manifest of a published run; PublishError if the run has none (it is not published)."""
    key = _manifest_key(store, run_id, root)
    try:
        manifest = store.read_json(key)
    except KeyNotFoundError as exc:
        raise PublishError(f"run {run_id!r} is not published: no manifest at {store.uri_for(key)}") from exc
    except StorageError as exc:
        raise PublishError(f"run {run_id!r}: unreadable manifest at {store.uri_for(key)}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise PublishError(f"run {run_id!r}: malformed manifest at {store.uri_for(key)} (no 'files' mapping)")
    if manifest.get("run_id") != run_id:
        raise PublishError(
            f"run {run_id!r}: manifest at {store.uri_for(key)} names run {manifest.get('run_id')!r}"
        )
    return manifest


def list_runs(store: Store, root: str = PUBLISHED) -> list[str]:
    """Ids of the runs under ``root`` that have a manifest, sorted."""
    root_key = validate_prefix(root)
    candidates = []
    for name in store.list_children(root_key):
        try:
            candidates.append(_check_run_id(name))
        except PublishError:
            continue  # LATEST and anything else that cannot be a run
    if not candidates:
        return []
    manifest_keys = [store.join(root_key, name, MANIFEST_NAME) for name in candidates]
    with ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(candidates))) as pool:
        present = list(pool.map(store.exists, manifest_keys))
    return [name for name, ok in zip(candidates, present) if ok]


def latest_run(store: Store, root: str = PUBLISHED) -> str | None:
    """The run ``LATEST`` points to if it has a manifest; else the newest run with one; else None."""
    pointer = store.join(root, LATEST_NAME)
    try:
        candidate = store.read_bytes(pointer).decode("utf-8").strip()
    except KeyNotFoundError:
        candidate = ""
    except UnicodeDecodeError:
        candidate = ""
    if candidate:
        try:
            if store.exists(_manifest_key(store, candidate, root)):
                return candidate
        except PublishError:
            pass  # a garbled pointer: fall back to scanning
    newest: tuple[datetime, str] | None = None
    for run_id in list_runs(store, root):
        try:
            created = _created_at(read_manifest(store, run_id, root))
        except PublishError:
            continue
        if newest is None or (created, run_id) > newest:
            newest = (created, run_id)
    return newest[1] if newest else None


def _created_at(manifest: Mapping[str, Any]) -> datetime:
    try:
        created = datetime.fromisoformat(str(manifest.get("created_at")))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return created if created.tzinfo else created.replace(tzinfo=timezone.utc)


def verify_run(store: Store, run_id: str, root: str = PUBLISHED) -> list[str]:
    """Check a published run against its manifest; return the problems found (empty = intact).

    Reports files that are missing, have the wrong size or sha256, and files under the prefix that
    the manifest does not list. PublishError if the run has no manifest.
    """
    manifest = read_manifest(store, run_id, root)
    prefix = run_prefix(store, run_id, root)
    expected: dict[str, Mapping[str, Any]] = manifest["files"]
    actual = _run_files(store, prefix)
    problems: list[str] = []
    to_hash: list[str] = []
    for key in sorted(expected):
        entry = expected[key]
        if key not in actual:
            problems.append(f"{run_id}/{key}: missing")
        elif actual[key] != entry.get("size"):
            problems.append(f"{run_id}/{key}: size {actual[key]} bytes, manifest says {entry.get('size')}")
        else:
            to_hash.append(key)
    digests = _hash_all(store, [store.join(prefix, key) for key in to_hash])
    for key, (_, sha256) in zip(to_hash, digests.values()):
        if sha256 != expected[key].get("sha256"):
            problems.append(f"{run_id}/{key}: sha256 {sha256} does not match manifest {expected[key].get('sha256')}")
    for key in sorted(set(actual) - set(expected)):
        problems.append(f"{run_id}/{key}: not listed in the manifest")
    return problems
