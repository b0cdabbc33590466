"""The driver killed during the merges and during the publish (issue 13): the previous LATEST stays readable
throughout, nothing half-written is published, and a rerun resumes from the cache to exactly one new run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from infra.publish import latest_run, list_runs, verify_run
from infra.storage import open_store

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
FLEETMERGE = str(Path(sys.executable).parent / "fleetmerge")
# Every pair under tau, pairs at most: two merged pairs and one item on its own, quickly.
FAST = ["--no-tuning", "--max-responses", "24", "--tau", "1e9", "--k", "2"]

# The command as `fleetmerge` runs it, except that the process dies as by SIGKILL (no cleanup at all) once
# the publish has copied every file of the run and before it writes the run's manifest.
DIES_IN_PUBLISH = textwrap.dedent("""
    import os, sys
    import workers.publish_fleet as publish_fleet
    real = publish_fleet.publish_run

    def publish_run(store, run_id, write, **kwargs):
        def write_then_die(prefix):
            write(prefix)
            os._exit(137)
        return real(store, run_id, write_then_die, **kwargs)

    publish_fleet.publish_run = publish_run
    from flows.cli import main
    sys.argv = ["fleetmerge", *sys.argv[1:]]
    sys.exit(main())
""")


def _env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    return env | {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}


def _records(root: Path) -> set[Path]:
    return set((root / "candidates" / "groups").glob("*/record.json"))


def test_a_killed_driver_leaves_latest_readable_and_a_rerun_resumes(fleet, tmp_path):
    store = open_store(str(fleet))
    env = _env(tmp_path)
    consolidate = [FLEETMERGE, "consolidate", "--store", str(fleet), *FAST]
    subprocess.run([*consolidate, "--delta", "1.0"], env=env, check=True, capture_output=True, timeout=300)
    before = latest_run(store)
    assert before is not None and verify_run(store, before) == []

    # A change of delta re-merges every group; the driver is killed once the first new group is saved.
    done = _records(fleet)
    rerun = [*consolidate, "--delta", "0.9"]
    killed = subprocess.Popen(rerun, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and killed.poll() is None and not _records(fleet) - done:
        time.sleep(0.05)
    assert killed.poll() is None, "the run ended before a merge was saved"
    killed.kill()
    killed.wait(timeout=10)
    assert latest_run(store) == before and verify_run(store, before) == [] and list_runs(store) == [before]
    saved_by_killed = _records(fleet) - done
    assert len(saved_by_killed) == 1

    # The next attempt dies inside the publish, after copying the run's files: still nothing new published.
    dying = subprocess.run([sys.executable, "-c", DIES_IN_PUBLISH, *rerun[1:]], env=env, capture_output=True,
                           timeout=300)
    assert dying.returncode == 137, dying.stderr.decode()[-2000:]
    assert latest_run(store) == before and verify_run(store, before) == [] and list_runs(store) == [before]
    half_written = [run for run in store.list_children("published") if run.startswith("run-") and run != before]
    assert half_written, "the dying publish wrote no files: it did not die where the test meant it to"

    # A rerun reuses every merge the two killed attempts finished and publishes exactly one new run.
    finished = subprocess.run([*rerun, "--json"], env=env, check=True, capture_output=True, timeout=300, text=True)
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    assert summary["computed"]["merges"] == 0 and summary["reused"]["merges"] == 2, summary
    assert list_runs(store) == sorted([before, summary["run_id"]])
    assert latest_run(store) == summary["run_id"] and verify_run(store, summary["run_id"]) == []
