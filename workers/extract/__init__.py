"""Feature extraction (docs/architecture.md §4.1): each scorer's encoder over its own item's responses.

For scorer s: take its responses (default: the train split), keep at most ``max_responses`` of them,
stratified by label and seeded, run its encoder in length-sorted batches, take hidden layer L (default
``hidden_states[-3]``, the third-from-last, as the GW-SMM code does) and pool it ([CLS] by default, or
the mean over the attention mask). The result is float32, shape [N_s, d].

Stratification: multi-class items by their label; multi-label items by their whole 0/1 label-vector
pattern (so label co-occurrence is kept, not only each label's rate). Each pattern or label gets its
share of ``max_responses`` by the largest-remainder rule, so sample proportions are within one row of
the full set's; rows missing a label form a stratum of their own.

Storage (docs/architecture.md §3.3): ``features/<scorer>/<ckpt>-<data>-<cfg>.parquet`` with columns ``response_id``
(string) and ``vector`` (fixed-size list of float32). The key holds 16-character prefixes of the
checkpoint hash (weights + config), the data hash (the response ids and texts actually used, in order)
and the config hash (only the settings that change the vectors: layer, pooling, max length, CUDA
precision); the full hashes, the config and the device used are in the Parquet schema metadata.
Sampling settings are not in the config hash: they act through the data hash, so raising
``max_responses`` past an item's size reuses its file. A key that exists is reused, never recomputed
(writes are atomic, so an existing key is a complete file); the precision actually used (float32 on
CPU, bf16/fp16 on CUDA) is recorded, not keyed, so features computed on a GPU are reused on a CPU.

Modules: ``keys`` (hashes and feature keys), ``config`` (ExtractConfig, FeatureRef, ExtractionPlan),
``sampling`` (choosing the responses), ``encoder`` (running the encoder, pooling), ``files`` (Parquet
feature files), ``run`` (one scorer, end to end).

Everything here works without Ray; `workers/ray_extract.py` fans it out over a fleet.
"""

from workers.scorer_io import checkpoint_hash as store_checkpoint_hash  # its one home is scorer_io now
from workers.scorer_io import default_device

from .config import ExtractConfig, ExtractionPlan, FeatureRef, Pooling
from .encoder import (
    MIN_RELATIVE_SPREAD,
    autocast_dtype,
    check_spread,
    encoder_of,
    extract_features,
    hidden_state,
    model_device,
    pool,
    precision_name,
    resolve_layer,
)
from .files import METADATA_PREFIX, cached_ref, feature_metadata, features_table, read_features, write_features
from .keys import FEATURES_PREFIX, FORMAT_VERSION, KEY_HASH_CHARS, data_hash, feature_key
from .run import extract_for_spec, load_spec_scorer
from .sampling import label_strata, plan_extraction, select_responses, stratified_sample

__all__ = [
    "FEATURES_PREFIX", "FORMAT_VERSION", "KEY_HASH_CHARS", "METADATA_PREFIX", "MIN_RELATIVE_SPREAD",
    "ExtractConfig", "ExtractionPlan", "FeatureRef", "Pooling",
    "autocast_dtype", "cached_ref", "check_spread", "data_hash", "default_device", "encoder_of",
    "extract_features", "extract_for_spec", "feature_key", "feature_metadata", "features_table",
    "hidden_state", "label_strata", "load_spec_scorer", "model_device", "plan_extraction", "pool",
    "precision_name", "read_features", "resolve_layer", "select_responses", "store_checkpoint_hash",
    "stratified_sample", "write_features",
]
