"""The scoring service under load: a fleet's published consolidated run against the same fleet served
as one model per item, through the same HTTP service (`workers.service` on Ray Serve) under the same
memory budget (by default what holds a third of the per-item models).

The per-item run is published into the same store from each item's own scorer (the product's
`individual_job`, cached); LATEST is put back afterwards, and both services are pinned to their run.
Workload: `requests` HTTP requests of `rows` (item, text) rows each, items drawn uniformly over all
items and texts from each item's own test answers (seeded), sent by `clients` concurrent clients.
Both services start cold; the first `clients` requests (untimed) warm the replica up.
"""
from __future__ import annotations

import hashlib
import json
import math
import socket
import threading
import time
import urllib.request
from collections.abc import Sequence

import numpy as np
import pyarrow.compute as pc

from infra.manifest import load_manifest
from infra.publish import PublishError, latest_run, read_manifest, set_latest
from infra.storage import Store
from workers.group_jobs import individual_job
from workers.publish_fleet import publish_consolidated, weights_bytes_before
from workers.serving import ConsolidatedFleet


def per_item_run(store: Store, items: Sequence[str]) -> str:
    """Publish every item on its own scorer (cached by content) and return the run id."""
    latest = latest_run(store)
    sources = {f"items/{i}": individual_job(store, i)["checkpoint"] for i in items}
    run_id = "per-item-" + hashlib.sha256("\n".join(sorted(sources.values())).encode()).hexdigest()[:12]
    try:
        read_manifest(store, run_id)
    except PublishError:  # not published yet
        publish_consolidated(store, run_id, sources, bytes_before=weights_bytes_before(store, load_manifest(store),
                                                                                       list(items)))
        if latest is not None:  # a benchmark run is not the district's published state
            set_latest(store, latest)
    return run_id


def model_bytes(store: Store, run_id: str) -> int:
    """Weight bytes of one served checkpoint of the run, as the service counts them."""
    with ConsolidatedFleet(store, run_id, device="cpu") as fleet:
        fleet._checkpoint(next(iter(sorted({r["checkpoint"] for r in fleet.routing.values()}))))
        return fleet.loaded_bytes


def workload(store: Store, items: Sequence[str], n_requests: int, rows: int, seed: int) -> list[bytes]:
    manifest = load_manifest(store)
    texts = {}
    for item in items:
        table = store.read_table(manifest.scorer(item).responses, columns=["text", "split"])
        test = table.filter(pc.equal(table.column("split"), "test"))
        texts[item] = [t for t in test.column("text").to_pylist() if t and t.strip()]
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(n_requests):
        chosen = rng.choice(len(items), size=rows)
        batch = [{"item": items[c], "text": texts[items[c]][int(rng.integers(len(texts[items[c]])))]} for c in chosen]
        bodies.append(json.dumps({"requests": batch}).encode())
    return bodies


def _post(url: str, body: bytes) -> dict:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _send(url: str, bodies: Sequence[bytes], clients: int) -> None:
    queue = list(reversed(bodies))
    lock = threading.Lock()
    errors = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                body = queue.pop()
            try:
                _post(url, body)
            except Exception as exc:  # noqa: BLE001 - reported after the run
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")


def measure(store: Store, run_id: str, budget: int, bodies: Sequence[bytes], clients: int, device: str) -> dict:
    """Responses per second of the service pinned to `run_id`, with its loads and evictions."""
    from ray import serve

    from workers.service import start

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        url = start(store.uri, port=port, name="bench", run_id=run_id, memory_budget=budget, device=device)
        _send(f"{url}/score", bodies[:clients], clients)  # warm-up, untimed
        rows = sum(len(json.loads(b)["requests"]) for b in bodies[clients:])
        started = time.perf_counter()
        _send(f"{url}/score", bodies[clients:], clients)
        seconds = time.perf_counter() - started
        with urllib.request.urlopen(f"{url}/healthz", timeout=60) as response:
            health = json.loads(response.read())
    finally:
        serve.shutdown()
    return {"run": run_id, "seconds": round(seconds, 2), "responses": rows,
            "responses_per_second": round(rows / seconds, 2), "loads": health["loads"],
            "evictions": health["evictions"], "checkpoints_in_memory": len(health["loaded"])}


def service_comparison(store: Store, *, n_requests: int, rows: int, clients: int, share: float, seed: int,
                       device: str) -> dict:
    from infra.ray_conn import ensure_ray

    consolidated = latest_run(store)
    if consolidated is None:
        raise SystemExit(f"{store.uri}: nothing published; run `fleetmerge consolidate --store {store.uri}` first")
    routing = read_manifest(store, consolidated)["routing"]
    items = sorted(routing)
    separate = per_item_run(store, items)
    budget = int(math.ceil(len(items) * share) * model_bytes(store, separate))
    bodies = workload(store, items, n_requests, rows, seed)
    ensure_ray()
    results = {"per_item": measure(store, separate, budget, bodies, clients, device),
               "consolidated": measure(store, consolidated, budget, bodies, clients, device)}
    speedup = results["consolidated"]["responses_per_second"] / results["per_item"]["responses_per_second"]
    backbones = len({r["checkpoint"] for r in routing.values()})
    return {"service_speedup_at_budget": round(speedup, 2), "memory_budget_bytes": budget,
            "budget_holds_per_item_models": math.ceil(len(items) * share), "items": len(items),
            "consolidated_checkpoints": backbones, "requests": n_requests, "rows_per_request": rows,
            "clients": clients, "device": device, **results}
