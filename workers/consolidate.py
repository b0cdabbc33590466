"""Turn a group of scorers into one backbone with a head per item, and gate it (docs/architecture.md §4.4).

For one planned group: merge the members' backbones against the pretrained base (`gw.merge`), score
each member with its own head and with a head refit on the frozen merged backbone (`gw.head_fit`),
choose the merge parameters on the validation split only (`gw.tuning`), and gate the result
(`gw.gate`, with its uncertainty: see there); a failed group tries its best pair; what fails stays
individual. Test figures are computed for reporting, never for choosing.

With `item_correction`, each member also keeps a low-rank residual of its own backbone against the merged
one (`gw.merge.correction`, applied as per-row LoRA: `workers.correction`), its rank chosen per item by
agreement with its own scorer on its train and validation answers; every score of that member, and so the
gate, is of the corrected item.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gw import gate
from gw.gate import DEFAULT_DELTA
from gw.head_fit import refit_head
from gw.merge import merge, needs_grams
from gw.merge.correction import choose_rank, module_factors, total_energy_kept
from gw.mergeability import agreement
from gw.tuning import default_grid, grid_search, worst_change
from infra.manifest import FleetManifest, ScorerSpec
from infra.storage import Store
from workers.batching import map_batches
from workers.correction import item_residuals
from workers.evaluate import item_metrics, split_rows, targets
from workers.grams import cached_grams, input_grams
from workers.multihead import MultiHeadScorer
from workers.extract.run import load_spec_scorer
from workers.scorer_io import default_device, has_tokenizer, load_backbone_state, load_tokenizer, split_model

PRIMARY = "macro_f1"
SPLITS = ("train", "validation", "test")
HEAD_SETTINGS = ("own_heads", "refit_heads")
GRAM_MAX_LENGTH = 128  # the tokens the features (and so the heads) see
# Ranks tried per item for its correction; 0 (none) wins when the plain merge agrees as well with the item's
# own scorer. The smallest rank within CORRECTION_TOLERANCE of the best agreement is kept (probability
# overlap, 0-1): a rank 16 adapter is ~3 % of a MiniLM-L6 encoder, so a hair more agreement is not worth it.
CORRECTION_RANKS = (0, 4, 8, 16)
CORRECTION_TOLERANCE = 0.01
CORRECTION_RULE = "agreement"  # in the cache keys: sweeps chosen by validation macro F1 are not reused


@dataclass(frozen=True)
class MergeConfig:
    method: str = "ties"
    params: Mapping[str, Any] | None = None  # fixed parameters; the grid (if any) searches the rest
    grid: Sequence[Mapping[str, Any]] | None = None  # None: the method's default grid; [] : no search
    refit_heads: bool = True
    delta: float = DEFAULT_DELTA
    gate: str = "bound"  # the gate rule's name (gw.gate)
    seed: int = 0
    batch_size: int = 64
    max_length: int = 128
    item_correction: bool = False  # each member keeps a low-rank residual against the merged backbone
    correction_ranks: Sequence[int] = CORRECTION_RANKS  # the grid its rank is chosen from (by agreement)

    def __post_init__(self):
        ranks = tuple(self.correction_ranks)
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
            raise ValueError(f"correction_ranks must be integers >= 0, got {list(ranks)}")
        object.__setattr__(self, "correction_ranks", tuple(sorted(set(ranks))))

    def correction(self) -> dict | None:
        """The correction setting as the cache keys see it (None when off, so older keys stay as they were)."""
        return {"ranks": list(self.correction_ranks), "rule": CORRECTION_RULE} if self.item_correction else None

    def candidates(self) -> list[dict]:
        if self.grid is not None:
            return [dict(c) for c in self.grid] or [{}]
        fixed = set(self.params or {})
        return [c for c in default_grid(self.method) if not set(c) & fixed] or [{}]

    def to_dict(self) -> dict:
        """Everything a group's result depends on (its cache key hashes this): None, [] and a list of
        candidates are different grids, so they must stay apart here."""
        grid = None if self.grid is None else [dict(c) for c in self.grid]
        out = {"method": self.method, "params": dict(self.params or {}), "grid": grid,
               "refit_heads": self.refit_heads, "delta": self.delta, "gate": self.gate, "seed": self.seed}
        return out | ({"item_correction": self.correction()} if self.item_correction else {})


@dataclass
class Member:
    spec: ScorerSpec
    backbone: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor]
    texts: dict[str, list[str]]  # split -> texts
    labels: dict[str, np.ndarray]  # split -> targets


@dataclass
class GroupOutcome:
    """A planned group after tuning and the gate; `candidate` is the accepted (sub-)group's evaluation."""

    members: tuple[str, ...]
    decision: gate.GateDecision
    candidate: dict | None  # the chosen evaluation of the accepted (sub-)group (see `evaluate`), if any
    own: dict[str, dict]  # member -> its own scorer's scores (see `own`)
    head_setting: str
    tuning: dict[tuple[str, ...], dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def accepted(self) -> list[str]:
        return list(self.candidate["members"]) if self.candidate else []

    def record(self) -> dict:
        scores = self.candidate["scores"][self.head_setting] if self.candidate else {}
        return {"members": list(self.members), "gate": self.decision.to_dict(), "accepted": self.accepted,
                "params": self.candidate["params"] if self.candidate else None,
                "merge": self.candidate["merge"] if self.candidate else None, "head_setting": self.head_setting,
                "correction": self.candidate.get("correction") if self.candidate else None,
                "baseline_validation": {i: o["validation"] for i, o in self.own.items()},
                "baseline_test": {i: o["test"] for i, o in self.own.items()},
                "merged_validation": {i: s["validation"] for i, s in scores.items()},
                "merged_test": {i: s["test"] for i, s in scores.items()},
                "merged_test_predictions": {i: s["test_predictions"] for i, s in scores.items()},
                "tuning": {"+".join(k): v for k, v in self.tuning.items()}, "seconds": round(self.seconds, 2)}


def head_setting(config: MergeConfig) -> str:
    return "refit_heads" if config.refit_heads else "own_heads"


def choose(evaluations: Sequence[dict], own: Mapping[str, dict], setting: str) -> tuple[dict, dict]:
    """The evaluation the product picks for one head setting: the best worst validation change of macro F1
    over the grid (`gw.tuning`; earlier candidates win ties). Returns (that evaluation, the search table)."""
    baseline = {i: own[i]["validation"][PRIMARY] for i in evaluations[0]["members"]}
    by_index = {n: e for n, e in enumerate(evaluations)}

    def score(params: dict) -> float:
        merged = by_index[params["_index"]]["scores"][setting]
        return worst_change(baseline, {i: merged[i]["validation"][PRIMARY] for i in baseline})

    search = grid_search([{"_index": n} for n in by_index], score).to_dict()
    best = by_index[search["best_params"]["_index"]]
    table = [{"params": by_index[row["params"]["_index"]]["params"], "score": row["score"]} for row in search["table"]]
    return best, {"best_params": best["params"], "best_score": search["best_score"], "table": table}


def evidence(scores: Mapping[str, Any], task: str, labels: np.ndarray) -> gate.Evidence:
    """The gate's view of one model on one item: its validation probabilities and the labels."""
    return gate.Evidence(task=task, labels=np.asarray(labels), probs=np.asarray(scores["validation_probs"], dtype=np.float64))


class GroupConsolidator:
    """Loads each scorer once and merges, refits, scores and gates groups of them.

    One path: `evaluate` merges a group once with given parameters and scores every member on
    validation and test with both head settings (own heads, heads refit on the merged backbone);
    `sweep` does so for every candidate of the merge grid; `choose` picks parameters on validation;
    `consolidate` gates the choice. The product's group job and the quality benchmark both call these.
    """

    def __init__(self, store: Store, manifest: FleetManifest, *, device: str | None = None):
        self.store, self.manifest = store, manifest
        self.device = device or default_device()
        self.heads = tuple(manifest.head_modules)
        with store.sub(manifest.base_model).local_dir("") as base_dir:
            self.base_state = load_backbone_state(base_dir, self.heads)
            # Every merged checkpoint is saved with, and scored through, the base model's tokenizer
            # (validation sets aside scorers whose own differs); a base without one: the first member's.
            self._tokenizer = load_tokenizer(base_dir) if has_tokenizer(base_dir) else None
        self._members: dict[str, Member] = {}
        self._grams: dict[str, dict[str, torch.Tensor]] = {}
        self._config = None

    # -- inputs ----------------------------------------------------------------------------------

    def member(self, spec: ScorerSpec) -> Member:
        if spec.id not in self._members:
            scorer = load_spec_scorer(self.store, spec, "cpu", base_model=self.manifest.base_model)
            if self._tokenizer is None:
                self._tokenizer = scorer.tokenizer
            elif scorer.tokenizer.get_vocab() != self._tokenizer.get_vocab():
                raise ValueError(f"scorer {spec.id}: its tokenizer differs from the base model's; it cannot share a "
                                 "merged backbone (validate the fleet: such scorers are set aside)")
            backbone, head = split_model(scorer.model, self.heads)
            table = self.store.read_table(spec.responses)
            texts, labels = {}, {}
            for split in SPLITS:
                rows = split_rows(table, split)
                texts[split], labels[split] = rows.column("text").to_pylist(), targets(rows, spec.task)
            if self._config is None:
                self._config = scorer.model.config
                # Buffers the base checkpoint carries but the models do not (BERT's position_ids) are not merged.
                self.base_state = {k: v for k, v in self.base_state.items() if k in backbone}
            self._members[spec.id] = Member(spec, backbone, head, texts, labels)
        return self._members[spec.id]

    def grams(self, spec: ScorerSpec) -> dict[str, torch.Tensor]:
        """The member's layer-input Grams on its training answers (RegMean's statistics; cached in the store)."""
        if spec.id not in self._grams:
            member = self.member(spec)
            compute = lambda: input_grams(self.individual(spec).backbone, self._tokenizer,  # noqa: E731
                                          member.texts["train"], max_length=GRAM_MAX_LENGTH, device=self.device)
            self._grams[spec.id] = cached_grams(self.store, spec, compute, max_length=GRAM_MAX_LENGTH)
        return self._grams[spec.id]

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def model_config(self):
        """The members' transformers config (known once a member is loaded)."""
        return self._config

    # -- scoring -----------------------------------------------------------------------------------

    def features(self, model: MultiHeadScorer, texts: Sequence[str], item: str | None = None) -> np.ndarray:
        """First-token features of `texts` through `model`'s backbone (what every head reads), with
        `item`'s correction when it has one."""
        return map_batches(lambda batch: model.encode(batch, item), self._tokenizer, texts, batch_size=64,
                           max_length=128, device=self.device)

    def probabilities(self, model: MultiHeadScorer, item: str, features: np.ndarray) -> np.ndarray:
        """`item`'s head on backbone features: class probabilities, or per-label ones for multi-label items."""
        with torch.inference_mode():
            logits = model.heads[item](torch.as_tensor(features, device=self.device)).float()
        multilabel = self._members[item].spec.task == "multilabel"
        return (logits.sigmoid() if multilabel else logits.softmax(-1)).cpu().numpy().astype(np.float64)

    def predict(self, model: MultiHeadScorer, item: str, features: np.ndarray) -> np.ndarray:
        """`item`'s predictions from backbone features: class indices, or multi-hot for multi-label items."""
        return decide(self.probabilities(model, item, features), self._members[item].spec.task)

    def _scores(self, model: MultiHeadScorer, item: str, features: Mapping[str, np.ndarray]) -> dict:
        """Validation and test metrics of one item's head, with what the gate and the reports need."""
        member = self._members[item]
        spec = member.spec
        out = {}
        for split in ("validation", "test"):
            probs = self.probabilities(model, item, features[split])
            out[split] = {**item_metrics(spec.task, member.labels[split], decide(probs, spec.task), spec.n_labels),
                          "n": len(probs)}
            if split == "validation":
                out["validation_probs"] = np.round(probs, 6).tolist()
            else:
                out["test_predictions"] = decide(probs, spec.task).tolist()
        return out

    def own(self, spec: ScorerSpec) -> dict:
        """The item on its own scorer: validation and test scores (JSON-safe), and its test labels."""
        member = self.member(spec)
        model = self.individual(spec)
        features = {s: self.features(model, member.texts[s]) for s in ("validation", "test")}
        return {**self._scores(model, spec.id, features), "test_labels": np.asarray(member.labels["test"]).tolist()}

    # -- one merge, a sweep, a consolidation ------------------------------------------------------

    def merged_model(self, specs: Sequence[ScorerSpec], params: Mapping[str, Any],
                     config: MergeConfig) -> tuple[MultiHeadScorer, dict]:
        """The group merged with `params` (members' own heads) and the merge's record."""
        members = [self.member(s) for s in specs]
        grams = [self.grams(s) for s in specs] if needs_grams(config.method) else None
        result = merge(config.method, self.base_state, [m.backbone for m in members], seed=config.seed,
                       grams=grams, **params)
        heads = {m.spec.id: m.head for m in members}
        model = MultiHeadScorer(self._config, result.state_dict, heads, {m.spec.id: _schema(m.spec) for m in members})
        record = result.record()
        record["info"] = {k: v for k, v in record["info"].items() if k != "loss_curve"}
        return model.to(self.device), {"params": dict(result.params), "merge": record}

    def evaluate(self, specs: Sequence[ScorerSpec], params: Mapping[str, Any], config: MergeConfig,
                 ) -> tuple[dict, MultiHeadScorer]:
        """Merge once with `params`; score every member with its own head and with a head refit on the
        merged backbone (train split, early stopping on validation). Returns the JSON-safe evaluation
        {members, params, merge, scores: {own_heads|refit_heads: {item: scores}}} and the model, whose
        heads are those of `config.refit_heads`."""
        model, merged = self.merged_model(specs, params, config)
        scores: dict[str, dict] = {setting: {} for setting in HEAD_SETTINGS}
        corrections: dict[str, dict] = {}
        for spec in specs:
            m = self._members[spec.id]
            if config.item_correction:
                corrections[spec.id] = self.correct(model, spec, config.correction_ranks)
            features = {s: self.features(model, m.texts[s], spec.id) for s in SPLITS}
            scores["own_heads"][spec.id] = self._scores(model, spec.id, features)
            fitted = refit_head(features["train"], m.labels["train"], m.head, val_features=features["validation"],
                                val_labels=m.labels["validation"], task=spec.task, seed=config.seed,
                                device=self.device)
            model.heads[spec.id].load_head_state(fitted.state_dict)
            scores["refit_heads"][spec.id] = self._scores(model, spec.id, features)
            if not config.refit_heads:
                model.heads[spec.id].load_head_state(m.head)
        extra = {"correction": corrections} if config.item_correction else {}
        return {"members": [s.id for s in specs], **merged, "scores": scores, **extra}, model

    def correct(self, model: MultiHeadScorer, spec: ScorerSpec, ranks: Sequence[int]) -> dict:
        """Give `spec` its correction on `model`: the residual of its own backbone against the merged one
        on every linear layer, at the smallest rank of `ranks` whose agreement with the item's own scorer
        is within CORRECTION_TOLERANCE of the best rank's. Agreement (`gw.mergeability.agreement`, own
        head) is over the item's train and validation answers: no labels, and about five times the
        answers of validation alone, whose macro F1 could not tell the ranks apart (a dozen answers) and so
        kept rank 0 for most items. Returns the JSON-safe record of the choice."""
        m = self._members[spec.id]
        texts = m.texts["train"] + m.texts["validation"]
        own_model = self.individual(spec)
        reference = self.probabilities(own_model, spec.id, self.features(own_model, texts, spec.id))
        parts = item_residuals(m.backbone, model, max(ranks))
        head = model.heads[spec.id].head_state_dict()
        model.heads[spec.id].load_head_state(m.head)  # the rank is judged with the item's own head
        table = {}
        for rank in ranks:
            model.set_correction(spec.id, module_factors(parts, rank))
            probs = self.probabilities(model, spec.id, self.features(model, texts, spec.id))
            table[rank] = agreement(reference, probs, spec.task)
        rank = choose_rank(table, CORRECTION_TOLERANCE)
        model.set_correction(spec.id, module_factors(parts, rank))
        model.heads[spec.id].load_head_state(head)
        n_params = sum(a.numel() + b.numel() for a, b in model.correction(spec.id).values())
        return {"rank": rank, "energy_kept": round(total_energy_kept(parts, rank), 6), "parameters": n_params,
                "agreement": {str(r): round(v, 6) for r, v in table.items()}}

    def sweep(self, specs: Sequence[ScorerSpec], config: MergeConfig) -> dict:
        """`evaluate` for every candidate of the merge grid (JSON-safe; the product caches it)."""
        started = time.perf_counter()
        fixed = dict(config.params or {})
        evaluations = [self.evaluate(specs, {**fixed, **candidate}, config)[0] for candidate in config.candidates()]
        return {"members": [s.id for s in specs], "method": config.method, "evaluations": evaluations,
                "seconds": round(time.perf_counter() - started, 2)}

    def consolidate(self, specs: Sequence[ScorerSpec], config: MergeConfig, *,
                    own: Mapping[str, dict] | None = None,
                    sweep: Callable[[Sequence[ScorerSpec]], dict] | None = None) -> GroupOutcome:
        """Tune and gate one planned group; a failed group of 3+ falls back to its best passing pair.

        `own` (each member's `own` scores) and `sweep` (a sub-group's sweep) may come from a cache."""
        started = time.perf_counter()
        by_id = {s.id: s for s in specs}
        own = dict(own) if own is not None else {s.id: self.own(s) for s in specs}
        sweep = sweep or (lambda group: self.sweep(group, config))
        setting = head_setting(config)
        chosen: dict[tuple[str, ...], dict] = {}
        tuning: dict[tuple[str, ...], dict] = {}

        def merged_evidence(sub: tuple[str, ...]) -> dict[str, gate.Evidence]:
            chosen[sub], tuning[sub] = choose(sweep([by_id[i] for i in sub])["evaluations"], own, setting)
            return {i: self._evidence(chosen[sub]["scores"][setting][i], by_id[i]) for i in sub}

        decision = gate.gate_group([s.id for s in specs], {i: self._evidence(own[i], by_id[i]) for i in by_id},
                              merged_evidence, rule=gate.make_rule(config.gate, config.delta))
        accepted = chosen.get(tuple(decision.accepted)) if decision.passed else None
        return GroupOutcome(tuple(by_id), decision, accepted, own, setting, tuning, time.perf_counter() - started)

    def _evidence(self, scores: Mapping[str, Any], spec: ScorerSpec) -> gate.Evidence:
        return evidence(scores, spec.task, self.member(spec).labels["validation"])

    def individual(self, spec: ScorerSpec) -> MultiHeadScorer:
        """An item on its own scorer, in the consolidated format (its backbone, its head)."""
        m = self.member(spec)
        return MultiHeadScorer(self._config, m.backbone, {spec.id: m.head}, {spec.id: _schema(spec)}).to(self.device)


def decide(probs: np.ndarray, task: str) -> np.ndarray:
    """Class indices, or multi-hot labels (probability above 1/2) for multi-label items."""
    return (probs > 0.5).astype(np.int64) if task == "multilabel" else probs.argmax(-1)


def _schema(spec: ScorerSpec) -> dict:
    return {"task": spec.task, "labels": list(spec.labels)}
