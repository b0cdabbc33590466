"""Turn a SemEval-2013-style dataset directory (train/test_ua parquet + items.jsonl) into fleet inputs.

Used by the Beetle benchmarks. Items with both train and test_ua answers are kept; `test_ua`
(unseen answers to the same questions) becomes the test split and a stratified, seeded share of each
item's training answers becomes its validation split. The data is read where it lies (../shared) and
only derived files are written, under a git-ignored cache directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "semeval2013_beetle"


def carve_validation(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of validation rows: `share` of each label's rows (at least one where a label has 3+)."""
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        take = int(round(share * len(rows))) if len(rows) >= 3 else 0
        mask[rng.choice(rows, size=take, replace=False)] = True
    return mask


def prepare(data_dir: str | Path, out_dir: str | Path, *, validation_share: float = 0.2, seed: int = 0) -> tuple[Path, Path]:
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
        labels = np.asarray(rows.column("label").to_pylist())
        validation = carve_validation(labels, validation_share, rng)
        test_rows = test.filter(pa.compute.equal(test.column("item_id"), item))
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
