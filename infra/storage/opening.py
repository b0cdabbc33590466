"""Open a store from a URI: a local path, ``file:///abs/path`` or ``s3://bucket[/prefix]``."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from infra.settings import Settings

from .base import Store
from .keys import StorageError, validate_prefix
from .local import LocalStore
from .s3 import S3Store

__all__ = ["open_store"]


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
