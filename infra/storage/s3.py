"""A store on S3 or an S3-compatible service: bytes, tables and listings through ``pyarrow.fs``,
the conditional create (``If-None-Match: *``) and bulk deletes through boto3."""
from __future__ import annotations

import functools
import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, TypeVar

import pyarrow.fs as pafs

from infra.settings import Settings

from .base import Store
from .keys import KeyNotFoundError, StorageError, _check_bytes, validate_key, validate_prefix

__all__ = ["S3Store"]

_S3_IO_THREADS = 8  # S3 is latency-bound: overlap requests when moving many objects
_DELETE_BATCH = 1000  # S3 DeleteObjects limit
BOTO_CONNECT_TIMEOUT_S = 5.0
BOTO_READ_TIMEOUT_S = 20.0

T = TypeVar("T")

# Server-side errors worth another try. The SDKs retry each request themselves, but a 500 answered to a
# streamed GetObject ends the read ("Failed to flush response stream"): the whole operation is retried.
_TRANSIENT_CODES = ("INTERNAL_FAILURE", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING")
_RETRY_WAITS_S = (0.25, 1.0, 2.0)


def _transient(exc: StorageError) -> bool:
    text = str(exc.__cause__ or exc)
    return any(f"AWS Error {code}" in text for code in _TRANSIENT_CODES)


def _retried(method: Callable[..., T]) -> Callable[..., T]:
    """`method` (a whole, idempotent read or write) again after a transient server error, 3 times at most."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        for wait in (*_RETRY_WAITS_S, None):
            try:
                return method(self, *args, **kwargs)
            except StorageError as exc:
                if wait is None or isinstance(exc, KeyNotFoundError) or not _transient(exc):
                    raise
                time.sleep(wait)
    return call


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

    # botocore waits 60 s per read by default, 5 times: a stalled endpoint would hold a run for minutes.
    # Its requests here are small (a manifest, a listing, a delete batch).
    config_kwargs: dict[str, Any] = {"retries": {"mode": "standard", "max_attempts": 3},
                                     "connect_timeout": BOTO_CONNECT_TIMEOUT_S, "read_timeout": BOTO_READ_TIMEOUT_S}
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

    read_bytes = _retried(Store.read_bytes)
    read_table = _retried(Store.read_table)
    read_safetensors_metadata = _retried(Store.read_safetensors_metadata)
    size_and_sha256 = _retried(Store.size_and_sha256)

    @property
    def _client(self) -> Any:
        with _boto_lock:  # boto3 session/client creation is not thread-safe
            return _s3_client(*self._connection)

    def _object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._object_key(validate_key(key))}"

    def _describe(self, key: str) -> str:
        # A stalled or unreachable store is named by its endpoint, which the URI does not show.
        return f"{super()._describe(key)} (S3 endpoint {self.settings.s3_endpoint or 'AWS default'})"

    @_retried
    def _write(self, key: str, fill: Callable[[IO[bytes]], Any]) -> None:
        # Serialise fully before opening the upload: a failure in `fill` then leaves no object,
        # and the upload itself (PUT, or multipart completed on close) is atomic.
        buffer = io.BytesIO()
        fill(buffer)
        try:
            with self._fs.open_output_stream(self._path(key)) as out:
                out.write(buffer.getbuffer())
        except OSError as exc:
            raise StorageError(f"{self._describe(key)}: write failed: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        _check_bytes("put_if_absent", key, data)
        uri = self._describe(key)
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
            raise StorageError(f"delete({self._describe(key)}): {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"delete({self._describe(key)}): {exc}") from exc

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

    @_retried
    def _upload_file(self, path: Path, key: str) -> None:
        try:
            pafs.copy_files(
                str(path),
                self._path(key),
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self._fs,
            )
        except OSError as exc:
            raise StorageError(f"upload {path} -> {self._describe(key)} failed: {exc}") from exc

    @_retried
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
            raise StorageError(f"download {self._describe(key)} -> {dest} failed: {exc}") from exc

    def _for_each(self, fn: Callable[[T], Any], items: Iterable[T]) -> None:
        items = list(items)
        if len(items) <= 1:
            super()._for_each(fn, items)
            return
        with ThreadPoolExecutor(max_workers=min(_S3_IO_THREADS, len(items))) as pool:
            for _ in pool.map(fn, items):  # iterate to surface the first exception
                pass
