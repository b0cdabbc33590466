"""Feature extraction (DESIGN §5): each scorer's encoder over its own item's responses.

For scorer s: take its responses (default: the train split), keep at most ``max_responses`` of them,
stratified by label and seeded, run its encoder in length-sorted batches, take hidden layer L (default
``hidden_states[-3]``, the third-from-last, as the GW-SMM code does) and pool it ([CLS] by default, or
the mean over the attention mask). The result is float32, shape [N_s, d].

Stratification: multi-class items by their label; multi-label items by their whole 0/1 label-vector
pattern (so label co-occurrence is kept, not only each label's rate). Each pattern or label gets its
share of ``max_responses`` by the largest-remainder rule, so sample proportions are within one row of
the full set's; rows missing a label form a stratum of their own.

Storage (DESIGN §4): ``features/<scorer>/<ckpt>-<data>-<cfg>.parquet`` with columns ``response_id``
(string) and ``vector`` (fixed-size list of float32). The key holds 16-character prefixes of the
checkpoint hash (weights + config), the data hash (the response ids and texts actually used, in order)
and the config hash (only the settings that change the vectors: layer, pooling, max length, CUDA
precision); the full hashes, the config and the device used are in the Parquet schema metadata.
Sampling settings are not in the config hash: they act through the data hash, so raising
``max_responses`` past an item's size reuses its file. A key that exists is reused, never recomputed
(writes are atomic, so an existing key is a complete file); the precision actually used (float32 on
CPU, bf16/fp16 on CUDA) is recorded, not keyed, so features computed on a GPU are reused on a CPU.

Everything here works without Ray; `workers/ray_extract.py` fans it out over a fleet.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from infra.manifest import ScorerSpec, unsafe_id_reason
from infra.storage import Store, StorageError
from infra.validation import sub_store
from workers.batching import map_batches
from workers.scorer_io import WEIGHTS_FILE, Scorer, ScorerLoadError, load_scorer

FEATURES_PREFIX = "features"
FORMAT_VERSION = 1  # bump when the stored vectors would change for the same inputs
KEY_HASH_CHARS = 16
METADATA_PREFIX = "fleetmerge."
Pooling = Literal["cls", "mean"]


# ---------------------------------------------------------------------------------------------
# Configuration and references


@dataclass(frozen=True)
class ExtractConfig:
    """How features are extracted.

    layer: index into the encoder's hidden states (embeddings output first, then one per layer), so
        -1 is the last layer and -3 (the default) the third-from-last.
    pooling: "cls" (first token) or "mean" (mean over the attention mask).
    max_responses / seed / split: which responses are used (split None = all splits).
    batch_size / max_length: tokenised length cap and batch size of the sorted batches.
    cuda_autocast / cuda_dtype: bf16 (or fp16) autocast when running on CUDA; CPU is always float32.
        bf16 falls back to fp16 on GPUs without bf16 support.
    """

    layer: int = -3
    pooling: Pooling = "cls"
    max_responses: int = 512
    seed: int = 0
    split: str | None = "train"
    batch_size: int = 64
    max_length: int = 128
    cuda_autocast: bool = True
    cuda_dtype: Literal["bfloat16", "float16"] = "bfloat16"

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"ExtractConfig.pooling must be 'cls' or 'mean', not {self.pooling!r}")
        if self.cuda_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"ExtractConfig.cuda_dtype must be 'bfloat16' or 'float16', not {self.cuda_dtype!r}")
        for name in ("max_responses", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ExtractConfig.{name} must be a positive integer, not {value!r}")
        if not isinstance(self.layer, int):
            raise ValueError(f"ExtractConfig.layer must be an integer hidden-state index, not {self.layer!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the vectors computed for given responses (what the config hash covers)."""
        return {"format": FORMAT_VERSION, "layer": self.layer, "pooling": self.pooling, "max_length": self.max_length,
                "cuda_autocast": self.cuda_autocast, "cuda_dtype": self.cuda_dtype}

    def config_hash(self) -> str:
        return _sha256(json.dumps(self.output_settings(), sort_keys=True).encode())


@dataclass(frozen=True)
class FeatureRef:
    """Where one scorer's features are and what they were made from (small and JSON-safe)."""

    scorer_id: str
    key: str
    n: int
    dim: int
    checkpoint_hash: str
    data_hash: str
    config_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FeatureRef":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ExtractionPlan:
    """The responses one scorer will be run over, and the key its features are stored under."""

    scorer_id: str
    key: str
    checkpoint_hash: str
    data_hash: str
    config_hash: str
    response_ids: tuple[str, ...] = field(repr=False)
    texts: tuple[str, ...] = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.response_ids)


# ---------------------------------------------------------------------------------------------
# Hashes and keys


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def data_hash(response_ids: Sequence[str], texts: Sequence[str]) -> str:
    """Hash of the (response_id, text) pairs actually used, in order (length-prefixed, so unambiguous)."""
    if len(response_ids) != len(texts):
        raise ValueError(f"data_hash: {len(response_ids)} response ids but {len(texts)} texts")
    digest = hashlib.sha256()
    for value in (v for pair in zip(response_ids, texts) for v in pair):
        encoded = str(value).encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:32]


def store_checkpoint_hash(store: Store, checkpoint: str) -> str:
    """`scorer_io.checkpoint_hash` of a checkpoint in any store (weights streamed, not downloaded whole)."""
    where = sub_store(store, checkpoint)
    try:
        _, weights_sha = where.size_and_sha256(WEIGHTS_FILE)
        config_bytes = where.read_bytes("config.json")
    except StorageError as exc:
        raise ValueError(f"checkpoint {checkpoint}: cannot hash it ({exc})") from None
    digest = hashlib.sha256(weights_sha.encode())
    digest.update(config_bytes)
    return digest.hexdigest()[:32]


def feature_key(scorer_id: str, checkpoint_hash: str, data_hash_: str, config_hash: str, *,
                prefix: str = FEATURES_PREFIX) -> str:
    """`<prefix>/<scorer>/<ckpt>-<data>-<cfg>.parquet` (16-character hash prefixes)."""
    problem = unsafe_id_reason(scorer_id)
    if problem:
        raise ValueError(f"scorer {scorer_id!r}: {problem}")
    stem = "-".join(h[:KEY_HASH_CHARS] for h in (checkpoint_hash, data_hash_, config_hash))
    return f"{prefix.strip('/')}/{scorer_id}/{stem}.parquet"


# ---------------------------------------------------------------------------------------------
# Choosing the responses


def stratified_sample(strata: Sequence[Hashable], max_n: int, seed: int) -> np.ndarray:
    """Sorted row indices of at most `max_n` rows, each stratum keeping its share (largest remainder), seeded.

    Every row is kept when there are no more than `max_n`. Strata get floor(share) rows, then the
    leftover rows go to the largest fractional shares (ties: larger stratum, then first appearance),
    so counts are within one of exact proportions; rows inside a stratum are drawn without replacement.
    """
    if max_n < 1:
        raise ValueError(f"stratified_sample: max_n must be at least 1, not {max_n}")
    n = len(strata)
    if n <= max_n:
        return np.arange(n)
    groups: dict[Hashable, list[int]] = {}
    for row, key in enumerate(strata):
        groups.setdefault(key, []).append(row)
    members = list(groups.values())
    sizes = np.array([len(m) for m in members])
    quota = max_n * sizes / n
    take = np.floor(quota).astype(int)
    leftover = max_n - int(take.sum())
    order = sorted(range(len(members)), key=lambda g: (-(quota[g] - take[g]), -sizes[g], g))
    for g in order[:leftover]:
        take[g] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.asarray(rows), size=k, replace=False) for rows, k in zip(members, take) if k > 0]
    return np.sort(np.concatenate(chosen))


def label_strata(table: pa.Table, task: str) -> list[Hashable] | None:
    """Stratum of each row: its label (multi-class) or its label-vector pattern (multi-label); None if no labels."""
    column = "labels" if task == "multilabel" else "label"
    if column not in table.column_names:
        return None
    values = table.column(column).to_pylist()
    if task == "multilabel":
        return [tuple(v) if v is not None else None for v in values]
    return values


def select_responses(table: pa.Table, task: str, config: ExtractConfig, *, source: str = "responses") -> pa.Table:
    """The rows features are extracted from: the configured split, then a stratified seeded sample."""
    for column in ("response_id", "text"):
        if column not in table.column_names:
            raise ValueError(f"{source}: missing the column {column!r} (have {table.column_names})")
    if config.split is not None:
        if "split" not in table.column_names:
            raise ValueError(f"{source}: no 'split' column, so the {config.split!r} split cannot be selected "
                             "(set ExtractConfig.split=None to use every row)")
        table = table.filter(pc.equal(table.column("split"), config.split))
    if table.num_rows == 0:
        raise ValueError(f"{source}: no responses in split {config.split!r}")
    strata = label_strata(table, task) or [None] * table.num_rows
    rows = stratified_sample(strata, config.max_responses, config.seed)
    return table.take(pa.array(rows, pa.int64()))


def _read_responses(store: Store, ref: str) -> pa.Table:
    if "://" in ref or ref.startswith("/"):
        parent, _, name = ref.rstrip("/").rpartition("/")
        return sub_store(store, parent or "/").read_table(name)
    return store.read_table(ref)


def plan_extraction(store: Store, spec: ScorerSpec, config: ExtractConfig = ExtractConfig(), *,
                    prefix: str = FEATURES_PREFIX) -> ExtractionPlan:
    """Choose the responses, hash the checkpoint and the data, and name the feature file (no model run)."""
    try:
        table = _read_responses(store, spec.responses)
    except StorageError as exc:
        raise ValueError(f"scorer {spec.id}: cannot read responses {spec.responses}: {exc}") from None
    chosen = select_responses(table, spec.task, config, source=f"scorer {spec.id}: {spec.responses}")
    ids = tuple(str(v) for v in chosen.column("response_id").to_pylist())
    texts = tuple("" if v is None else str(v) for v in chosen.column("text").to_pylist())
    ckpt = store_checkpoint_hash(store, spec.checkpoint)
    data = data_hash(ids, texts)
    cfg = config.config_hash()
    return ExtractionPlan(spec.id, feature_key(spec.id, ckpt, data, cfg, prefix=prefix), ckpt, data, cfg, ids, texts)


# ---------------------------------------------------------------------------------------------
# Running the encoder


class _StopForward(Exception):
    """Raised from a forward hook once the wanted layer has run: later layers are never computed."""


def _layer_list(encoder: torch.nn.Module) -> torch.nn.ModuleList | None:
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        module: Any = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module
    return None


def _num_layers(encoder: torch.nn.Module) -> int:
    layers = _layer_list(encoder)
    if layers is not None:
        return len(layers)
    count = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ValueError(f"{type(encoder).__name__}: cannot tell how many hidden layers it has")
    return count


def resolve_layer(layer: int, num_layers: int) -> int:
    """Hidden-state index in [0, num_layers] (0 = embeddings output) for a possibly negative `layer`."""
    count = num_layers + 1
    if not -count <= layer < count:
        raise ValueError(f"layer {layer} is out of range for an encoder with {num_layers} layers "
                         f"({count} hidden states: use {-count}..{num_layers})")
    return layer % count


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The bare encoder of a *ForSequenceClassification model (the model itself if it is bare)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def hidden_state(encoder: torch.nn.Module, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """hidden_states[index] of `encoder` on `batch` ([B, T, d]), computing no layer past the one needed.

    A forward hook on the module that produces that hidden state (the embeddings, or layer index-1)
    captures its output and stops the forward pass. The last layer, and encoders whose layers cannot
    be found or whose layer outputs are not [B, T, d] tensors, take the plain
    `output_hidden_states=True` path.
    """
    layers = _layer_list(encoder)
    source = None
    if layers is not None and index < len(layers):
        source = layers[index - 1] if index > 0 else getattr(encoder, "embeddings", None)
    if source is not None:
        captured: list[torch.Tensor] = []

        def grab(_module, _inputs, output):
            value = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                captured.append(value)
                raise _StopForward

        handle = source.register_forward_hook(grab)
        try:
            encoder(**batch)
        except _StopForward:
            return captured[0]
        finally:
            handle.remove()
    return encoder(**batch, output_hidden_states=True).hidden_states[index]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, T, d] -> [B, d] in float32: the first ([CLS]) token, or the mean over real (unpadded) tokens."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"pooling must be 'cls' or 'mean', not {pooling!r}")


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def autocast_dtype(device: torch.device, config: ExtractConfig) -> torch.dtype | None:
    """The reduced precision used on `device`, or None for float32 (always None on CPU)."""
    if device.type != "cuda" or not config.cuda_autocast:
        return None
    if config.cuda_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def precision_name(device: torch.device, config: ExtractConfig) -> str:
    dtype = autocast_dtype(device, config)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def extract_features(scorer: Scorer, texts: Sequence[str], config: ExtractConfig = ExtractConfig()) -> np.ndarray:
    """Pooled hidden layer `config.layer` of the scorer's encoder for each text: float32 [len(texts), d].

    Runs on the device the model is on, in length-sorted batches with dynamic padding under
    `torch.inference_mode` (rows come back in input order), with bf16/fp16 autocast on CUDA when
    configured. No texts gives a [0, d] array.
    """
    model = scorer.model
    model.eval()
    encoder = encoder_of(model)
    index = resolve_layer(config.layer, _num_layers(encoder))
    device = model_device(model)
    dtype = autocast_dtype(device, config)
    if len(texts) == 0:
        dim = getattr(getattr(encoder, "config", None), "hidden_size", 0)
        return np.zeros((0, int(dim)), dtype=np.float32)

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        context = torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else nullcontext()
        with context:
            hidden = hidden_state(encoder, batch, index)
        return pool(hidden, batch["attention_mask"], config.pooling)

    vectors = map_batches(run, scorer.tokenizer, list(texts), batch_size=config.batch_size,
                          max_length=config.max_length, device=device)
    return np.ascontiguousarray(vectors, dtype=np.float32)


MIN_RELATIVE_SPREAD = 1e-5


def check_spread(vectors: np.ndarray, scorer_id: str, config: ExtractConfig) -> None:
    """Refuse features that are the same for every response: GW of such a cloud is noise.

    It happens when the chosen layer sees no input, e.g. the first token of the embedding output
    (layer -3 of a 2-layer encoder): every response then differs only by float rounding.
    """
    if len(vectors) < 2:
        return
    spread = float(np.max(vectors.std(axis=0)))
    size = float(np.mean(np.abs(vectors))) + 1e-30
    if spread <= MIN_RELATIVE_SPREAD * size:
        raise ValueError(f"scorer {scorer_id!r}: features at layer {config.layer} ({config.pooling} pooling) are "
                         f"the same for every response (relative spread {spread / size:.1e}); that layer sees no "
                         f"input - choose another layer or pooling")


# ---------------------------------------------------------------------------------------------
# Feature files


def features_table(response_ids: Sequence[str], vectors: np.ndarray, metadata: dict[str, str]) -> pa.Table:
    """`response_id` + `vector` (fixed-size list of float32) with `fleetmerge.*` schema metadata."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(response_ids):
        raise ValueError(f"features_table: vectors of shape {vectors.shape} do not match {len(response_ids)} responses")
    dim = vectors.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    table = pa.table({"response_id": pa.array(list(response_ids), pa.string()), "vector": column})
    return table.replace_schema_metadata({f"{METADATA_PREFIX}{k}": v for k, v in metadata.items()})


def write_features(store: Store, plan: ExtractionPlan, vectors: np.ndarray, config: ExtractConfig, *,
                   device: str = "cpu", precision: str = "float32") -> FeatureRef:
    """Write the plan's feature file (atomically) and return its reference."""
    metadata = {"scorer_id": plan.scorer_id, "checkpoint_hash": plan.checkpoint_hash, "data_hash": plan.data_hash,
                "config_hash": plan.config_hash, "config": json.dumps(config.to_dict(), sort_keys=True),
                "n": str(vectors.shape[0]), "dim": str(vectors.shape[1]), "device": device, "precision": precision,
                "format_version": str(FORMAT_VERSION)}
    store.write_table(plan.key, features_table(plan.response_ids, vectors, metadata))
    return FeatureRef(plan.scorer_id, plan.key, int(vectors.shape[0]), int(vectors.shape[1]), plan.checkpoint_hash,
                      plan.data_hash, plan.config_hash)


def feature_metadata(store: Store, key: str) -> dict[str, str]:
    """The `fleetmerge.*` schema metadata of a feature file (reads only the footer on a local store)."""
    path = store.local_path(key)
    try:
        schema = pq.read_schema(path) if path is not None else pq.read_schema(pa.BufferReader(store.read_bytes(key)))
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"{store.uri_for(key)}: not a readable feature file: {exc}") from exc
    raw = schema.metadata or {}
    return {k.decode()[len(METADATA_PREFIX):]: v.decode() for k, v in raw.items()
            if k.decode().startswith(METADATA_PREFIX)}


def cached_ref(store: Store, plan: ExtractionPlan) -> FeatureRef | None:
    """The reference of the plan's feature file if it exists and its metadata matches the plan, else None."""
    if not store.exists(plan.key):
        return None
    try:
        meta = feature_metadata(store, plan.key)
        matches = all(meta.get(name) == getattr(plan, name) for name in ("checkpoint_hash", "data_hash", "config_hash"))
        if not matches or int(meta["n"]) != plan.n:
            return None
        return FeatureRef(plan.scorer_id, plan.key, int(meta["n"]), int(meta["dim"]), plan.checkpoint_hash,
                          plan.data_hash, plan.config_hash)
    except (StorageError, KeyError, ValueError):
        return None  # unreadable or foreign file: recompute and replace it


def read_features(store: Store, ref: FeatureRef) -> tuple[list[str], np.ndarray]:
    """(response ids, float32 array [n, dim]) of a feature file, checked against its reference."""
    table = store.read_table(ref.key)
    if table.column_names[:2] != ["response_id", "vector"]:
        raise ValueError(f"{store.uri_for(ref.key)}: expected columns response_id, vector; got {table.column_names}")
    column = table.column("vector")
    vector_type = column.type
    if not pa.types.is_fixed_size_list(vector_type) or vector_type.list_size != ref.dim:
        raise ValueError(f"{store.uri_for(ref.key)}: vector column is {vector_type}, expected {ref.dim} float32 values")
    if table.num_rows != ref.n:
        raise ValueError(f"{store.uri_for(ref.key)}: {table.num_rows} rows, but the reference says {ref.n}")
    flat = column.combine_chunks().flatten() if table.num_rows else pa.array([], pa.float32())
    vectors = flat.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(table.num_rows, ref.dim)
    return [str(v) for v in table.column("response_id").to_pylist()], vectors


# ---------------------------------------------------------------------------------------------
# One scorer, end to end


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_spec_scorer(store: Store, spec: ScorerSpec, device: str, *, base_model: str | None = None) -> Scorer:
    """Load a scorer from the store (S3 checkpoints are downloaded to a temporary directory first).

    `base_model`, when given, supplies the tokenizer of a scorer directory that ships none.
    """
    try:
        with ExitStack() as stack:
            path = stack.enter_context(sub_store(store, spec.checkpoint).local_dir(""))
            fallback: Path | None = None
            if base_model is not None:
                fallback = stack.enter_context(sub_store(store, base_model).local_dir(""))
            return load_scorer(path, task=spec.task, device=device, tokenizer_fallback=fallback)
    except Exception as exc:  # e.g. safetensors' own error on a corrupt file, which is not a ValueError
        raise ScorerLoadError(f"scorer {spec.id}: cannot load checkpoint {spec.checkpoint}: "
                              f"{type(exc).__name__}: {exc}") from None


def extract_for_spec(store: Store, spec: ScorerSpec, config: ExtractConfig = ExtractConfig(),
                     device: str | None = None, *, base_model: str | None = None, prefix: str = FEATURES_PREFIX,
                     force: bool = False) -> FeatureRef:
    """Features of one scorer over its own responses, written to the store; reused when already there.

    `device` defaults to CUDA when available. `force` recomputes and overwrites an existing file.
    """
    plan = plan_extraction(store, spec, config, prefix=prefix)
    if not force:
        ref = cached_ref(store, plan)
        if ref is not None:
            return ref
    device = device or default_device()
    scorer = load_spec_scorer(store, spec, device, base_model=base_model)
    vectors = extract_features(scorer, plan.texts, config)
    check_spread(vectors, spec.id, config)
    used = model_device(scorer.model)
    return write_features(store, plan, vectors, config, device=str(used), precision=precision_name(used, config))
