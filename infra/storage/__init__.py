"""One small storage API over a local directory or an S3-compatible store.

``open_store("/data/fleet")``, ``open_store("file:///data/fleet")`` and
``open_store("s3://bucket/prefix", settings)`` all return a :class:`Store`. Keys are '/'-separated
paths relative to the store's root. Tables are Parquet (zstd), weights are safetensors (never pickle).

Bytes, tables and listings go through ``pyarrow.fs``; the S3 conditional create (``put_if_absent``)
and bulk deletes go through boto3. Every whole-object write is atomic: a reader sees the old object,
the new one, or nothing, never a torn file (local: temp file + ``os.replace``; S3: the object is
serialised in memory first, and an S3 PUT is atomic).

The package: :mod:`.keys` (errors, key and prefix validation), :mod:`.base` (the :class:`Store`
API), :mod:`.local` (:class:`LocalStore`), :mod:`.s3` (:class:`S3Store`), :mod:`.opening`
(:func:`open_store`).
"""
from __future__ import annotations

from .base import Store
from .keys import CorruptObjectError, KeyNotFoundError, StorageError, validate_key, validate_prefix
from .local import LocalStore
from .opening import open_store
from .s3 import S3Store

__all__ = [
    "CorruptObjectError",
    "KeyNotFoundError",
    "LocalStore",
    "S3Store",
    "StorageError",
    "Store",
    "open_store",
    "validate_key",
    "validate_prefix",
]
