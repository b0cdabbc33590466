"""The :class:`Store` base: bytes, JSON, Parquet tables, safetensors, listings and directories
over a ``pyarrow.fs`` filesystem; the backends (:mod:`.local`, :mod:`.s3`) supply writes, deletes
and the conditional create."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from infra.settings import Settings

from .keys import CorruptObjectError, KeyNotFoundError, StorageError, _check_bytes, _key_problem, _relative, validate_key, validate_prefix

__all__ = ["PARQUET_COMPRESSION", "Store"]

PARQUET_COMPRESSION = "zstd"
_HASH_CHUNK = 8 << 20  # bytes read at a time when hashing
_SAFETENSORS_MAX_HEADER = 100 << 20  # the limit safetensors itself enforces

T = TypeVar("T")


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
        from .opening import open_store

        return (open_store, (self.uri, self.settings))

    def sub(self, ref: str) -> "Store":
        """A store rooted at the prefix ``ref`` of this one (an empty ref is this store itself).

        The one rule for every path a fleet names (docs/architecture.md §3.1): it is inside the store.
        An absolute path, a URI or a '..' is refused here, so validation, extraction, merging and
        publish all read the same files; a local store also refuses files that a symlink leads out of
        its root (see LocalStore).
        """
        if not isinstance(ref, str):
            raise StorageError(f"{ref!r} is not a key of the store {self.uri}")
        if "://" in ref or ref.startswith("/"):
            raise StorageError(f"{ref} is outside the store {self.uri}: paths in a fleet are keys relative to "
                               "the store's root (no absolute paths or URIs)")
        try:
            prefix = validate_prefix(ref)
        except StorageError as exc:
            raise StorageError(f"{ref} is not a key inside the store {self.uri}: {exc}") from None
        return self._sub_store(prefix) if prefix else self

    def _sub_store(self, prefix: str) -> "Store":
        from .opening import open_store

        return open_store(self.uri_for(prefix), self.settings)

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
        """Where `key` is, for an error about reaching it (an S3 store adds its endpoint)."""
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
            raise CorruptObjectError(f"{self.uri_for(key)}: not valid JSON: {exc}") from exc

    def read_cached(self, key: str, read: Callable[[str], T] | None = None) -> T | None:
        """A cache entry read with `read` (default :meth:`read_json`), or None when it is absent or
        corrupt: a truncated or damaged entry is recomputed, not trusted (an unreachable store raises)."""
        try:
            return (read or self.read_json)(key)
        except KeyNotFoundError:
            return None
        except CorruptObjectError as exc:
            warnings.warn(f"{exc}; recomputing it", stacklevel=2)
            return None

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
            raise StorageError(f"{self._describe(key)}: cannot read as Parquet: {exc}") from exc

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
            raise CorruptObjectError(f"{self.uri_for(key)}: not a valid safetensors file: {exc}") from exc

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
                raise CorruptObjectError(f"{self.uri_for(key)}: not a valid safetensors header: {exc}") from exc
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
            raise StorageError(f"{self._describe(key)}: {exc}") from exc

    @contextmanager
    def _open_input(self, key: str) -> Iterator[pa.NativeFile]:
        try:
            stream = self._fs.open_input_stream(self._path(key))
        except FileNotFoundError as exc:
            raise KeyNotFoundError(f"{self.uri_for(key)}: no such key") from exc
        except IsADirectoryError as exc:
            raise KeyNotFoundError(f"{self.uri_for(key)}: is a prefix, not an object") from exc
        except OSError as exc:
            raise StorageError(f"{self._describe(key)}: cannot open: {exc}") from exc
        with stream:
            try:
                yield stream
            except OSError as exc:
                raise StorageError(f"{self._describe(key)}: read failed: {exc}") from exc
