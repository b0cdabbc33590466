"""Serve a published consolidated fleet: `predict(item, texts)` and mixed batches.

A mixed batch over items that share a backbone takes one backbone pass (length-sorted, dynamically
padded batches) and then each row through its own item's head. Only runs with a manifest are trusted
(`infra.publish`); checkpoints are loaded lazily, once, and kept.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from infra.publish import latest_run, read_manifest, run_prefix
from infra.storage import Store
from workers.batching import sorted_batches
from workers.scorer_io import default_device
from workers.multihead import MultiHeadScorer, load_consolidated


@dataclass(frozen=True)
class Prediction:
    item: str
    label: str | list[str]  # a class name (multiclass) or the names of the labels present (multilabel)
    scores: list[float]  # class probabilities (multiclass) or per-label probabilities (multilabel)


class ConsolidatedFleet:
    def __init__(self, store: Store, run_id: str | None = None, *, device: str | None = None,
                 batch_size: int = 64, max_length: int = 128):
        run_id = run_id or latest_run(store)
        if run_id is None:
            raise ValueError(f"{store.uri}: no published run with a manifest")
        self.store, self.run_id = store, run_id
        self.manifest = read_manifest(store, run_id)
        self.routing: dict[str, dict] = self.manifest["routing"]
        self.prefix = run_prefix(store, run_id)
        self.device = device or default_device()
        self.batch_size, self.max_length = batch_size, max_length
        self._loaded: dict[str, tuple[MultiHeadScorer, object]] = {}
        self._stack = contextlib.ExitStack()

    @property
    def items(self) -> list[str]:
        return sorted(self.routing)

    def _checkpoint(self, name: str):
        if name not in self._loaded:
            path = self._stack.enter_context(self.store.local_dir(f"{self.prefix}/{name}"))
            model, tokenizer, _ = load_consolidated(path, device=self.device)
            self._loaded[name] = (model, tokenizer)
        return self._loaded[name]

    def _route(self, item: str) -> str:
        if item not in self.routing:
            raise KeyError(f"item {item!r} is not in published run {self.run_id} (items: {', '.join(self.items)})")
        return self.routing[item]["checkpoint"]

    def predict(self, item: str, texts: Sequence[str]) -> list[Prediction]:
        return self.predict_mixed([(item, t) for t in texts])

    def predict_mixed(self, requests: Sequence[tuple[str, str]]) -> list[Prediction]:
        """Predictions in request order; one backbone pass per shared backbone."""
        by_checkpoint: dict[str, list[int]] = defaultdict(list)
        for index, (item, _) in enumerate(requests):
            by_checkpoint[self._route(item)].append(index)
        out: list[Prediction | None] = [None] * len(requests)
        for name, indices in by_checkpoint.items():
            model, tokenizer = self._checkpoint(name)
            texts = [requests[i][1] for i in indices]
            with torch.inference_mode():
                for rows, batch in sorted_batches(tokenizer, texts, batch_size=self.batch_size,
                                                  max_length=self.max_length):
                    items = [requests[indices[r]][0] for r in rows]
                    logits = model({k: v.to(self.device) for k, v in batch.items()}, items)
                    for r, item, value in zip(rows, items, logits):
                        out[indices[r]] = _prediction(item, model.items[item], value.float().cpu().numpy())
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._stack.close()
        self._loaded.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prediction(item: str, schema: dict, logits: np.ndarray) -> Prediction:
    labels = schema["labels"]
    if schema["task"] == "multilabel":
        probs = 1.0 / (1.0 + np.exp(-logits))
        return Prediction(item, [labels[i] for i in np.flatnonzero(logits > 0)], probs.round(6).tolist())
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return Prediction(item, labels[int(logits.argmax())], probs.round(6).tolist())
