"""Build the Beetle fleet (one MiniLM-L6 scorer per item) and record its pre-merge test figures.

    .venv/bin/python bench/build_beetle_fleet.py [--data DIR] [--work DIR] [--out docs/results/beetle_premerge.json]

Items with train and test answers are used (47 in Beetle); validation is carved from train (seeded,
stratified); test is the official test_ua split, or with `--folds K --fold f` fold f of K stratified
folds over all labelled answers (that fold's fleet lives under WORK/fold<f>of<K>). Scorers are reused when their inputs are unchanged,
so a rerun only re-evaluates. Fleet figures are weighted by test size (as GW-SMM reports them).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from beetle_data import DEFAULT_DATA, fold_dir, prepare  # noqa: E402

from infra.manifest import load_manifest  # noqa: E402
from infra.settings import offline_env  # noqa: E402
from infra.storage import open_store  # noqa: E402
from infra.validation import validate_fleet  # noqa: E402
from workers.evaluate import evaluate_fleet, fleet_figures  # noqa: E402
from workers.finetune import FinetuneConfig  # noqa: E402
from workers.fleet_build import build_fleet, load_items  # noqa: E402
from workers.scorer_io import default_device  # noqa: E402
from workers.models import default_base_dir, quiet_transformers  # noqa: E402

PRIMARY = ("accuracy", "macro_f1", "qwk")


def _figure(value: float) -> float | None:
    """Rounded; None where undefined (QWK of an item whose test answers all share one label)."""
    return None if value is None or value != value else round(value, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset directory in the SemEval-2013 layout")
    parser.add_argument("--work", default=str(ROOT / ".fleetmerge" / "beetle"), help="cache for the derived data and fleet")
    parser.add_argument("--out", default=None, help="result JSON (default docs/results/beetle_premerge.json for "
                                                    "the official split; the fold's work directory otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=1, help="K stratified folds over all labelled answers (1: official split)")
    parser.add_argument("--fold", type=int, default=0, help="which fold is the test split")
    args = parser.parse_args()
    offline_env()
    quiet_transformers()

    started = time.perf_counter()
    work = fold_dir(args.work, args.folds, args.fold)
    responses, items_path = prepare(args.data, work / "data", seed=args.seed, folds=args.folds, fold=args.fold)
    store = open_store(str(work / "fleet"))
    config = FinetuneConfig(seed=args.seed)
    build_started = time.perf_counter()
    manifest, summary = build_fleet(pq.read_table(responses), load_items(items_path), default_base_dir(), store,
                                    fleet_name="beetle", config=config)
    build_seconds = time.perf_counter() - build_started
    report = validate_fleet(store, load_manifest(store))
    eval_started = time.perf_counter()
    per_item = evaluate_fleet(store, report.usable, split="test")
    eval_seconds = time.perf_counter() - eval_started
    fleet = fleet_figures(per_item)

    result = {
        "dataset": Path(args.data).resolve().name, "folds": args.folds, "fold": args.fold,
        "n_items": len(report.usable),
        "n_test": sum(m["n"] for m in per_item.values()),
        "premerge": {k: _figure(fleet[k]) for k in PRIMARY},
        "per_item": {item: {**{k: _figure(m[k]) for k in PRIMARY}, "n": m["n"]} for item, m in sorted(per_item.items())},
        "set_aside": report.rejected,
        "finetune": config.to_dict() | {"seed": "per item, derived from seed"},
        "seconds": {"build": round(build_seconds, 1), "evaluate": round(eval_seconds, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "built": len(summary["built"]), "reused": len(summary["reused"]),
        "device": default_device(), "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
    }
    # Only the official split's figures are a committed result; a fold's stay beside its fleet.
    out = Path(args.out or (ROOT / "docs" / "results" / "beetle_premerge.json" if args.folds == 1
                            else work / "premerge.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    print(json.dumps({"n_items": result["n_items"], **result["premerge"], "seconds": result["seconds"],
                      "built": result["built"], "reused": result["reused"]}))


if __name__ == "__main__":
    main()
