"""End to end: the whole `fleetmerge demo`, then the consolidation alone from cold caches, then a rerun.

    .venv/bin/python bench/e2e.py [--workdir DIR] [--tiny]

demo_seconds: the whole `fleetmerge demo` (generate, fine-tune 8 MiniLM scorers, validate,
consolidate, publish) in a fresh work directory, as a user runs it. full_seconds: the consolidation
flow again with every cache removed (features, GW pairs, merge candidates, published runs), the fleet
kept. rerun_seconds: the same flow once more with nothing changed. rerun_fraction = rerun / full
(target <= 0.1). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _util import reap_on_exit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=str(ROOT / ".fleetmerge" / "bench-e2e"))
    parser.add_argument("--tiny", action="store_true", help="tiny random encoder instead of MiniLM (smoke run)")
    args = parser.parse_args()
    reap_on_exit()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)

    started = time.perf_counter()
    demo = [str(ROOT / ".venv" / "bin" / "fleetmerge"), "demo", "--workdir", str(work), *(["--tiny"] if args.tiny else [])]
    subprocess.run(demo, check=True, stdout=subprocess.DEVNULL)
    demo_seconds = time.perf_counter() - started

    from infra.settings import offline_env

    offline_env()
    from flows.nightly import consolidate

    store = work / "fleet"
    for cache in ("features", "gw", "candidates", "published"):
        shutil.rmtree(store / cache, ignore_errors=True)
    started = time.perf_counter()
    full = consolidate(fleet="fleet.yaml", store=str(store))
    full_seconds = time.perf_counter() - started
    started = time.perf_counter()
    rerun = consolidate(fleet="fleet.yaml", store=str(store))
    rerun_seconds = time.perf_counter() - started
    print(json.dumps({"demo_seconds": round(demo_seconds, 1), "full_seconds": round(full_seconds, 1),
                      "rerun_seconds": round(rerun_seconds, 1), "rerun_fraction": round(rerun_seconds / full_seconds, 3),
                      "full_computed": full["computed"], "rerun_computed": rerun["computed"],
                      "rerun_republished": rerun["republished"], "storage_ratio": full["storage"]["ratio"],
                      "encoder": "tiny" if args.tiny else "MiniLM-L6"}))


if __name__ == "__main__":
    main()
