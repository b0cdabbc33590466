"""One small storage API over a local directory or an S3-compatible store.

``open_store("/data/fleet")``, ``open_store("file:///data/fleet")`` and
``open_store("s3://bucket/prefix", settings)`` all return a :class:`Store`. Keys are '/'-separated
paths relative to the store's root. Tables are Parquet (zstd), weights are safetensors (never pickle).

Bytes, tables and listings go through ``pyarrow.fs``; the S3 conditional create (``put_if_absent``)
and bulk deletes go through boto3. Every whole-object write is atomic: a reader sees the old object,
the new one, or nothing, never a torn file (local: temp file + ``os.replace``; S3: the object is
serialised in memory first, and an S3 PUT is atomic).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from infra.settings import Settings

__all__ = [
    "KeyNotFoundError",
    "LocalStore",
    "S3Store",
    "StorageError",
    "Store",
    "open_store",
    "validate_key",
    "validate_prefix",
]

PARQUET_COMPRESSION = "zstd"
_HASH_CHUNK = 8 << 20  # bytes read at a time when hashing
_S3_IO_THREADS = 8  # S3 is latency-bound: overlap requests when moving many objects
_DELETE_BATCH = 1000  # S3 DeleteObjects limit
_TEMP_MARKER = ".fmtmp-"  # local temp files carry this; listings hide them
_SAFETENSORS_MAX_HEADER = 100 << 20  # the limit safetensors itself enforces

T = TypeVar("T")


class StorageError(Exception):
    """A storage operation failed; the message names the key or URI and the problem."""


class KeyNotFoundError(StorageError, FileNotFoundError):
    """The key does not exist (also a ``FileNotFoundError``)."""


# ---------------------------------------------------------------------------------------------
# Keys


def _key_problem(key: str) -> str | None:
    if key == "":
        return "it is empty"
    if "\x00" in key:
        return "it contains a NUL character"
    if "\\" in key:
        return "it contains a backslash (keys are '/'-separated)"
    if key.startswith("/"):
        return "it is absolute (keys are relative to the store root)"
    for part in key.split("/"):
        if part == "":
            return "it has an empty path component ('//' or a trailing '/')"
        if part in (".", ".."):
            return f"it has a {part!r} component"
    return None


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`StorageError` naming it."""
    if not isinstance(key, str):
        raise StorageError(f"invalid key {key!r}: keys are str, not {type(key).__name__}")
    problem = _key_problem(key)
    if problem:
        raise StorageError(f"invalid key {key!r}: {problem}")
    return key


def validate_prefix(prefix: str) -> str:
    """A prefix is a key, the empty string (the whole store), or a key with trailing '/'s."""
    if not isinstance(prefix, str):
        raise StorageError(f"invalid prefix {prefix!r}: prefixes are str, not {type(prefix).__name__}")
    if prefix.startswith("/"):
        raise StorageError(f"invalid prefix {prefix!r}: it is absolute (keys are relative to the store root)")
    stripped = prefix.rstrip("/")
    if stripped == "":
        return ""
    problem = _key_problem(stripped)
    if problem:
        raise StorageError(f"invalid prefix {prefix!r}: {problem}")
    return stripped


def _check_bytes(operation: str, key: str, data: Any) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{operation}({key!r}): data must be bytes, not {type(data).__name__}")


def _relative(key: str, prefix: str) -> str:
    return key[len(prefix) + 1 :] if prefix else key


# ---------------------------------------------------------------------------------------------
# Store


class Store:
    """A root (local directory or S3 bucket/prefix) holding objects addressed by relative keys.

    Use :func:`open_store`; do not construct subclasses directly. Stores pickle by URI and settings,
    so they can be handed to Ray workers.
    """

    uri: str

    def __init__(self, uri: str, fs: pafs.FileSystem, base: str, settings: Settings) -> None:
        self.uri = uri
        self.settings = settings
        self._fs = fs
        self._base = base  # root in the pyarrow filesystem's own path syntax, no trailing '/'

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (open_store, (self.uri, self.settings))

    # -- keys ----------------------------------------------------------------------------------

    def join(self, *parts: str) -> str:
        """Join key parts with '/', skipping empty parts; the result is validated."""
        cleaned = [validate_prefix(str(part)) for part in parts]
        key = "/".join(part for part in cleaned if part)
        if not key:
            raise StorageError(f"join{parts!r}: no non-empty part, so no key")
        return validate_key(key)

    def uri_for(self, key: str) -> str:
        """The full URI (S3) or absolute path (local) of ``key``."""
        raise NotImplementedError

    def _path(self, key: str) -> str:
        """Path of ``key`` (or prefix; '' is the root) in the pyarrow filesystem."""
        return f"{self._base}/{key}" if key else self._base

    def _describe(self, key: str) -> str:
        return self.uri_for(key) if key else self.uri

    # -- bytes and JSON ------------------------------------------------------------------------

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` to ``key`` atomically, replacing any previous object."""
        _check_bytes("write_bytes", key, data)
        self._write(validate_key(key), lambda out: out.write(data))

    def read_bytes(self, key: str) -> bytes:
        """The whole object at ``key``; :class:`KeyNotFoundError` if it does not exist."""
        with self._open_input(validate_key(key)) as stream:
            return stream.read()

    def write_json(self, key: str, obj: Any) -> None:
        """Write ``obj`` as UTF-8 JSON (indented, so manifests are readable by people)."""
        try:
            text = json.dumps(obj, indent=2, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise StorageError(f"write_json({self._describe(key)}): object is not JSON-serialisable: {exc}") from exc
        self.write_bytes(key, (text + "\n").encode("utf-8"))

    def read_json(self, key: str) -> Any:
        """Parse the JSON object at ``key``."""
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.uri_for(key)}: not valid JSON: {exc}") from exc

    # -- tables --------------------------------------------------------------------------------

    def write_table(self, key: str, table: pa.Table) -> None:
        """Write ``table`` as one Parquet file (zstd) at ``key``, atomically."""
        if not isinstance(table, pa.Table):
            raise TypeError(f"write_table({key!r}): expected a pyarrow.Table, not {type(table).__name__}")
        self._write(validate_key(key), lambda out: pq.write_table(table, out, compression=PARQUET_COMPRESSION))

    def read_table(self, key: str, columns: Sequence[str] | None = None) -> pa.Table:
        """Read the Parquet file at ``key`` (only ``columns`` when given)."""
        validate_key(key)
        try:
            with self._fs.open_input_file(self._path(key)) as source:
                return pq.read_table(source, columns=list(columns) if columns is not None else None)
        except FileNotFoundError as exc:
            raise KeyNotFoundError(f"{self.uri_for(key)}: no such key") from exc
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"{self.uri_for(key)}: cannot read as Parquet: {exc}") from exc

    # -- safetensors ---------------------------------------------------------------------------

    def write_safetensors(
        self, key: str, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
    ) -> None:
        """Write ``tensors`` (name -> torch.Tensor, any device/dtype) as a safetensors file."""
        import torch
        from safetensors.torch import save

        validate_key(key)
        if metadata is not None:
            bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
            if bad:
                raise TypeError(f"write_safetensors({key!r}): metadata keys and values must be str: {bad!r}")
        not_tensors = sorted(name for name, value in tensors.items() if not isinstance(value, torch.Tensor))
        if not_tensors:
            raise TypeError(f"write_safetensors({key!r}): values must be torch.Tensor; not for {not_tensors}")
        # safetensors wants contiguous tensors; detach so autograd state is not an issue.
        prepared = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
        try:
            data = save(prepared, metadata=dict(metadata) if metadata is not None else None)
        except Exception as exc:  # safetensors raises several types (shared storage, bad dtype ...)
            raise StorageError(f"write_safetensors({self.uri_for(key)}): {exc}") from exc
        self._write(key, lambda out: out.write(data))

    def read_safetensors(self, key: str) -> dict[str, Any]:
        """Load a safetensors file into CPU tensors. Pickled checkpoints are never read."""
        from safetensors.torch import load, load_file

        path = self.local_path(key)
        if path is not None and not self.exists(key):
            raise KeyNotFoundError(f"{self.uri_for(key)}: no such key")
        try:
            # A local file is memory-mapped; a remote one is fetched whole first.
            return load_file(path) if path is not None else load(self.read_bytes(key))
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"{self.uri_for(key)}: not a valid safetensors file: {exc}") from exc

    def read_safetensors_metadata(self, key: str) -> dict[str, str]:
        """The ``__metadata__`` string map of a safetensors file (empty if it has none).

        Reads only the header, not the tensors.
        """
        with self._open_input(validate_key(key)) as stream:
            try:
                header_len = int.from_bytes(stream.read(8), "little")
                if not 0 < header_len <= _SAFETENSORS_MAX_HEADER:
                    raise ValueError(f"header length {header_len} out of range")
                header = json.loads(stream.read(header_len))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
            except ValueError as exc:
                raise StorageError(f"{self.uri_for(key)}: not a valid safetensors header: {exc}") from exc
        return dict(header.get("__metadata__") or {})

    # -- inspection ----------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        """True if ``key`` is an object (a prefix with objects under it is not)."""
        return self._info(validate_key(key)).type == pafs.FileType.File

    def size(self, key: str) -> int:
        """Size of the object at ``key`` in bytes."""
        info = self._info(validate_key(key))
        if info.type != pafs.FileType.File:
            raise KeyNotFoundError(f"{self.uri_for(key)}: no such key")
        return int(info.size)

    def size_and_sha256(self, key: str) -> tuple[int, str]:
        """Size and hex sha256 of the object at ``key``, streamed (constant memory)."""
        digest = hashlib.sha256()
        size = 0
        with self._open_input(validate_key(key)) as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return size, digest.hexdigest()

    def list(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (recursive, relative to the root, sorted, files only)."""
        return sorted(self.list_sizes(prefix))

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        """Like :meth:`list`, with each object's size (one listing, no per-object requests)."""
        prefix = validate_prefix(prefix)
        root_path = self._path(prefix)
        try:
            if prefix:
                info = self._fs.get_file_info(root_path)
                if info.type == pafs.FileType.File:
                    return {prefix: int(info.size)}
            infos = self._fs.get_file_info(pafs.FileSelector(root_path, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"list({self._describe(prefix)}): {exc}") from exc
        found: dict[str, int] = {}
        cut = len(self._base) + 1
        for info in infos:
            if info.type != pafs.FileType.File or not self._is_visible(info.base_name):
                continue
            found[info.path[cut:]] = int(info.size)
        return dict(sorted(found.items()))

    def list_children(self, prefix: str = "") -> list[str]:
        """Names directly under ``prefix`` (objects and sub-prefixes, not recursive), sorted."""
        prefix = validate_prefix(prefix)
        try:
            infos = self._fs.get_file_info(
                pafs.FileSelector(self._path(prefix), recursive=False, allow_not_found=True)
            )
        except OSError as exc:
            raise StorageError(f"list_children({self._describe(prefix)}): {exc}") from exc
        names = {
            info.base_name
            for info in infos
            if info.type in (pafs.FileType.File, pafs.FileType.Directory) and self._is_visible(info.base_name)
        }
        return sorted(names)

    # -- deletion and conditional create (backend specific) ------------------------------------

    def delete(self, key_or_prefix: str) -> None:
        """Delete the object ``key_or_prefix`` and everything under the prefix of that name.

        Missing keys are fine. The empty prefix (the whole store) is refused.
        """
        raise NotImplementedError

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key`` with ``data`` only if it does not exist: True if written, False if it existed.

        The check and the write are one atomic step, so of several concurrent callers exactly one wins.
        """
        raise NotImplementedError

    # -- directories ---------------------------------------------------------------------------

    def upload_dir(self, local_dir: Path, prefix: str) -> list[str]:
        """Copy every file under ``local_dir`` to ``prefix/<relative path>``; return the keys, sorted."""
        local_dir = Path(local_dir)
        prefix = validate_prefix(prefix)
        if not local_dir.is_dir():
            raise StorageError(f"upload_dir: {local_dir} is not a directory")
        jobs: list[tuple[Path, str]] = []
        for dirpath, dirnames, filenames in os.walk(local_dir):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(local_dir).as_posix()
                key = f"{prefix}/{rel}" if prefix else rel
                problem = _key_problem(key)
                if problem:
                    raise StorageError(f"upload_dir: {path} maps to invalid key {key!r}: {problem}")
                jobs.append((path, key))
        self._for_each(lambda job: self._upload_file(*job), jobs)
        return sorted(key for _, key in jobs)

    def download_dir(self, prefix: str, local_dir: Path) -> Path:
        """Copy every object under ``prefix`` into ``local_dir`` (relative paths kept); return it.

        :class:`KeyNotFoundError` if nothing is under ``prefix``.
        """
        prefix = validate_prefix(prefix)
        local_dir = Path(local_dir)
        keys = [key for key in self.list(prefix) if not prefix or key.startswith(prefix + "/")]
        if not keys:
            raise KeyNotFoundError(f"download_dir: nothing under {self._describe(prefix)}")
        local_dir.mkdir(parents=True, exist_ok=True)

        def fetch(key: str) -> None:
            dest = local_dir.joinpath(*_relative(key, prefix).split("/"))
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._download_file(key, dest)

        self._for_each(fetch, keys)
        return local_dir

    @contextmanager
    def local_dir(self, prefix: str) -> Iterator[Path]:
        """A local directory holding what is under ``prefix``, for libraries that need paths.

        Local store: the directory itself. S3: a temporary download, removed on exit (read-only
        view: files written into it are not uploaded).
        """
        raise NotImplementedError
        yield  # pragma: no cover

    def local_path(self, key: str) -> Path | None:
        """The filesystem path of ``key`` on a local store; None on remote stores."""
        return None

    # -- backend hooks -------------------------------------------------------------------------

    def _write(self, key: str, fill: Callable[[IO[bytes]], Any]) -> None:
        """Create or replace ``key`` atomically with what ``fill`` writes to a binary file object."""
        raise NotImplementedError

    def _upload_file(self, path: Path, key: str) -> None:
        raise NotImplementedError

    def _download_file(self, key: str, dest: Path) -> None:
        raise NotImplementedError

    def _is_visible(self, name: str) -> bool:
        return True

    def _for_each(self, fn: Callable[[T], Any], items: Iterable[T]) -> None:
        for item in items:
            fn(item)

    # -- helpers -------------------------------------------------------------------------------

    def _info(self, key: str) -> pafs.FileInfo:
        try:
            return self._fs.get_file_info(self._path(key))
        except OSError as exc:
            raise StorageError(f"{self.uri_for(key)}: {exc}") from exc

    @contextmanager
    def _open_input(self, key: str) -> Iterator[pa.NativeFile]:
        try:
            stream = self._fs.open_input_stream(self._path(key))
        except FileNotFoundError as exc:
            raise KeyNotFoundError(f"{self.uri_for(key)}: no such key") from exc
        except IsADirectoryError as exc:
            raise KeyNotFoundError(f"{self.uri_for(key)}: is a prefix, not an object") from exc
        except OSError as exc:
            raise StorageError(f"{self.uri_for(key)}: cannot open: {exc}") from exc
        with stream:
            try:
                yield stream
            except OSError as exc:
                raise StorageError(f"{self.uri_for(key)}: read failed: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Local directory


class LocalStore(Store):
    """A store rooted at a local directory (created on first write)."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        super().__init__(str(root), pafs.LocalFileSystem(), root.as_posix(), settings)

    def uri_for(self, key: str) -> str:
        return str(self._file(key))

    def local_path(self, key: str) -> Path | None:
        return self._file(key)

    def _file(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _is_visible(self, name: str) -> bool:
        return not (name.startswith(".") and _TEMP_MARKER in name)

    @contextmanager
    def _temp_beside(self, target: Path) -> Iterator[Path]:
        """A fresh temp path in ``target``'s directory (same filesystem, so rename/link are atomic)."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{target}: cannot create parent directory: {exc}") from exc
        if target.is_dir():
            raise StorageError(f"{target}: is a prefix (directory), cannot write an object there")
        temp = target.with_name(f".{target.name}{_TEMP_MARKER}{uuid.uuid4().hex}")
        try:
            yield temp
        finally:
            temp.unlink(missing_ok=True)

    @staticmethod
    def _write_synced(temp: Path, fill: Callable[[IO[bytes]], Any]) -> None:
        with open(temp, "xb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())

    def _write(self, key: str, fill: Callable[[IO[bytes]], Any]) -> None:
        target = self._file(key)
        with self._temp_beside(target) as temp:
            try:
                self._write_synced(temp, fill)
                os.replace(temp, target)
            except OSError as exc:
                raise StorageError(f"{target}: write failed: {exc}") from exc
        _fsync_dir(target.parent)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        _check_bytes("put_if_absent", key, data)
        target = self._file(key)
        with self._temp_beside(target) as temp:
            try:
                self._write_synced(temp, lambda out: out.write(data))
                # link(2) fails if the name exists: the atomic create-if-absent.
                os.link(temp, target)
            except FileExistsError:
                return False
            except OSError as exc:
                raise StorageError(f"{target}: conditional write failed: {exc}") from exc
        _fsync_dir(target.parent)
        return True

    def delete(self, key_or_prefix: str) -> None:
        key = validate_prefix(key_or_prefix)
        if not key:
            raise StorageError(f"delete: refusing to delete the whole store {self.uri} (empty prefix)")
        path = self._file(key)
        try:
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
            elif path.is_dir():
                shutil.rmtree(path)
        except FileNotFoundError:
            pass  # deleted concurrently: the outcome is the one asked for
        except OSError as exc:
            raise StorageError(f"{path}: delete failed: {exc}") from exc

    @contextmanager
    def local_dir(self, prefix: str) -> Iterator[Path]:
        prefix = validate_prefix(prefix)
        path = self.root.joinpath(*prefix.split("/")) if prefix else self.root
        if not path.is_dir():
            raise KeyNotFoundError(f"local_dir: {path} is not a directory")
        yield path

    def _upload_file(self, path: Path, key: str) -> None:
        def copy(out: IO[bytes]) -> None:
            with open(path, "rb") as source:
                shutil.copyfileobj(source, out, _HASH_CHUNK)

        self._write(key, copy)

    def _download_file(self, key: str, dest: Path) -> None:
        try:
            shutil.copyfile(self._file(key), dest)
        except FileNotFoundError as exc:
            raise KeyNotFoundError(f"{self.uri_for(key)}: no such key") from exc
        except OSError as exc:
            raise StorageError(f"{self.uri_for(key)}: copy to {dest} failed: {exc}") from exc


def _fsync_dir(directory: Path) -> None:
    """Persist a rename/link in ``directory`` (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# S3-compatible object store


@functools.lru_cache(maxsize=16)
def _s3_filesystem(
    endpoint: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    session_token: str | None,
) -> pafs.S3FileSystem:
    # pyarrow ignores AWS_ENDPOINT_URL: the endpoint must be passed, scheme included.
    kwargs: dict[str, Any] = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    if access_key is not None:
        kwargs.update(access_key=access_key, secret_key=secret_key)
        if session_token:
            kwargs["session_token"] = session_token
    return pafs.S3FileSystem(**kwargs)


_boto_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _s3_client(
    endpoint: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    session_token: str | None,
) -> Any:
    import boto3
    from botocore.config import Config

    config_kwargs: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 5}}
    if endpoint:
        # S3-compatible stores: path-style addressing, and checksums only where S3 requires them
        # (botocore >= 1.36 adds CRC checksums many non-AWS stores reject).
        config_kwargs.update(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token,
        region_name=region,
    )
    return session.client("s3", endpoint_url=endpoint, config=Config(**config_kwargs))


class S3Store(Store):
    """A store rooted at ``s3://bucket/prefix`` on AWS or any S3-compatible service."""

    _CONFLICT_RETRIES = 5

    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        self.bucket = bucket
        self.prefix = prefix
        region = settings.s3_region or ("us-east-1" if settings.s3_endpoint else None)
        self._connection = (
            settings.s3_endpoint,
            region,
            settings.aws_access_key_id,
            settings.aws_secret_access_key,
            settings.aws_session_token,
        )
        uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        base = f"{bucket}/{prefix}" if prefix else bucket
        super().__init__(uri, _s3_filesystem(*self._connection), base, settings)

    @property
    def _client(self) -> Any:
        with _boto_lock:  # boto3 session/client creation is not thread-safe
            return _s3_client(*self._connection)

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(validate_key(key))}"

    def _write(self, key: str, fill: Callable[[IO[bytes]], Any]) -> None:
        # Serialise fully before opening the upload: a failure in `fill` then leaves no object,
        # and the upload itself (PUT, or multipart completed on close) is atomic.
        buffer = io.BytesIO()
        fill(buffer)
        try:
            with self._fs.open_output_stream(self._path(key)) as out:
                out.write(buffer.getbuffer())
        except OSError as exc:
            raise StorageError(f"{self.uri_for(key)}: write failed: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_bytes("put_if_absent", key, data)
        uri = self.uri_for(key)
        for attempt in range(self._CONFLICT_RETRIES):
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._object_key(key), Body=bytes(data), IfNoneMatch="*"
                )
                return True
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412 or code == "PreconditionFailed":
                    return False
                if status == 409 or code == "ConditionalRequestConflict":
                    # Another conditional write to this key is in flight; retry to learn who won.
                    time.sleep(0.05 * 2**attempt)
                    continue
                if status == 501 or code == "NotImplemented":
                    raise StorageError(
                        f"{uri}: this S3 store does not support conditional writes (If-None-Match: *), "
                        "which atomic publish needs"
                    ) from exc
                raise StorageError(f"{uri}: conditional write failed: {code or status}: {exc}") from exc
            except BotoCoreError as exc:
                raise StorageError(f"{uri}: conditional write failed: {exc}") from exc
        raise StorageError(f"{uri}: conditional write kept conflicting after {self._CONFLICT_RETRIES} tries")

    def delete(self, key_or_prefix: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        key = validate_prefix(key_or_prefix)
        if not key:
            raise StorageError(f"delete: refusing to delete the whole store {self.uri} (empty prefix)")
        object_key = self._object_key(key)
        # boto3 rather than pyarrow: pyarrow leaves empty "directory marker" objects behind.
        client = self._client
        try:
            client.delete_object(Bucket=self.bucket, Key=object_key)
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=object_key + "/")
            batch: list[dict[str, str]] = []
            for page in pages:
                for item in page.get("Contents", []):
                    batch.append({"Key": item["Key"]})
                    if len(batch) == _DELETE_BATCH:
                        self._delete_batch(batch)
                        batch = []
            if batch:
                self._delete_batch(batch)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                return
            raise StorageError(f"delete({self.uri_for(key)}): {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"delete({self.uri_for(key)}): {exc}") from exc

    def _delete_batch(self, batch: list[dict[str, str]]) -> None:
        response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageError(
                f"delete: {len(errors)} object(s) not deleted in s3://{self.bucket}, e.g. "
                f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
            )

    @contextmanager
    def local_dir(self, prefix: str) -> Iterator[Path]:
        with tempfile.TemporaryDirectory(prefix="fleetmerge-") as temp:
            yield self.download_dir(prefix, Path(temp))

    def _upload_file(self, path: Path, key: str) -> None:
        try:
            pafs.copy_files(
                str(path),
                self._path(key),
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self._fs,
            )
        except OSError as exc:
            raise StorageError(f"upload {path} -> {self.uri_for(key)} failed: {exc}") from exc

    def _download_file(self, key: str, dest: Path) -> None:
        try:
            pafs.copy_files(
                self._path(key),
                str(dest),
                source_filesystem=self._fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        except FileNotFoundError as exc:
            raise KeyNotFoundError(f"{self.uri_for(key)}: no such key") from exc
        except OSError as exc:
            raise StorageError(f"download {self.uri_for(key)} -> {dest} failed: {exc}") from exc

    def _for_each(self, fn: Callable[[T], Any], items: Iterable[T]) -> None:
        items = list(items)
        if len(items) <= 1:
            super()._for_each(fn, items)
            return
        with ThreadPoolExecutor(max_workers=min(_S3_IO_THREADS, len(items))) as pool:
            for _ in pool.map(fn, items):  # iterate to surface the first exception
                pass


# ---------------------------------------------------------------------------------------------
# Opening


def open_store(uri: str, settings: Settings | None = None) -> Store:
    """Open a store: a local path, ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    ``settings`` (default: :meth:`Settings.from_env`) supplies the S3 endpoint, region and
    credentials.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"open_store: store URI {uri!r} is empty or not a string")
    settings = settings if settings is not None else Settings.from_env()
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket or any(ch in bucket for ch in "\\ \x00") or bucket in (".", ".."):
            raise StorageError(f"open_store: {uri!r} has no valid bucket name")
        try:
            prefix = validate_prefix(prefix)
        except StorageError as exc:
            raise StorageError(f"open_store: {uri!r}: bad prefix: {exc}") from exc
        return S3Store(bucket, prefix, settings)
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"open_store: {uri!r}: file URIs must be local (file:///abs/path)")
        return LocalStore(Path(os.path.abspath(unquote(parsed.path))), settings)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"open_store: {uri!r}: unsupported scheme {scheme!r} (use a path, file:// or s3://)")
    return LocalStore(Path(os.path.abspath(os.path.expanduser(uri))), settings)
