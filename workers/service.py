"""The scoring service: a published consolidated fleet answering HTTP requests on Ray Serve.

    POST /score  {"item": "circuits-1", "texts": ["...", ...]}
    POST /score  {"requests": [{"item": "circuits-1", "text": "..."}, ...]}   (items mixed)
    GET  /healthz                                                            (run, loaded checkpoints)

A request's rows are routed item -> checkpoint by the published manifest and answered with one
backbone pass per shared backbone (`ConsolidatedFleet.predict_mixed`); requests that arrive together
are answered together, so each checkpoint is loaded once for all of them. Checkpoints load on first use
and stay within the memory budget (the least in demand evicted: `workers.serving`). When `LATEST`
moves, the next request is answered by the new run; requests already running finish on the old one,
which is closed when the last of them is done. A bad request gets a 4xx and a one-line reason.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from infra.publish import latest_run
from infra.storage import Store
from workers.serving import ConsolidatedFleet, Prediction

MAX_TEXT_CHARS = 10_000  # an answer longer than this is not a student response
MAX_ROWS = 1_024  # rows per request
BATCH_SIZE = 16  # requests answered together at most


class BadRequest(ValueError):
    """A request the service will not answer, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes) -> list[tuple[str, str]]:
    """The (item, text) rows of a request body, or BadRequest naming the first problem."""
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"request body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(400, 'request body must be an object: {"item": ..., "texts": [...]} or {"requests": [...]}')
    if "requests" in doc:
        rows = doc["requests"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise BadRequest(400, '"requests" must be a list of {"item": ..., "text": ...} objects')
        pairs = [(r.get("item"), r.get("text")) for r in rows]
    elif "item" in doc:
        texts = doc.get("texts")
        if not isinstance(texts, list):
            raise BadRequest(400, '"texts" must be a list of strings')
        pairs = [(doc["item"], t) for t in texts]
    else:
        raise BadRequest(400, 'request needs "item" and "texts", or "requests"')
    if not pairs:
        raise BadRequest(400, "request has no texts")
    if len(pairs) > MAX_ROWS:
        raise BadRequest(413, f"request has {len(pairs)} texts, more than {MAX_ROWS}")
    for n, (item, text) in enumerate(pairs):
        if not isinstance(item, str) or not item:
            raise BadRequest(400, f"row {n}: item must be a non-empty string")
        if not isinstance(text, str):
            raise BadRequest(400, f"row {n}: text must be a string")
        if not text.strip():
            raise BadRequest(400, f"row {n}: text is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise BadRequest(413, f"row {n}: text has {len(text)} characters, more than {MAX_TEXT_CHARS}")
    return pairs


class FleetHolder:
    """The published run being served, moved to the new one when `LATEST` moves (checked at most every
    `poll_s` seconds), without cutting off requests that are running on the old one."""

    def __init__(self, store: Store, *, run_id: str | None = None, memory_budget: int | None = None,
                 device: str | None = None, poll_s: float = 5.0):
        """run_id: serve this run and never move (default: LATEST, followed)."""
        self.store, self.memory_budget, self.device = store, memory_budget, device
        self.poll_s = float("inf") if run_id else poll_s
        self._lock = threading.Lock()
        self._fleet = self._open(run_id)
        self._checked = time.monotonic()
        self._users: dict[int, int] = {id(self._fleet): 0}
        self._retired: dict[int, ConsolidatedFleet] = {}
        self._model_locks: dict[int, threading.Lock] = {id(self._fleet): threading.Lock()}

    def _open(self, run_id: str | None) -> ConsolidatedFleet:
        return ConsolidatedFleet(self.store, run_id, memory_budget=self.memory_budget, device=self.device)

    def _acquire(self) -> ConsolidatedFleet:
        with self._lock:
            if time.monotonic() - self._checked >= self.poll_s:
                self._checked = time.monotonic()
                latest = latest_run(self.store)
                if latest is not None and latest != self._fleet.run_id:
                    old, self._fleet = self._fleet, self._open(latest)
                    self._users[id(self._fleet)] = 0
                    self._model_locks[id(self._fleet)] = threading.Lock()
                    self._retired[id(old)] = old
                    self._close_if_idle(old)
            self._users[id(self._fleet)] += 1
            return self._fleet

    def _release(self, fleet: ConsolidatedFleet) -> None:
        with self._lock:
            self._users[id(fleet)] -= 1
            if id(fleet) in self._retired:
                self._close_if_idle(fleet)

    def _close_if_idle(self, fleet: ConsolidatedFleet) -> None:
        if self._users[id(fleet)] == 0:
            del self._retired[id(fleet)], self._users[id(fleet)], self._model_locks[id(fleet)]
            fleet.close()

    def score(self, rows: Sequence[tuple[str, str]]) -> tuple[str, list[Prediction]]:
        """(run id, one prediction per row in order); KeyError names an item the run does not serve."""
        fleet = self._acquire()
        try:
            unknown = sorted({item for item, _ in rows if item not in fleet.routing})
            if unknown:
                raise KeyError(f"unknown item {unknown[0]!r}: run {fleet.run_id} serves {len(fleet.routing)} items")
            with self._model_locks[id(fleet)]:  # one model pass at a time per replica: loads and evictions
                return fleet.run_id, fleet.predict_mixed(rows)
        finally:
            self._release(fleet)

    def status(self) -> dict[str, Any]:
        fleet = self._fleet
        return {"run": fleet.run_id, "items": len(fleet.routing), "loaded": fleet.loaded,
                "loaded_bytes": fleet.loaded_bytes, "memory_budget": self.memory_budget, "loads": fleet.loads,
                "evictions": fleet.evictions, "retired_runs_open": len(self._retired)}

    def close(self) -> None:
        with self._lock:
            for fleet in [self._fleet, *self._retired.values()]:
                fleet.close()


def prediction_json(item: str, prediction: Prediction) -> dict[str, Any]:
    return {"item": item, "label": prediction.label,
            "scores": {name: round(p, 4) for name, p in prediction.named_scores().items()}}


def deployment(store_uri: str, *, run_id: str | None = None, settings: dict | None = None,
               memory_budget: int | None = None, device: str | None = None, poll_s: float = 5.0, replicas: int = 1):
    """The Ray Serve application serving the store's published fleet, LATEST or `run_id` (bind it, then
    `serve.run`)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    # Enough requests in a replica at once for a full batch (Serve's default, 5, would cap it below 16).
    @serve.deployment(name="fleetmerge-scorer", num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=2 * BATCH_SIZE)
    class ScoringService:
        def __init__(self):
            from infra.settings import Settings, offline_env
            from infra.storage import open_store

            offline_env()
            store = open_store(store_uri, Settings(**settings) if settings else Settings.from_env(store=store_uri))
            self.holder = FleetHolder(store, run_id=run_id, memory_budget=memory_budget, device=device,
                                      poll_s=poll_s)

        @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=0.005)
        async def _score_together(self, requests: list[list[tuple[str, str]]]) -> list[Any]:
            """Requests that arrive together are answered in one pass per checkpoint (each checkpoint is
            loaded once for all of them); a request with an unknown item fails alone."""
            rows = [row for request in requests for row in request]
            try:
                run_id, predictions = await asyncio.to_thread(self.holder.score, rows)
            except KeyError:
                return [await self._score_alone(request) for request in requests]
            out, start = [], 0
            for request in requests:
                out.append((run_id, predictions[start:start + len(request)]))
                start += len(request)
            return out

        async def _score_alone(self, rows: list[tuple[str, str]]) -> Any:
            try:
                return await asyncio.to_thread(self.holder.score, rows)
            except KeyError as exc:
                return exc

        async def __call__(self, request: Request) -> JSONResponse:
            path = request.url.path.rstrip("/")
            if path.endswith("/healthz") and request.method == "GET":
                return JSONResponse(self.holder.status())
            if not path.endswith("/score"):
                return JSONResponse({"error": f"no route {request.url.path}: POST /score or GET /healthz"}, 404)
            if request.method != "POST":
                return JSONResponse({"error": "POST a JSON body to /score"}, 405)
            try:
                rows = parse_request(await request.body())
            except BadRequest as exc:
                return JSONResponse({"error": str(exc)}, exc.status)
            answer = await self._score_together(rows)
            if isinstance(answer, KeyError):
                return JSONResponse({"error": answer.args[0]}, 404)
            run_id, predictions = answer
            return JSONResponse({"run": run_id,
                                 "predictions": [prediction_json(item, p) for (item, _), p in zip(rows, predictions)]})

    return ScoringService.bind()


def start(store_uri: str, *, host: str = "127.0.0.1", port: int = 8000, name: str = "fleetmerge", **options) -> str:
    """Start Ray Serve's HTTP proxy on host:port and the service on it (Ray must be connected); returns its
    URL. `options` are `deployment`'s. Stop it with `ray.serve.shutdown()`."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(store_uri, **options), name=name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}"
