"""The benchmark trio: three MiniLM-L6 scorers of one demo topic, built once into a git-ignored cache.

    store, manifest, info = ensure_trio()          # builds on the first call, reuses afterwards

A 3-item demo district (`workers.demo_data`, one topic: circuits-1, -2 multi-class and circuits-3
multi-label, 200 responses each) fine-tuned from MiniLM-L6 by the fleet builder with
FinetuneConfig(epochs=3): enough for timing merges and serving (the weights have the real shapes and
real task vectors), not meant to be accurate scorers. `workers.fleet_build` reuses unchanged scorers,
so later runs only check the build records.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra.settings import offline_env  # noqa: E402

offline_env()  # before torch is imported (OMP_WAIT_POLICY=PASSIVE, offline hub)

import pyarrow.parquet as pq  # noqa: E402

from infra.manifest import FleetManifest, load_manifest  # noqa: E402
from infra.storage import Store, open_store  # noqa: E402
from workers.demo_data import write_demo_district  # noqa: E402
from workers.finetune import FinetuneConfig  # noqa: E402
from workers.fleet_build import build_fleet, load_items  # noqa: E402
from workers.models import default_base_dir, quiet_transformers  # noqa: E402

DEFAULT_CACHE = ROOT / ".fleetmerge" / "bench" / "trio"
TRIO_EPOCHS = 3
TRIO_RESPONSES = 200
TRIO_NOTE = (f"trio = 3 MiniLM-L6 scorers (demo district, topic circuits, {TRIO_RESPONSES} responses per item) "
             f"fine-tuned with FinetuneConfig(epochs={TRIO_EPOCHS}): benchmark weights, not tuned scorers")


def ensure_trio(cache: Path = DEFAULT_CACHE, *,
                log=lambda message: print(message, file=sys.stderr)) -> tuple[Store, FleetManifest, dict]:
    """Build (or reuse) the trio fleet under `cache`; returns (fleet store, manifest, build summary)."""
    quiet_transformers()
    cache = Path(cache)
    responses, items = write_demo_district(cache / "district", n_per_topic=(3,), n_responses=TRIO_RESPONSES)
    store = open_store(str(cache / "fleet"))
    started = time.perf_counter()
    _, summary = build_fleet(pq.read_table(responses), load_items(items), default_base_dir(), store,
                             fleet_name="bench-trio", config=FinetuneConfig(epochs=TRIO_EPOCHS), device="cpu",
                             progress=False, log=log)
    summary["build_seconds"] = round(time.perf_counter() - started, 2)
    manifest = load_manifest(store)
    if len(manifest.scorers) != 3:
        raise RuntimeError(f"{cache}: expected a trio, the fleet has {len(manifest.scorers)} scorers")
    return store, manifest, summary


def open_trio(cache: Path = DEFAULT_CACHE) -> tuple[Store, FleetManifest]:
    """The already built trio (no rebuild check): for subprocesses of a benchmark that called ensure_trio."""
    store = open_store(str(Path(cache) / "fleet"))
    return store, load_manifest(store)


if __name__ == "__main__":
    _, built_manifest, built = ensure_trio()
    print({"scorers": [s.id for s in built_manifest.scorers], **built})
