"""Content-hash keys: one helper for every cache key and content hash of the project.

``content_key(*parts, length=N)`` is the hex sha256 of the parts, fed in order (``str`` as UTF-8),
cut to ``N`` hex characters; ``json_key(obj, length=N)`` hashes ``obj``'s JSON text. Hashing the
parts in order is hashing their concatenation, so a caller that feeds the same bytes gets the same
key as any earlier helper that did.

The lengths are part of the keys that name cached files in users' stores, so each stays what it
was (a changed key silently recomputes a cache):

* 40: a GW pair (``gw.matrix.pair_cache_key``, ``gw/pairs/<key>.json``);
* 32: content hashes that go into other keys (a feature array, a checkpoint, the responses and the
  extraction settings behind a feature file, a fine-tuned scorer's inputs);
* 24: consolidation jobs (``workers.group_jobs``: groups, own scorers, sweeps, items);
* 20: cost profiles and distances tables (``workers.ray_gw``).

Whole-file digests for integrity (``Store.size_and_sha256``, the published run manifest,
``workers.scorer_io.file_sha256``) are streamed full sha256 hex, not keys, and stay where they are.

It lives in ``gw`` because ``gw`` may import nothing of ours and ``workers`` may import ``gw``
(docs/architecture.md §2); no I/O.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

__all__ = ["content_key", "json_key"]


def content_key(*parts: bytes | bytearray | memoryview | str, length: int = 32) -> str:
    """Hex sha256 of ``parts`` in order (``str`` as UTF-8), its first ``length`` characters (1-64)."""
    if not 1 <= length <= 64:
        raise ValueError(f"length must be in [1, 64], got {length}")
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
    return digest.hexdigest()[:length]


def json_key(obj: Any, *, length: int = 32, sort_keys: bool = True,
             default: Callable[[Any], Any] | None = str) -> str:
    """:func:`content_key` of ``json.dumps(obj, sort_keys=sort_keys, default=default)``."""
    return content_key(json.dumps(obj, sort_keys=sort_keys, default=default), length=length)
