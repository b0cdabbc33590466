"""Turn a SemEval-2013-style dataset directory (train/test_ua parquet + items.jsonl) into fleet inputs.

Used by the Beetle benchmarks. Items with both train and test_ua answers are kept. With one fold
(the official split) `test_ua` (unseen answers to the same questions) becomes the test split; with
K folds, each item's labelled answers (train + test_ua) are dealt into K stratified, seeded folds and
fold f is the test split. Either way a stratified, seeded share of the remaining answers becomes the
validation split and the rest is train. The data is read where it lies (../shared) and
only derived files are written, under a git-ignored cache directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "semeval2013_beetle"


def fold_dir(work: str | Path, folds: int, fold: int) -> Path:
    """Where one fold's derived data and fleet live: the work directory itself for the official split."""
    return Path(work) if folds == 1 else Path(work) / f"fold{fold}of{folds}"


def carve_validation(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of validation rows: `share` of each label's rows (at least one where a label has 3+)."""
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = int(round(share * len(rows))) if len(rows) >= 3 else 0
        mask[rng.choice(rows, size=take, replace=False)] = True
    return mask


def fold_of(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index of each row: every label's rows dealt round-robin into `folds` folds after a shuffle."""
    fold = np.zeros(len(labels), dtype=np.int64)
    start = int(rng.integers(folds))  # so that small labels do not always land in fold 0
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        fold[rows] = (start + np.arange(len(rows))) % folds
        start = (start + len(rows)) % folds
    return fold


def prepare(data_dir: str | Path, out_dir: str | Path, *, validation_share: float = 0.2, seed: int = 0,
            folds: int = 1, fold: int = 0) -> tuple[Path, Path]:
    """Write responses.parquet and items.jsonl for one fold under out_dir; returns their paths."""
    if folds < 1 or not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: need folds >= 1 and 0 <= fold < folds")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    for name in ("train.parquet", "test_ua.parquet", "items.jsonl"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"{data_dir}: missing {name} (expected the SemEval-2013 layout, see its README)")
    train, test = pq.read_table(data_dir / "train.parquet"), pq.read_table(data_dir / "test_ua.parquet")
    items = {json.loads(line)["item_id"]: json.loads(line) for line in (data_dir / "items.jsonl").read_text().splitlines() if line}
    keep = sorted(set(train.column("item_id").to_pylist()) & set(test.column("item_id").to_pylist()))
    columns: dict[str, list] = {"item_id": [], "response_id": [], "text": [], "label": [], "split": []}
    for item in keep:
        rng = np.random.default_rng([seed, keep.index(item)])
        rows = train.filter(pa.compute.equal(train.column("item_id"), item))
        test_rows = test.filter(pa.compute.equal(test.column("item_id"), item))
        if folds > 1:  # pool every labelled answer, then deal the folds
            pooled = pa.concat_tables([rows.select(test_rows.column_names), test_rows])
            in_test = fold_of(np.asarray(pooled.column("label").to_pylist()), folds,
                              np.random.default_rng([seed, keep.index(item), folds])) == fold
            rows, test_rows = pooled.filter(pa.array(~in_test)), pooled.filter(pa.array(in_test))
        labels = np.asarray(rows.column("label").to_pylist())
        validation = carve_validation(labels, validation_share, rng)
        for table, splits in ((rows, np.where(validation, "validation", "train")), (test_rows, ["test"] * test_rows.num_rows)):
            columns["item_id"] += table.column("item_id").to_pylist()
            columns["response_id"] += table.column("response_id").to_pylist()
            columns["text"] += table.column("text").to_pylist()
            columns["label"] += table.column("label").to_pylist()
            columns["split"] += list(splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out_dir / "responses.parquet")
    with open(out_dir / "items.jsonl", "w") as fh:
        for item in keep:
            meta = items[item]
            fh.write(json.dumps({"item_id": item, "task": "multiclass", "label_names": meta["label_names"],
                                 "question": meta.get("question"), "module": meta.get("module")}) + "\n")
    return out_dir / "responses.parquet", out_dir / "items.jsonl"
