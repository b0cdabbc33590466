"""Score items with their own scorers and compute their metrics on a split."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gw import metrics as gw_metrics
from infra.manifest import ScorerSpec
from infra.storage import Store
from workers.finetune import decisions, predict_logits
from workers.scorer_io import default_device, load_scorer


def split_rows(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.equal(table.column("split"), split))


def targets(table: pa.Table, task: str) -> np.ndarray:
    column = "labels" if task == "multilabel" else "label"
    return np.asarray(table.column(column).to_pylist(), dtype=np.int64)


def item_metrics(task: str, y_true: np.ndarray, y_pred: np.ndarray, n_labels: int) -> dict:
    labels = list(range(n_labels)) if task == "multiclass" else None
    return gw_metrics.classification_metrics(task, y_true, y_pred, labels)


def evaluate_scorer(store: Store, spec: ScorerSpec, *, split: str = "test", device: str | None = None) -> dict:
    """Metrics of one item's own scorer on one split, with `n` (the split's size)."""
    device = device or default_device()
    table = split_rows(store.read_table(spec.responses), split)
    with store.sub(spec.checkpoint).local_dir("") as path:
        scorer = load_scorer(path, task=spec.task, device=device)
        logits = predict_logits(scorer.model, scorer.tokenizer, table.column("text").to_pylist(), device=device)
    result = item_metrics(spec.task, targets(table, spec.task), decisions(logits, spec.task), spec.n_labels)
    return {**result, "n": table.num_rows}


def evaluate_fleet(store: Store, specs: Sequence[ScorerSpec], *, split: str = "test", device: str | None = None) -> dict:
    return {spec.id: evaluate_scorer(store, spec, split=split, device=device) for spec in specs}


def fleet_figures(per_item: dict) -> dict[str, float]:
    """Fleet metrics weighted by each item's split size (as GW-SMM reports them)."""
    weighted = gw_metrics.fleet_metrics({item: ({k: v for k, v in m.items() if k != "n"}, m["n"])
                                         for item, m in per_item.items()})
    return weighted["metrics"]
