"""Content hashes and feature keys: what a feature file is named after."""

from __future__ import annotations

from collections.abc import Sequence

from gw.keys import content_key
from infra.manifest import unsafe_id_reason

FEATURES_PREFIX = "features"
FORMAT_VERSION = 1  # bump when the stored vectors would change for the same inputs
KEY_HASH_CHARS = 16


def data_hash(response_ids: Sequence[str], texts: Sequence[str]) -> str:
    """Hash of the (response_id, text) pairs actually used, in order (length-prefixed, so unambiguous)."""
    if len(response_ids) != len(texts):
        raise ValueError(f"data_hash: {len(response_ids)} response ids but {len(texts)} texts")
    parts = []
    for value in (v for pair in zip(response_ids, texts) for v in pair):
        encoded = str(value).encode("utf-8")
        parts += [len(encoded).to_bytes(8, "little"), encoded]
    return content_key(*parts, length=32)


def feature_key(scorer_id: str, checkpoint_hash: str, data_hash_: str, config_hash: str, *,
                prefix: str = FEATURES_PREFIX) -> str:
    """`<prefix>/<scorer>/<ckpt>-<data>-<cfg>.parquet` (16-character hash prefixes)."""
    problem = unsafe_id_reason(scorer_id)
    if problem:
        raise ValueError(f"scorer {scorer_id!r}: {problem}")
    stem = "-".join(h[:KEY_HASH_CHARS] for h in (checkpoint_hash, data_hash_, config_hash))
    return f"{prefix.strip('/')}/{scorer_id}/{stem}.parquet"
