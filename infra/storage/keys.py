"""Errors and keys: what a valid object key or prefix is, and the errors every store raises."""
from __future__ import annotations

from typing import Any

__all__ = ["CorruptObjectError", "KeyNotFoundError", "StorageError", "validate_key", "validate_prefix"]


class StorageError(Exception):
    """A storage operation failed; the message names the key or URI and the problem."""


class KeyNotFoundError(StorageError, FileNotFoundError):
    """The key does not exist (also a ``FileNotFoundError``)."""


class CorruptObjectError(StorageError):
    """The object exists but is not what it claims to be (truncated, not JSON, not safetensors)."""


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

