"""Merge one group of scorers every way the quality benchmark compares, and score every member.

For a group and a merge method, each parameter candidate of the method's grid is merged once and its
members' texts (train, validation, test) go through the merged backbone once; from those features
both head settings are scored: the members' own heads, and heads refit on the train split (early
stopping on validation). Per head setting, the parameters are chosen like the product chooses them
(`gw.tuning.worst_change` of validation macro F1, validation only); test figures and predictions
of the chosen candidate are kept for the report. Results are cached as JSON per (group, method,
grid, checkpoints), so a rerun or a resumed run recomputes nothing it already has.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gw.head_fit import refit_head
from gw.merge import merge
from gw.tuning import worst_change
from workers.consolidate import GroupConsolidator, Member, _schema
from workers.evaluate import item_metrics
from workers.extract import store_checkpoint_hash
from workers.multihead import MultiHeadScorer

SPLITS = ("train", "validation", "test")
HEAD_SETTINGS = {"own_heads": False, "refit_heads": True}


def _metrics(member: Member, split: str, predicted: np.ndarray) -> dict:
    result = item_metrics(member.spec.task, member.labels[split], predicted, member.spec.n_labels)
    return {k: (None if v != v else round(float(v), 6)) if isinstance(v, (int, float)) else v
            for k, v in result.items()} | {"n": len(predicted)}


class GroupEvaluator:
    """Caches loaded scorers (via `GroupConsolidator`) and per-group results (JSON files)."""

    def __init__(self, consolidator: GroupConsolidator, cache_dir: Path, *, seed: int = 0):
        self.consolidator = consolidator
        self.cache_dir = Path(cache_dir)
        self.seed = seed
        self._hashes: dict[str, str] = {}
        self.compute_seconds: dict[tuple[str, tuple[str, ...]], dict] = {}  # what each group took when computed

    def _spec(self, item: str):
        return self.consolidator.manifest.scorer(item)

    def _checkpoint_hash(self, item: str) -> str:
        if item not in self._hashes:
            self._hashes[item] = store_checkpoint_hash(self.consolidator.store, self._spec(item).checkpoint)
        return self._hashes[item]

    def _cached(self, kind: str, payload: Mapping[str, Any], compute) -> dict:
        key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]
        path = self.cache_dir / kind / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(path)  # a killed run never leaves a half-written entry
        return result

    def individual(self, item: str) -> dict:
        """The item's own scorer: validation and test metrics, and its test predictions."""
        payload = {"item": item, "checkpoint": self._checkpoint_hash(item)}

        def compute() -> dict:
            member = self.consolidator.member(self._spec(item))
            model = self.consolidator.individual(member.spec)
            out = {}
            for split in ("validation", "test"):
                predicted = self.consolidator.predict(model, item, self.consolidator.features(model, member.texts[split]))
                out[split] = _metrics(member, split, predicted)
            out["test_predictions"] = predicted.tolist()
            out["test_labels"] = np.asarray(member.labels["test"]).tolist()
            return out

        return self._cached("individual", payload, compute)

    def group(self, members: Sequence[str], method: str, grid: Sequence[Mapping[str, Any]]) -> dict:
        """Both head settings of `members` merged with `method`, parameters tuned over `grid`."""
        members = sorted(members)
        payload = {"members": {m: self._checkpoint_hash(m) for m in members}, "method": method,
                   "grid": [dict(g) for g in grid], "seed": self.seed, "version": 1}
        result = self._cached(f"groups/{method}", payload, lambda: self._compute_group(members, method, grid))
        self.compute_seconds[(method, tuple(members))] = result["seconds"]
        return result

    def _compute_group(self, members: Sequence[str], method: str, grid: Sequence[Mapping[str, Any]]) -> dict:
        started = time.perf_counter()
        loaded = [self.consolidator.member(self._spec(m)) for m in members]
        baseline = {m: self.individual(m)["validation"]["macro_f1"] for m in members}
        candidates: list[dict] = []
        merge_seconds = 0.0
        for params in grid:
            merge_started = time.perf_counter()
            result = merge(method, self.consolidator.base_state, [m.backbone for m in loaded], seed=self.seed,
                           **params)
            merge_seconds += time.perf_counter() - merge_started
            heads = {m.spec.id: m.head for m in loaded}
            model = MultiHeadScorer(self.consolidator.model_config, result.state_dict, heads,
                                    {m.spec.id: _schema(m.spec) for m in loaded}).to(self.consolidator.device)
            features = {m.spec.id: {s: self.consolidator.features(model, m.texts[s]) for s in SPLITS} for m in loaded}
            candidate = {"params": dict(result.params)}
            for setting, refit in HEAD_SETTINGS.items():
                candidate[setting] = self._score_heads(model, loaded, features, refit)
            candidates.append(candidate)
            del model, result
        chosen = {}
        for setting in HEAD_SETTINGS:
            scores = [worst_change(baseline, {m: c[setting]["validation"][m]["macro_f1"] for m in members})
                      for c in candidates]
            best = int(np.nanargmax(scores))
            chosen[setting] = {"params": candidates[best]["params"], "worst_validation_change": scores[best],
                               **candidates[best][setting]}
        table = [{"params": c["params"], **{s: {m: c[s]["validation"][m]["macro_f1"] for m in members}
                                            for s in HEAD_SETTINGS}} for c in candidates]
        return {"members": list(members), "method": method, "chosen": chosen, "validation_table": table,
                "seconds": {"merge": round(merge_seconds, 2), "total": round(time.perf_counter() - started, 2)}}

    def _score_heads(self, model: MultiHeadScorer, loaded: Sequence[Member], features: dict, refit: bool) -> dict:
        out: dict[str, dict] = {"validation": {}, "test": {}, "test_predictions": {}}
        for m in loaded:
            item, feats = m.spec.id, features[m.spec.id]
            head = model.heads[item]
            if refit:
                fitted = refit_head(feats["train"], m.labels["train"], m.head, val_features=feats["validation"],
                                    val_labels=m.labels["validation"], task=m.spec.task, seed=self.seed,
                                    device=self.consolidator.device)
                head.load_head_state(fitted.state_dict)
            for split in ("validation", "test"):
                predicted = self.consolidator.predict(model, item, feats[split])
                out[split][item] = _metrics(m, split, predicted)
            out["test_predictions"][item] = predicted.tolist()
            if refit:
                head.load_head_state(m.head)  # the model is reused by the next setting
        return out
