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
# What decides the ids a text becomes (truncation and padding may differ per scorer). A merged backbone
# reads every member's inputs through one tokenizer, so each scorer's must be the base model's.
TOKENIZER_PARTS = ("model", "normalizer", "pre_tokenizer", "added_tokens")


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
    """``store.sub(ref)`` (kept for callers of this name): the store at key `ref`, which must be inside it."""
    return store.sub(ref)


@dataclass
class _Base:
    config: dict
    shapes: dict[str, tuple[int, ...]]  # backbone tensors, names relative to the encoder
    tokenizer: dict | None = None  # `_tokenizer_view` of the base; None when it ships no tokenizer


def _load_base(store: Store, manifest: FleetManifest) -> _Base:
    where = store.sub(manifest.base_model)
    try:
        config = json.loads(where.read_bytes("config.json"))
        tensors, _, _ = parse_header(where.read_bytes(WEIGHTS_FILE))
        tokenizer = _tokenizer_view(where)
    except (StorageError, OSError, ValueError, SafetensorsFormatError) as exc:
        raise ManifestError(f"base model {manifest.base_model}: unreadable ({exc})") from None
    heads = tuple(manifest.head_modules)
    # Integer tensors are buffers (e.g. BERT's position_ids), which newer savers leave out.
    shapes = {n: t.shape for n, t in tensors.items() if not _is_head(n, heads) and t.dtype in FLOAT_DTYPES}
    return _Base(config, shapes, tokenizer)


def _tokenizer_view(where: Store) -> dict | None:
    """The parts of a checkpoint's tokenizer files that decide token ids (None: it ships no tokenizer).

    Read from `tokenizer.json` (what a fast tokenizer loads) or else `vocab.txt` / `vocab.json`;
    `vocab` is always token -> id, so views from different files still compare on it.
    """
    if where.exists("tokenizer.json"):
        doc = json.loads(where.read_bytes("tokenizer.json"))
        view = {part: doc.get(part) for part in TOKENIZER_PARTS}
        vocab = (doc.get("model") or {}).get("vocab")
        # Unigram models list [piece, score] pairs: the id is the position.
        view["vocab"] = {entry[0]: i for i, entry in enumerate(vocab)} if isinstance(vocab, list) else vocab
        return view
    if where.exists("vocab.txt"):
        lines = where.read_bytes("vocab.txt").decode("utf-8").splitlines()
        return {"vocab": {token: i for i, token in enumerate(lines)}}
    if where.exists("vocab.json"):
        return {"vocab": json.loads(where.read_bytes("vocab.json"))}
    return None


def _tokenizer_problem(own: dict, base: dict) -> str | None:
    """How a scorer's tokenizer differs from the base model's, in a few words (None: it does not)."""
    for part in ("vocab", *TOKENIZER_PARTS):
        if part not in own or part not in base or own[part] == base[part]:
            continue
        if part != "vocab" or not isinstance(own[part], dict) or not isinstance(base[part], dict):
            return f"its {part} differs"
        a, b = own[part], base[part]
        moved = sorted(t for t in a.keys() & b.keys() if a[t] != b[t])
        if moved:
            t = moved[0]
            return f"{len(moved)} of {len(b)} tokens have other ids (e.g. {t!r} is {a[t]}, in the base {b[t]})"
        return f"its vocabulary has {len(a.keys() - b.keys())} tokens the base lacks and lacks {len(b.keys() - a.keys())}"
    return None


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
    if base.tokenizer is not None:  # a scorer that ships no tokenizer uses the base's
        try:
            own_tokenizer = _tokenizer_view(where)
        except (StorageError, OSError, ValueError) as exc:
            return [f"unreadable tokenizer files in {ckpt}: {exc}"]
        different = own_tokenizer and _tokenizer_problem(own_tokenizer, base.tokenizer)
        if different:
            return [f"{ckpt}: tokenizer differs from the base model's ({different}); a merged backbone reads "
                    "every member's inputs through one tokenizer"]
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
        table = store.read_table(path)
    except (StorageError, OSError, pa.ArrowInvalid) as exc:
        return [f"missing or unreadable responses {path}: {exc}"]
    label_column = "label" if spec.task == "multiclass" else "labels"
    lacking = [c for c in ("response_id", "text", label_column, "split") if c not in table.column_names]
    if lacking:
        return [f"responses {path} lacks column(s) {', '.join(lacking)}"]
    if table.num_rows == 0:
        return [f"responses {path} is empty"]
    problems = _check_texts(table, path)
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


def _check_texts(table: pa.Table, path: str) -> list[str]:
    """Every response needs an id and a text: a null would be scored as "" by extraction and fail the merge."""
    problems = []
    text = table.column("text")
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type) or pa.types.is_null(text.type)):
        return [f"responses {path}: column text holds {text.type}, not strings"]
    ids = table.column("response_id").to_pylist()
    for column in ("response_id", "text"):
        values = table.column(column).to_pylist()
        missing = [n for n, v in enumerate(values) if v is None]
        if missing:
            where = f"row {missing[0]}" if column == "response_id" else f"response {ids[missing[0]]!r}"
            problems.append(f"responses {path}: {len(missing)} rows have a null {column} (e.g. {where})")
    return problems


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
                problems.append(f"checkpoint {spec.checkpoint}: {exc}")
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
