"""Turn a group of scorers into one backbone with a head per item, and gate it (DESIGN §5).

For one planned group: merge the members' backbones against the pretrained base (`gw.merge`),
optionally refit each head on the frozen merged backbone from cached first-token features
(`gw.head_fit`), choose the merge parameters on the validation split only (`gw.tuning`), and gate the
result (`gw.gate`): no member's validation macro F1 may fall by more than δ; a failed trio tries its
best pair; what fails stays individual. Test figures are computed for reporting, never for choosing.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gw.gate import DEFAULT_DELTA, GateDecision, gate_group
from gw.head_fit import refit_head
from gw.merge import merge
from gw.metrics import classification_metrics
from gw.tuning import default_grid, grid_search, worst_change
from infra.manifest import FleetManifest, ScorerSpec
from infra.storage import Store
from infra.validation import sub_store
from workers.batching import map_batches
from workers.evaluate import split_rows, targets
from workers.fleet_build import default_device
from workers.multihead import MultiHeadScorer
from workers.scorer_io import load_scorer, split_model

PRIMARY = "macro_f1"


@dataclass(frozen=True)
class MergeConfig:
    method: str = "ties"
    params: Mapping[str, Any] | None = None  # fixed parameters; the grid (if any) searches the rest
    grid: Sequence[Mapping[str, Any]] | None = None  # None: the method's default grid; [] : no search
    refit_heads: bool = True
    delta: float = DEFAULT_DELTA
    seed: int = 0
    batch_size: int = 64
    max_length: int = 128

    def candidates(self) -> list[dict]:
        if self.grid is not None:
            return [dict(c) for c in self.grid] or [{}]
        fixed = set(self.params or {})
        return [c for c in default_grid(self.method) if not set(c) & fixed] or [{}]

    def to_dict(self) -> dict:
        return {"method": self.method, "params": dict(self.params or {}), "refit_heads": self.refit_heads,
                "delta": self.delta, "seed": self.seed}


@dataclass
class Member:
    spec: ScorerSpec
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    texts: dict[str, list[str]]  # split -> texts
    labels: dict[str, np.ndarray]  # split -> targets


@dataclass
class Candidate:
    """A merged group with given parameters: its model and each member's validation metrics."""

    members: tuple[str, ...]
    params: dict
    model: MultiHeadScorer
    validation: dict[str, dict]
    merge_record: dict


@dataclass
class GroupOutcome:
    members: tuple[str, ...]
    decision: GateDecision
    candidate: Candidate | None  # the accepted merged (sub-)group, if any
    baseline: dict[str, dict]  # member -> its own scorer's validation metrics
    tuning: dict[tuple[str, ...], dict] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self) -> dict:
        return {"members": list(self.members), "gate": self.decision.to_dict(),
                "accepted": list(self.candidate.members) if self.candidate else [],
                "params": self.candidate.params if self.candidate else None,
                "merge": self.candidate.merge_record if self.candidate else None,
                "baseline_validation": self.baseline,
                "merged_validation": self.candidate.validation if self.candidate else {},
                "tuning": {"+".join(k): v for k, v in self.tuning.items()}, "seconds": round(self.seconds, 2)}


class GroupConsolidator:
    """Loads each scorer once and merges, refits, evaluates and gates groups of them."""

    def __init__(self, store: Store, manifest: FleetManifest, *, device: str | None = None):
        self.store, self.manifest = store, manifest
        self.device = device or default_device()
        self.heads = tuple(manifest.head_modules)
        base = load_scorer_dir_backbone(sub_store(store, manifest.base_model), self.heads)
        self.base_state = base
        self._members: dict[str, Member] = {}
        self._config = None
        self._tokenizer = None
        self._baseline: dict[str, dict] = {}

    # -- inputs ----------------------------------------------------------------------------------

    def member(self, spec: ScorerSpec) -> Member:
        if spec.id not in self._members:
            with sub_store(self.store, spec.checkpoint).local_dir("") as path:
                scorer = load_scorer(path, task=spec.task, device="cpu")
            backbone, head = split_model(scorer.model, self.heads)
            table = self.store.read_table(spec.responses)
            texts, labels = {}, {}
            for split in ("train", "validation", "test"):
                rows = split_rows(table, split)
                texts[split], labels[split] = rows.column("text").to_pylist(), targets(rows, spec.task)
            if self._config is None:
                self._config, self._tokenizer = scorer.model.config, scorer.tokenizer
                # Buffers the base checkpoint carries but the models do not (BERT's position_ids) are not merged.
                self.base_state = {k: v for k, v in self.base_state.items() if k in backbone}
            own = MultiHeadScorer(scorer.model.config, backbone, {spec.id: head}, {spec.id: _schema(spec)})
            self._members[spec.id] = Member(spec, backbone, head, texts, labels)
            self._baseline[spec.id] = self._scores(own.to(self.device), spec.id, "validation")
        return self._members[spec.id]

    def baseline(self, spec: ScorerSpec) -> dict:
        self.member(spec)
        return self._baseline[spec.id]

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def model_config(self):
        """The members' transformers config (known once a member is loaded)."""
        return self._config

    # -- building and scoring -------------------------------------------------------------------

    def features(self, model: MultiHeadScorer, texts: Sequence[str]) -> np.ndarray:
        """First-token features of `texts` through `model`'s backbone (what every head reads)."""
        return map_batches(model.encode, self._tokenizer, texts, batch_size=64, max_length=128, device=self.device)

    def predict(self, model: MultiHeadScorer, item: str, features: np.ndarray) -> np.ndarray:
        """`item`'s predictions from backbone features: class indices, or multi-hot for multi-label items."""
        with torch.inference_mode():
            logits = model.heads[item](torch.as_tensor(features, device=self.device)).float().cpu().numpy()
        return (logits > 0).astype(np.int64) if self._members[item].spec.task == "multilabel" else logits.argmax(-1)

    def _scores(self, model: MultiHeadScorer, item: str, split: str, features: np.ndarray | None = None) -> dict:
        member = self._members[item]
        spec, texts = member.spec, member.texts[split]
        if features is None:
            features = self.features(model, texts)
        predicted = self.predict(model, item, features)
        labels = list(range(spec.n_labels)) if spec.task == "multiclass" else None
        result = classification_metrics(spec.task, member.labels[split], predicted, labels)
        return {**result, "n": len(texts)}

    def build(self, specs: Sequence[ScorerSpec], params: Mapping[str, Any], config: MergeConfig) -> Candidate:
        """Merge, optionally refit heads, and score every member on validation."""
        members = [self.member(s) for s in specs]
        result = merge(config.method, self.base_state, [m.backbone for m in members], seed=config.seed, **params)
        heads = {m.spec.id: m.head for m in members}
        model = MultiHeadScorer(self._config, result.state_dict, heads, {m.spec.id: _schema(m.spec) for m in members})
        model.to(self.device)
        validation = {}
        for m in members:
            val_features = self.features(model, m.texts["validation"])
            if config.refit_heads:
                train_features = self.features(model, m.texts["train"])
                fitted = refit_head(train_features, m.labels["train"], m.head, val_features=val_features,
                                    val_labels=m.labels["validation"], task=m.spec.task, seed=config.seed,
                                    device=self.device)
                model.heads[m.spec.id].load_head_state(fitted.state_dict)
            validation[m.spec.id] = self._scores(model, m.spec.id, "validation", val_features)
        record = result.record() | {"refit_heads": config.refit_heads}
        record["info"] = {k: v for k, v in record["info"].items() if k != "loss_curve"}
        return Candidate(tuple(m.spec.id for m in members), dict(result.params), model, validation, record)

    def tuned(self, specs: Sequence[ScorerSpec], config: MergeConfig) -> tuple[Candidate, dict]:
        """The best candidate over the parameter grid, judged by the worst validation change."""
        baseline = {s.id: self.baseline(s)[PRIMARY] for s in specs}
        built: dict[int, Candidate] = {}

        def score(params: dict) -> float:
            candidate = self.build(specs, params, config)
            built[len(built)] = candidate
            return worst_change(baseline, {i: candidate.validation[i][PRIMARY] for i in baseline})

        search = grid_search(config.candidates(), score, fixed=dict(config.params or {}))
        best_index = next(i for i, row in enumerate(search.table) if row["params"] == search.best_params)
        return built[best_index], search.to_dict()

    def consolidate(self, specs: Sequence[ScorerSpec], config: MergeConfig) -> GroupOutcome:
        """Tune, merge and gate one planned group; a failed trio falls back to its best passing pair."""
        started = time.perf_counter()
        by_id = {s.id: s for s in specs}
        baseline = {s.id: self.baseline(s) for s in specs}
        candidates: dict[tuple[str, ...], Candidate] = {}
        tuning: dict[tuple[str, ...], dict] = {}

        def evaluate(sub: tuple[str, ...]) -> dict[str, float]:
            candidate, search = self.tuned([by_id[i] for i in sub], config)
            candidates[sub], tuning[sub] = candidate, search
            return {i: candidate.validation[i][PRIMARY] for i in sub}

        decision = gate_group([s.id for s in specs], {i: b[PRIMARY] for i, b in baseline.items()}, evaluate,
                              delta=config.delta, metric=PRIMARY)
        accepted = candidates.get(tuple(decision.accepted)) if decision.passed else None
        return GroupOutcome(tuple(by_id), decision, accepted, baseline, tuning, time.perf_counter() - started)

    def test_scores(self, model: MultiHeadScorer, items: Sequence[str]) -> dict[str, dict]:
        return {i: self._scores(model, i, "test") for i in items}

    def individual(self, spec: ScorerSpec) -> MultiHeadScorer:
        """An item on its own scorer, in the consolidated format (its backbone, its head)."""
        m = self.member(spec)
        return MultiHeadScorer(self._config, m.backbone, {spec.id: m.head}, {spec.id: _schema(spec)}).to(self.device)


def _schema(spec: ScorerSpec) -> dict:
    return {"task": spec.task, "labels": list(spec.labels)}


def load_scorer_dir_backbone(store: Store, head_modules: Sequence[str]) -> dict[str, torch.Tensor]:
    from workers.scorer_io import load_backbone_state

    with store.local_dir("") as path:
        return load_backbone_state(path, head_modules)
