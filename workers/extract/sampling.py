"""Choosing the responses: the split, a stratified seeded sample, and the plan that names their file."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.manifest import ScorerSpec
from infra.storage import Store, StorageError

from .config import ExtractConfig, ExtractionPlan
from workers.scorer_io import checkpoint_hash

from .keys import FEATURES_PREFIX, data_hash, feature_key


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


def plan_extraction(store: Store, spec: ScorerSpec, config: ExtractConfig = ExtractConfig(), *,
                    prefix: str = FEATURES_PREFIX) -> ExtractionPlan:
    """Choose the responses, hash the checkpoint and the data, and name the feature file (no model run)."""
    try:
        table = store.read_table(spec.responses)
    except StorageError as exc:
        raise ValueError(f"scorer {spec.id}: cannot read responses {spec.responses}: {exc}") from None
    chosen = select_responses(table, spec.task, config, source=f"scorer {spec.id}: {spec.responses}")
    ids = tuple(str(v) for v in chosen.column("response_id").to_pylist())
    texts = tuple("" if v is None else str(v) for v in chosen.column("text").to_pylist())
    ckpt = checkpoint_hash(store, spec.checkpoint)
    data = data_hash(ids, texts)
    cfg = config.config_hash()
    return ExtractionPlan(spec.id, feature_key(spec.id, ckpt, data, cfg, prefix=prefix), ckpt, data, cfg, ids, texts)
