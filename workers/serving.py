"""Serve a published consolidated fleet: `predict(item, texts)` and mixed batches.

A mixed batch over items that share a backbone takes one backbone pass (length-sorted, dynamically
padded batches) and then each row through its own item's head. Only runs with a manifest are trusted
(`infra.publish`); checkpoints are loaded on first use and kept, within `memory_budget` bytes of
weights when one is given. What is evicted first is the checkpoint least in demand: the fewest rows
asked of it lately (counts halve every `DEMAND_HALF_LIFE_ROWS` rows served; ties: the least recently
used). A backbone shared by three items is asked for about three times as often as an item's own
scorer, so under a tight budget the shared backbones stay and the rarely asked checkpoints take turns;
least-recently-used eviction instead cycles every checkpoint through memory when each batch of
requests needs more of them than fit (bench/serve.py --service).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from infra.publish import latest_run, read_manifest, run_prefix
from infra.storage import Store
from workers.batching import sorted_batches
from workers.scorer_io import default_device
from workers.multihead import MultiHeadScorer, load_consolidated

DEMAND_HALF_LIFE_ROWS = 4096.0  # recent enough to follow a change of traffic, long enough to rank steadily


@dataclass(frozen=True)
class Prediction:
    item: str
    label: str | list[str]  # a class name (multiclass) or the names of the labels present (multilabel)
    scores: list[float]  # class probabilities (multiclass) or per-label probabilities (multilabel)
    label_names: tuple[str, ...] = ()  # what each score is the probability of

    def named_scores(self) -> dict[str, float]:
        return dict(zip(self.label_names, self.scores))


class ConsolidatedFleet:
    def __init__(self, store: Store, run_id: str | None = None, *, device: str | None = None,
                 batch_size: int = 64, max_length: int = 128, memory_budget: int | None = None):
        run_id = run_id or latest_run(store)
        if run_id is None:
            raise ValueError(f"{store.uri}: no published run with a manifest")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.store, self.run_id = store, run_id
        self.manifest = read_manifest(store, run_id)
        self.routing: dict[str, dict] = self.manifest["routing"]
        self.prefix = run_prefix(store, run_id)
        self.device = device or default_device()
        self.batch_size, self.max_length = batch_size, max_length
        self.memory_budget = memory_budget
        self.loads = self.evictions = 0
        # name -> (model, tokenizer, weight bytes, the context that holds its files); oldest use first
        self._loaded: OrderedDict[str, tuple[MultiHeadScorer, object, int, contextlib.ExitStack]] = OrderedDict()
        self._demand: dict[str, float] = {}  # checkpoint -> rows asked of it, decayed; kept after eviction

    @property
    def items(self) -> list[str]:
        return sorted(self.routing)

    @property
    def loaded(self) -> list[str]:
        """Checkpoints in memory, least recently used first."""
        return list(self._loaded)

    @property
    def loaded_bytes(self) -> int:
        return sum(entry[2] for entry in self._loaded.values())

    def _checkpoint(self, name: str):
        if name in self._loaded:
            self._loaded.move_to_end(name)
        else:
            stack = contextlib.ExitStack()
            path = stack.enter_context(self.store.local_dir(f"{self.prefix}/{name}"))
            model, tokenizer, _ = load_consolidated(path, device=self.device)
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            # Evict before keeping it; one checkpoint larger than the whole budget is still served.
            while self._loaded and self.memory_budget is not None and self.loaded_bytes + size > self.memory_budget:
                self._evict(self._least_in_demand())
            self._loaded[name] = (model, tokenizer, size, stack)
            self.loads += 1
        return self._loaded[name][:2]

    def _least_in_demand(self) -> str:
        # min keeps the first of equals, and _loaded runs from the least recently used
        return min(self._loaded, key=lambda name: self._demand.get(name, 0.0))

    def _count_demand(self, rows: dict[str, int]) -> None:
        decay = 0.5 ** (sum(rows.values()) / DEMAND_HALF_LIFE_ROWS)
        for name in self._demand:
            self._demand[name] *= decay
        for name, count in rows.items():
            self._demand[name] = self._demand.get(name, 0.0) + count

    def _evict(self, name: str) -> None:
        *_, stack = self._loaded.pop(name)
        stack.close()
        self.evictions += 1

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
        self._count_demand({name: len(indices) for name, indices in by_checkpoint.items()})
        # Checkpoints in memory first: under a memory budget a load may evict one this call still needs.
        order = sorted(by_checkpoint, key=lambda name: name not in self._loaded)
        for name in order:
            indices = by_checkpoint[name]
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
        while self._loaded:
            *_, stack = self._loaded.popitem(last=False)[1]
            stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prediction(item: str, schema: dict, logits: np.ndarray) -> Prediction:
    labels = schema["labels"]
    if schema["task"] == "multilabel":
        probs = 1.0 / (1.0 + np.exp(-logits))
        return Prediction(item, [labels[i] for i in np.flatnonzero(logits > 0)], probs.round(6).tolist(), tuple(labels))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return Prediction(item, labels[int(logits.argmax())], probs.round(6).tolist(), tuple(labels))
