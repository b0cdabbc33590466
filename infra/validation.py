"""Validate a fleet before any work is done on it.

Every problem names the scorer and the file. A broken scorer is set aside with its reasons and the
rest of the fleet goes on; a fleet with fewer than two usable scorers is an error. Weights are read
as safetensors only (never unpickled).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from infra.manifest import SPLITS, FleetManifest, ManifestError, ScorerSpec, unsafe_id_reason
from infra.safetensors_header import FLOAT_DTYPES, SafetensorsFormatError, non_finite_tensors, parse_header
from infra.storage import Store, StorageError

WEIGHTS_FILE = "model.safetensors"
PICKLED_WEIGHTS = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")
# What must agree with the base model for a task vector to make sense.
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


class FleetValidationError(ValueError):
    """The fleet as a whole cannot be consolidated."""


@dataclass
class ValidationReport:
    manifest: FleetManifest
    usable: list[ScorerSpec]
    rejected: dict[str, list[str]] = field(default_factory=dict)

    @property
    def usable_ids(self) -> list[str]:
        return [s.id for s in self.usable]

    def to_dict(self) -> dict:
        return {"fleet": self.manifest.fleet, "usable": self.usable_ids, "rejected": self.rejected}

    def summary(self) -> str:
        lines = [f"fleet {self.manifest.fleet}: {len(self.usable)} usable, {len(self.rejected)} set aside"]
        for scorer_id, reasons in self.rejected.items():
            lines += [f"  set aside {scorer_id}: {r}" for r in reasons]
        return "\n".join(lines)


def sub_store(store: Store, ref: str) -> Store:
    """``store.sub(ref)`` (kept for callers of this name): a store rooted at `ref`."""
    return store.sub(ref)


@dataclass
class _Base:
    config: dict
    shapes: dict[str, tuple[int, ...]]  # backbone tensors, names relative to the encoder


def _load_base(store: Store, manifest: FleetManifest) -> _Base:
    where = store.sub(manifest.base_model)
    try:
        config = json.loads(where.read_bytes("config.json"))
        tensors, _, _ = parse_header(where.read_bytes(WEIGHTS_FILE))
    except (StorageError, OSError, json.JSONDecodeError, SafetensorsFormatError) as exc:
        raise ManifestError(f"base model {manifest.base_model}: unreadable ({exc})") from None
    heads = tuple(manifest.head_modules)
    # Integer tensors are buffers (e.g. BERT's position_ids), which newer savers leave out.
    shapes = {n: t.shape for n, t in tensors.items() if not _is_head(n, heads) and t.dtype in FLOAT_DTYPES}
    return _Base(config, shapes)


def _is_head(name: str, head_modules: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(m in parts[:2] for m in head_modules)


def _strip_prefix(name: str, base_names: set[str]) -> str:
    """Task-model names carry the encoder prefix (`bert.encoder...`); the base's do not."""
    if name in base_names:
        return name
    head, _, rest = name.partition(".")
    return rest if rest in base_names else name


def _check_checkpoint(where: Store, spec: ScorerSpec, base: _Base, heads: tuple[str, ...]) -> list[str]:
    ckpt = spec.checkpoint
    if not where.exists("config.json"):
        return [f"missing file {ckpt}/config.json"]
    if not where.exists(WEIGHTS_FILE):
        pickled = [f for f in PICKLED_WEIGHTS if where.exists(f)]
        if pickled:
            return [f"weights {ckpt}/{pickled[0]} are not safetensors (pickled weights are never loaded); "
                    f"convert them to {WEIGHTS_FILE}"]
        return [f"missing file {ckpt}/{WEIGHTS_FILE}"]
    try:
        config = json.loads(where.read_bytes("config.json"))
    except (StorageError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"unreadable {ckpt}/config.json: {exc}"]
    if not isinstance(config, dict):
        return [f"unreadable {ckpt}/config.json: not a JSON object"]
    problems = []
    for key in ARCHITECTURE_KEYS:
        if key in base.config and config.get(key) != base.config[key]:
            problems.append(f"{ckpt}/config.json: {key} is {config.get(key)!r} but the base model has "
                            f"{base.config[key]!r}")
    if problems:
        return problems
    try:
        data = where.read_bytes(WEIGHTS_FILE)
        tensors, _, _ = parse_header(data)
    except SafetensorsFormatError as exc:
        return [f"weights {ckpt}/{WEIGHTS_FILE} are not valid safetensors: {exc}"]
    except (StorageError, OSError) as exc:
        return [f"unreadable {ckpt}/{WEIGHTS_FILE}: {exc}"]
    base_names = set(base.shapes)
    own = {_strip_prefix(n, base_names): t for n, t in tensors.items() if not _is_head(_strip_prefix(n, base_names), heads)}
    missing = sorted(base_names - set(own))
    if missing:
        problems.append(f"{ckpt}/{WEIGHTS_FILE}: {len(missing)} backbone tensors of the base model are missing "
                        f"(e.g. {missing[0]}); architecture does not match the base model")
    wrong = [n for n in base_names & set(own) if own[n].shape != base.shapes[n]]
    if wrong:
        n = sorted(wrong)[0]
        problems.append(f"{ckpt}/{WEIGHTS_FILE}: tensor {n} has shape {list(own[n].shape)}, the base model "
                        f"{list(base.shapes[n])}")
    classifier = [t for n, t in tensors.items() if n.endswith(("classifier.weight", "classifier.out_proj.weight"))]
    if not classifier:
        problems.append(f"{ckpt}/{WEIGHTS_FILE}: no classifier head (expected a tensor ending in classifier.weight)")
    elif classifier[0].shape[0] != spec.n_labels:
        problems.append(f"{ckpt}: head has {classifier[0].shape[0]} outputs but the manifest declares "
                        f"{spec.n_labels} labels {spec.labels}")
    bad = non_finite_tensors(data, tensors)
    if bad:
        problems.append(f"{ckpt}/{WEIGHTS_FILE}: NaN or Inf in {len(bad)} tensors (e.g. {bad[0]})")
    return problems


def _check_responses(store: Store, spec: ScorerSpec) -> list[str]:
    path = spec.responses
    try:
        table = store.read_table(path) if "://" not in path and not path.startswith("/") \
            else store.sub(_parent(path)).read_table(_name(path))
    except (StorageError, OSError, pa.ArrowInvalid) as exc:
        return [f"missing or unreadable responses {path}: {exc}"]
    label_column = "label" if spec.task == "multiclass" else "labels"
    lacking = [c for c in ("response_id", "text", label_column, "split") if c not in table.column_names]
    if lacking:
        return [f"responses {path} lacks column(s) {', '.join(lacking)}"]
    if table.num_rows == 0:
        return [f"responses {path} is empty"]
    problems = []
    splits = Counter(table.column("split").to_pylist())
    absent = [s for s in SPLITS if not splits.get(s)]
    if absent:
        problems.append(f"responses {path} has no rows in split(s) {', '.join(absent)}")
    labels = table.column(label_column).to_pylist()
    n = spec.n_labels
    if spec.task == "multiclass":
        out = [x for x in labels if not isinstance(x, int) or not 0 <= x < n]
        detail = f"labels must be integers in [0, {n})"
    else:
        out = [x for x in labels if not isinstance(x, list) or len(x) != n or any(v not in (0, 1) for v in x)]
        detail = f"labels must be lists of {n} values in {{0, 1}}"
    if out:
        problems.append(f"responses {path}: {len(out)} rows have labels out of range (e.g. {out[0]!r}); {detail}")
    return problems


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] if "/" in path.strip("/") else ""


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def validate_fleet(store: Store, manifest: FleetManifest, *, min_usable: int = 2) -> ValidationReport:
    """Check every scorer; set broken ones aside with their reasons; raise if fewer than `min_usable` remain."""
    base = _load_base(store, manifest)
    heads = tuple(manifest.head_modules)
    rejected: dict[str, list[str]] = {name: [reason] for name, reason in manifest.malformed}
    counts = Counter(s.id for s in manifest.scorers)
    usable = []
    for spec in manifest.scorers:
        problems = []
        unsafe = unsafe_id_reason(spec.id)
        if unsafe:
            problems.append(unsafe)
        elif counts[spec.id] > 1:
            problems.append(f"id {spec.id!r} appears {counts[spec.id]} times in the manifest")
        else:
            try:
                problems += _check_checkpoint(store.sub(spec.checkpoint), spec, base, heads)
            except (StorageError, OSError) as exc:
                problems.append(f"checkpoint {spec.checkpoint} unreadable: {exc}")
            problems += _check_responses(store, spec)
        if problems:
            rejected.setdefault(spec.id or "<empty id>", []).extend(problems)
        else:
            usable.append(spec)
    report = ValidationReport(manifest, usable, rejected)
    if len(usable) < min_usable:
        raise FleetValidationError(
            f"fleet {manifest.fleet}: only {len(usable)} usable scorer(s), need at least {min_usable}\n"
            + report.summary()
        )
    return report
