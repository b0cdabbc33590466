"""The fleet manifest (docs/architecture.md §3.1): its schema, loading and saving.

A manifest lives in a store (local directory or S3 prefix) next to the files it names; every
`checkpoint`, `responses` and `base_model` path in it is a key relative to that store's root, never an
absolute path or a URI (the store refuses what leads outside it: `Store.sub`). Validation of what the
manifest points at is in `infra/validation.py`.
"""
from __future__ import annotations

import json
import re
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from infra.storage import Store

MANIFEST_KEY = "fleet.yaml"
DEFAULT_HEAD_MODULES = ("pooler", "classifier")
SPLITS = ("train", "validation", "test")

# Ids become storage keys and file names: letters, digits, '.', '_', '-' only; no leading dot.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class ManifestError(ValueError):
    """The manifest itself is unusable (not a per-scorer problem)."""


def unsafe_id_reason(scorer_id: str) -> str | None:
    """Why an id cannot be used as a storage key, or None when it is safe."""
    if not scorer_id:
        return "id is empty"
    if ".." in scorer_id or "/" in scorer_id or "\\" in scorer_id:
        return f"id {scorer_id!r} contains a path separator or '..' and is unsafe as a storage key"
    if not _SAFE_ID.match(scorer_id):
        return f"id {scorer_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-' (no leading dot)"
    return None


class ScorerSpec(BaseModel):
    """One item's scorer: its fine-tuned checkpoint and its scored responses."""

    model_config = ConfigDict(extra="forbid")

    id: str
    checkpoint: str
    responses: str
    task: Literal["multiclass", "multilabel"]
    labels: list[str] = Field(min_length=1)
    description: str | None = None
    module: str | None = None

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str]) -> list[str]:
        if len(set(labels)) != len(labels):
            raise ValueError("label names must be distinct")
        return labels

    @property
    def n_labels(self) -> int:
        return len(self.labels)


class FleetManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fleet: str
    base_model: str
    head_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_HEAD_MODULES))
    scorers: list[ScorerSpec]
    # Scorer entries that failed the schema: (id or "#index", reason). Not written back out.
    malformed: list[tuple[str, str]] = Field(default_factory=list, exclude=True)

    def scorer(self, scorer_id: str) -> ScorerSpec:
        for spec in self.scorers:
            if spec.id == scorer_id:
                return spec
        raise KeyError(f"no scorer {scorer_id!r} in fleet {self.fleet!r}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False, allow_unicode=True)


def parse_manifest(text: str, source: str = "manifest") -> FleetManifest:
    """Parse YAML or JSON text; errors name the source and the offending field."""
    try:
        raw = yaml.safe_load(text) if not text.lstrip().startswith("{") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{source}: not valid YAML/JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{source}: expected a mapping with fleet, base_model and scorers")
    entries = raw.get("scorers")
    if not isinstance(entries, list):
        raise ManifestError(f"{source}: 'scorers' must be a list of scorer entries")
    # Each scorer entry is checked on its own, so one malformed entry does not sink the fleet.
    scorers, malformed = [], []
    for index, entry in enumerate(entries):
        name = str(entry.get("id")) if isinstance(entry, dict) and entry.get("id") is not None else f"#{index}"
        try:
            scorers.append(ScorerSpec.model_validate(entry))
        except ValidationError as exc:
            malformed.append((name, f"scorer {name}: malformed manifest entry: {_describe(exc)}"))
    try:
        manifest = FleetManifest.model_validate({**raw, "scorers": []})
    except ValidationError as exc:
        raise ManifestError(f"{source}: {_describe(exc)}") from None
    return manifest.model_copy(update={"scorers": scorers, "malformed": malformed})


def _describe(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}" for err in exc.errors())


def load_manifest(store: Store, key: str = MANIFEST_KEY) -> FleetManifest:
    if not store.exists(key):
        raise ManifestError(f"no fleet manifest at {store.uri_for(key)}")
    return parse_manifest(store.read_bytes(key).decode("utf-8"), store.uri_for(key))


def save_manifest(store: Store, manifest: FleetManifest, key: str = MANIFEST_KEY) -> None:
    store.write_bytes(key, manifest.to_yaml().encode("utf-8"))
