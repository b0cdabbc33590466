"""A store on a local directory: temp file + ``os.replace`` for writes, ``link(2)`` for the
conditional create."""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import pyarrow.fs as pafs

from infra.settings import Settings

from .base import _HASH_CHUNK, Store
from .keys import KeyNotFoundError, StorageError, _check_bytes, validate_key, validate_prefix

__all__ = ["LocalStore"]

_TEMP_MARKER = ".fmtmp-"  # local temp files carry this; listings hide them


class LocalStore(Store):
    """A store rooted at a local directory (created on first write)."""

    def __init__(self, root: Path, settings: Settings, jail: str | None = None) -> None:
        self.root = root
        # Nothing outside this directory is read or written, also through a symlink: the root of the
        # store that was opened (a sub-store keeps its parent's), resolved.
        self._jail = jail or os.path.realpath(root)
        super().__init__(str(root), pafs.LocalFileSystem(), root.as_posix(), settings)

    def __reduce__(self):
        return (LocalStore, (self.root, self.settings, self._jail))

    def _sub_store(self, prefix: str) -> "LocalStore":
        return LocalStore(self.root.joinpath(*prefix.split("/")), self.settings, self._jail)

    def uri_for(self, key: str) -> str:
        return str(self.root.joinpath(*validate_key(key).split("/")))

    def local_path(self, key: str) -> Path | None:
        return self._file(key)

    def _file(self, key: str) -> Path:
        return Path(self._inside(str(self.root.joinpath(*validate_key(key).split("/")))))

    def _path(self, key: str) -> str:
        return self._inside(super()._path(key))

    def _inside(self, path: str) -> str:
        """`path` itself, once it is known not to resolve (through symlinks) outside the store."""
        real = os.path.realpath(path)
        if real != self._jail and not real.startswith(self._jail + os.sep):
            raise StorageError(f"{path} resolves to {real}, outside the store {self._jail} (a symlink out of "
                               "the store; everything a fleet names must be inside it)")
        return path

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
        path = self.root.joinpath(*key.split("/"))  # a symlink is removed itself, never followed
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
        path = Path(self._path(prefix))
        if not path.is_dir():
            raise KeyNotFoundError(f"local_dir: {path} is not a directory")
        # Libraries read this directory directly: no file in it may lead out of the store either.
        for dirpath, _, filenames in os.walk(path):
            for name in filenames:
                self._inside(os.path.join(dirpath, name))
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
