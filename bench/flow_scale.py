"""The flow's cost curve (issue 13, Scale 3): fleets of tiny scorers at growing N through the real flow.

    python bench/flow_scale.py                      # N = 25, 50, 100, 200
    python bench/flow_scale.py --sizes 6,12         # smoke run
    python bench/flow_scale.py --set planner=measured --set k=2

Per N: a cold copy of the first N scorers of one cached tiny fleet (built once under
.fleetmerge/flow_scale/, `workers.tiny`'s 3-layer random BERT fine-tuned on the demo district) is put in a
fresh bucket on moto's S3 server over HTTP on 127.0.0.1; the product's flow (`flows.nightly.consolidate`,
shipped defaults unless `--set`, an ephemeral Prefect server) runs against it on a 3-node
`ray.cluster_utils.Cluster` on this machine. Each N runs in a fresh driver process, and moto's server in
a process of its own (it keeps every object in memory), so the driver's RSS is the flow's alone.
Measured: seconds per stage (the flow's own timings), the driver's peak RSS during the run (sampled
every 50 ms) and the RSS it started the run from, the Prefect task runs of the flow run, bytes
written to the store, GW pairs solved and trial merges, and the driver's peak RSS by the end of each
stage (the flow's own `driver_peak_rss_mb`); then each stage's growth exponent b in seconds ~ a N^b
(least squares on log-log over the sizes run) and, for the stages whose work is a count the fleet
decides (pairs solved, trial merges, groups, items kept on their own scorers), seconds per unit of that
work and b against it (`work_exponents`). Prints one JSON object as its last line and writes
docs/results/flow_scale.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import _util  # noqa: F401  (puts the repository on sys.path)
import numpy as np

from _util import PeakRSS, commit, emit, machine, reap_on_exit

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("validate", "extract", "gw", "trial-merges", "plan", "merge", "individual", "publish", "artifacts", "total")
N_RESPONSES = 60  # per item: the demo district's answers, enough for a tiny scorer's train/val/test


def build_fleet_cache(n: int, work: Path) -> Path:
    """A local tiny fleet of `n` scorers (built once; reused while it has at least n)."""
    import pyarrow.parquet as pq

    from infra.manifest import load_manifest
    from infra.storage import open_store
    from workers.demo_data import write_demo_district
    from workers.fleet_build import build_fleet, load_items
    from workers.tiny import tiny_finetune_config, write_tiny_bert

    for done in sorted(work.glob("fleet-*"), key=lambda p: int(p.name.split("-")[1])):
        if int(done.name.split("-")[1]) >= n and (done / "fleet.yaml").is_file():
            return done
    out = work / f"fleet-{n}"
    thirds = (n - 2 * (n // 3), n // 3, n // 3)  # three topics of the demo district
    responses, items = write_demo_district(work / f"district-{n}", n_per_topic=thirds, n_responses=N_RESPONSES, seed=1)
    base = write_tiny_bert(work / "tiny-base", seed=0)
    started = time.perf_counter()
    build_fleet(pq.read_table(responses), load_items(items), base, open_store(str(out)), fleet_name=f"scale-{n}",
                config=tiny_finetune_config(), device="cpu", progress=False, log=lambda _: None)
    print(f"built {len(load_manifest(open_store(str(out))).scorers)} tiny scorers in "
          f"{time.perf_counter() - started:.0f} s at {out}", flush=True)
    return out


def cold_copy(local: Path, n: int, s3_uri: str, settings) -> int:
    """The first n scorers of the local fleet (and everything that is not a scorer's) in a fresh S3 store;
    returns the bytes uploaded."""
    from infra.manifest import load_manifest, save_manifest
    from infra.storage import open_store

    source = open_store(str(local))
    manifest = load_manifest(source)
    chosen = manifest.scorers[:n]
    theirs = {s.checkpoint.rstrip("/") for s in manifest.scorers} | {s.responses for s in manifest.scorers}
    mine = {s.checkpoint.rstrip("/") for s in chosen} | {s.responses for s in chosen}
    target = open_store(s3_uri, settings)
    sent = 0
    for key, size in source.list_sizes("").items():
        owner = next((t for t in theirs if key == t or key.startswith(t + "/")), None)
        if key == "fleet.yaml" or (owner is not None and owner not in mine):
            continue
        target.write_bytes(key, source.read_bytes(key))
        sent += size
    save_manifest(target, manifest.model_copy(update={"scorers": chosen}))
    return sent


def task_run_count(flow_run_id) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    count, page = 0, 200  # the API's largest page
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         limit=page, offset=count)
            count += len(runs)
            if len(runs) < page:
                return count


def run_size(n: int, local: Path, settings, address: str, overrides: dict) -> dict:
    from dataclasses import asdict

    from fixtures_s3 import make_s3_bucket  # tests/: the same bucket helper as the suite's moto tests
    from flows.nightly import consolidate
    from infra.storage import open_store

    bucket = make_s3_bucket(settings)
    uri = f"s3://{bucket}/fleet"
    uploaded = cold_copy(local, n, uri, settings)
    config = {**overrides, "ray_address": address}
    with PeakRSS(interval=0.05) as rss:
        state = consolidate(fleet="fleet.yaml", store=uri, config=config, settings=asdict(settings), return_state=True)
    summary = state.result()
    written = sum(open_store(uri, settings).list_sizes("").values()) - uploaded
    row = {"n": n, "seconds": {k: summary["seconds"].get(k, 0.0) for k in STAGES},
           "driver_peak_rss_mb": round(rss.peak / 2**20, 1),
           "driver_rss_at_start_mb": round(rss.start / 2**20, 1),
           "driver_peak_rss_mb_by_stage": summary.get("driver_peak_rss_mb"), "task_runs": task_run_count(state.state_details.flow_run_id),
           "bytes_written": written, "gw_pairs_solved": summary["computed"]["pairs"],
           "gw_pairs_skipped": summary["skipped"]["pairs"],
           "trial_merges": summary["computed"].get("trial merges"), "groups": len(summary["groups"]),
           "individual_items": len(summary["individual"]),
           "n_items_published": summary["storage"]["n_items"]}
    print(json.dumps(row), flush=True)
    return row


def growth_exponents(rows: list[dict]) -> dict[str, float | None]:
    """b in seconds ~ a N^b per stage (least squares on log-log); None for a stage that takes ~no time."""
    sizes = np.log([r["n"] for r in rows])
    out = {}
    for stage in STAGES:
        seconds = np.array([r["seconds"][stage] for r in rows])
        out[stage] = round(float(np.polyfit(sizes, np.log(seconds), 1)[0]), 2) \
            if len(rows) >= 2 and (seconds >= 0.05).all() else None
    for name in ("driver_peak_rss_mb", "task_runs", "bytes_written", "gw_pairs_solved"):
        values = np.array([max(r[name], 1) for r in rows], dtype=float)
        out[name] = round(float(np.polyfit(sizes, np.log(values), 1)[0]), 2) if len(rows) >= 2 else None
    return out


# A stage's own unit of work, where it is not N itself: its count depends on the fleet (the gate decides
# how many items stay on their own scorers, the shortlist how many pairs are solved).
WORK_UNITS = {"gw": "gw_pairs_solved", "trial-merges": "trial_merges", "merge": "groups",
              "individual": "individual_items"}


def work_exponents(rows: list[dict]) -> dict[str, dict]:
    """Per stage with a unit of work: seconds per unit at each N and b in seconds ~ a units^b."""
    out = {}
    for stage, unit in WORK_UNITS.items():
        units = np.array([max(r[unit] or 0, 1) for r in rows], dtype=float)
        seconds = np.array([r["seconds"][stage] for r in rows])
        fit = len(rows) >= 2 and len(set(units)) > 1 and (seconds >= 0.05).all()
        out[stage] = {"unit": unit, "seconds_per_unit": [round(float(x), 3) for x in seconds / units],
                      "exponent": round(float(np.polyfit(np.log(units), np.log(seconds), 1)[0]), 2) if fit else None}
    return out


def start_moto(python: str) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process on a free loopback port; returns (process, endpoint)."""
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return server, endpoint
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"moto's server exited with {server.returncode} before answering on {endpoint}")
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"moto's server did not answer on {endpoint} within 30 s")


def settings_for(endpoint: str, work: Path):
    from infra.settings import Settings

    return Settings(store=str(work / "unused"), s3_endpoint=endpoint, s3_region="us-east-1",
                    aws_access_key_id="testing", aws_secret_access_key="testing")


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25,50,100,200")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a ConsolidateConfig field for every run (JSON value, else a string)")
    parser.add_argument("--work", default=str(ROOT / ".fleetmerge" / "flow_scale"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "flow_scale.json"))
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)  # a child: one N against --address
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    reap_on_exit()
    overrides = parse_overrides(args.set)
    work = Path(args.work)

    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from infra.settings import offline_env

    offline_env()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.one_size:
        local = build_fleet_cache(args.one_size, work)
        run_size(args.one_size, local, settings_for(args.endpoint, work), args.address, overrides)
        return

    from ray.cluster_utils import Cluster

    sizes = sorted(int(s) for s in args.sizes.split(","))
    work.mkdir(parents=True, exist_ok=True)
    build_fleet_cache(max(sizes), work)
    moto, endpoint = start_moto(sys.executable)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    rows = []
    try:
        for n in sizes:  # a fresh driver per N: its peak RSS is that run's, not the sizes' before it
            child = subprocess.run([sys.executable, __file__, "--one-size", str(n), "--address", cluster.address,
                                    "--endpoint", endpoint, "--work", str(work),
                                    *[f"--set={item}" for item in args.set]],
                                   stdout=subprocess.PIPE, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        moto.terminate()
        moto.wait(timeout=30)
    largest = rows[-1]
    result = {"sizes": sizes, "config": overrides, "rows": rows, "growth_exponents": growth_exponents(rows),
              "work_exponents": work_exponents(rows),
              f"flow_seconds_n{largest['n']}": largest["seconds"]["total"], "nodes": 3,
              "store": "moto S3 over HTTP (its own process)", "driver": "a fresh process per N",
              "commit": commit(), "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    emit(result)


if __name__ == "__main__":
    main()
