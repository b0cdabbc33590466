"""Feature extraction over a fleet with Ray actors (docs/architecture.md §1 step 2, §5 sizing).

The driver first plans every scorer (responses chosen, checkpoint and data hashed, key named) and
reuses each feature file that already exists; only the rest reach Ray, so a rerun with nothing
changed starts no actor. The misses go to a sliding window of actors: each actor works on one scorer
at a time (loads it once, runs its responses through in sorted batches, writes the Parquet file,
returns a small `FeatureRef`) and then takes the next scorer.

Sizing (docs/architecture.md §5): on a 2-CPU machine, actors that each ask for a whole CPU wait forever, silently,
once the CPUs are taken. So actors ask for a fraction of a CPU, the window of live actors is sized
from `ray.cluster_resources()` (one per CPU, or one per GPU slot), and every wait has a timeout.
GPU actors are used only when the cluster declares GPUs and `torch.cuda.is_available()` in a worker
holding one (logical GPUs are not real ones); never more live GPU actors than GPU slots.

Failures are per scorer: an unreadable checkpoint, an exception, OOM or a dead worker is reported with
its reason and the rest go on. A dead worker is restarted by Ray and its call retried
(`max_restarts` / `max_task_retries`); one that keeps dying, or runs past `timeout_s`, is killed, its
scorer reported, and a fresh actor takes its place.
"""
from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from infra.manifest import ScorerSpec
from infra.storage import Store
from workers.extract import (FEATURES_PREFIX, ExtractConfig, FeatureRef, cached_ref, extract_for_spec,
                             plan_extraction)

CPU_REQUEST_SHARE = 0.5  # actors reserve half of their CPU share, so other Ray work always still fits
PLAN_THREADS = 8  # planning hashes checkpoints: I/O bound, overlap it
GPU_PROBE_TIMEOUT_S = 120.0
ProgressFn = Callable[[str, str, int, int], None]  # (scorer_id, "reused" | "computed" | "failed", done, total)


@dataclass
class FleetExtraction:
    """Outcome of `extract_fleet`: a reference per scorer that has features, a reason per one that has not."""

    features: dict[str, FeatureRef] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    actors_started: int = 0
    device: str = "none"  # "cpu" or "cuda" when actors ran; "none" when everything was reused
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (for Prefect artifacts and logs)."""
        return {"features": {k: v.to_dict() for k, v in self.features.items()}, "errors": dict(self.errors),
                "computed": list(self.computed), "reused": list(self.reused), "actors_started": self.actors_started,
                "device": self.device, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class ActorSizing:
    window: int  # live actors at most
    num_cpus: float  # logical CPUs each actor asks for
    num_gpus: float  # logical GPUs each actor asks for (0 on CPU)
    threads: int  # torch intra-op threads per actor
    device: str  # "cpu" or "cuda"


def size_actors(cluster: Mapping[str, float], n_scorers: int, *, use_gpu: bool, max_in_flight: int | None = None,
                gpus_per_actor: float = 1.0) -> ActorSizing:
    """How many actors to keep alive and what each asks for, from the cluster's total resources.

    CPU: one live actor per CPU (or `max_in_flight`), each asking for half its share of a CPU, so
    actors never wait on CPUs another job holds and never starve the rest of Ray. GPU: one actor per
    GPU slot (`gpus_per_actor` may be a fraction to share a GPU), never more, whatever `max_in_flight`.
    """
    if n_scorers < 1:
        raise ValueError(f"size_actors: nothing to run (n_scorers={n_scorers})")
    if max_in_flight is not None and max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if use_gpu:
        if gpus <= 0:
            raise ValueError("GPU actors requested but the Ray cluster declares no GPUs")
        if not 0 < gpus_per_actor <= 1:
            raise ValueError(f"gpus_per_actor must be in (0, 1], not {gpus_per_actor}")
        per_actor = min(gpus_per_actor, gpus)
        slots = max(1, int(gpus / per_actor + 1e-9))
        window = min(slots, n_scorers, max_in_flight or slots)
        num_cpus = min(1.0, cpus / window) * CPU_REQUEST_SHARE if cpus > 0 else 0.0
        return ActorSizing(window, num_cpus, per_actor, max(1, int(cpus // window)), "cuda")
    if cpus <= 0:
        raise ValueError("the Ray cluster declares no CPUs, so no extraction actor can be placed")
    slots = max(1, int(cpus))
    window = min(n_scorers, max_in_flight or slots)
    return ActorSizing(window, min(1.0, cpus / window) * CPU_REQUEST_SHARE, 0.0, max(1, int(cpus // window)), "cpu")


class ExtractionWorker:
    """The Ray actor's body (plain class; `extract_fleet` wraps it with `ray.remote`)."""

    def __init__(self, config: ExtractConfig, device: str, threads: int) -> None:
        import torch

        from workers.models import quiet_transformers

        torch.set_num_threads(max(1, threads))
        quiet_transformers()
        self.config = config
        self.device = device

    def extract(self, store: Store, spec: ScorerSpec, base_model: str | None, prefix: str, force: bool) -> FeatureRef:
        return extract_for_spec(store, spec, self.config, self.device, base_model=base_model, prefix=prefix,
                                force=force)

    def pid(self) -> int:
        return os.getpid()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cuda_in_workers(num_gpus: float, timeout_s: float = GPU_PROBE_TIMEOUT_S) -> bool:
    """True if a Ray worker holding `num_gpus` logical GPUs sees a real CUDA device."""
    import ray

    probe = ray.remote(_cuda_available).options(num_gpus=num_gpus, num_cpus=0, max_retries=0).remote()
    ready, _ = ray.wait([probe], timeout=timeout_s)
    if not ready:
        ray.cancel(probe, force=True)
        return False
    try:
        return bool(ray.get(probe, timeout=10))
    except ray.exceptions.RayError:
        return False


def _reason(exc: BaseException) -> str:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _plan_all(store: Store, specs: Sequence[ScorerSpec], config: ExtractConfig, prefix: str, force: bool
              ) -> list[tuple[ScorerSpec, FeatureRef | None, str | None]]:
    """Per scorer: (spec, its stored features or None, the reason it cannot be planned or None)."""
    def plan(spec: ScorerSpec) -> tuple[ScorerSpec, FeatureRef | None, str | None]:
        try:
            extraction_plan = plan_extraction(store, spec, config, prefix=prefix)
            return spec, None if force else cached_ref(store, extraction_plan), None
        except Exception as exc:  # any problem with one scorer's files is that scorer's error
            return spec, None, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=min(PLAN_THREADS, max(1, len(specs)))) as pool:
        return list(pool.map(plan, specs))


@dataclass
class _Job:
    spec: ScorerSpec
    actor: Any
    started: float


def extract_fleet(store: Store, specs: Sequence[ScorerSpec], config: ExtractConfig = ExtractConfig(), *,
                  max_in_flight: int | None = None, progress: ProgressFn | None = None, timeout_s: float = 1800.0,
                  use_gpu: bool | None = None, gpus_per_actor: float = 1.0, max_restarts: int = 1,
                  max_task_retries: int = 1, base_model: str | None = None, prefix: str = FEATURES_PREFIX,
                  force: bool = False, worker_cls: type = ExtractionWorker, poll_s: float = 1.0) -> FleetExtraction:
    """Features for every scorer, computed by Ray actors where not already stored.

    max_in_flight: live actors at most (default: sized from the cluster; GPU actors never exceed GPU slots).
    progress: called as progress(scorer_id, status, done, total) after each scorer.
    timeout_s: per scorer, from submission (includes waiting for a worker to start); past it the actor
        is killed and the scorer reported.
    use_gpu: None = when the cluster has GPUs and a worker sees CUDA; True requires it; False never.
    max_restarts / max_task_retries: Ray's retries of a dead actor and of the call it was running.
    worker_cls: the actor body (a subclass of `ExtractionWorker`; tests inject faults this way).
    Starts a local Ray (`infra.ray_conn.ensure_ray`) if none is connected and something must be computed.
    """
    duplicates = sorted(i for i, n in Counter(spec.id for spec in specs).items() if n > 1)
    if duplicates:
        raise ValueError(f"extract_fleet: scorer ids appear more than once: {duplicates}")
    if timeout_s <= 0:
        raise ValueError(f"extract_fleet: timeout_s must be positive, not {timeout_s}")
    started = time.perf_counter()
    result = FleetExtraction()
    total = len(specs)

    def report(scorer_id: str, status: str) -> None:
        if progress is not None:
            progress(scorer_id, status, len(result.features) + len(result.errors), total)

    todo: deque[ScorerSpec] = deque()
    for spec, ref, problem in _plan_all(store, specs, config, prefix, force):
        if problem is not None:
            result.errors[spec.id] = problem
            report(spec.id, "failed")
        elif ref is not None:
            result.features[spec.id] = ref
            result.reused.append(spec.id)
            report(spec.id, "reused")
        else:
            todo.append(spec)
    if todo:
        _run_actors(store, todo, config, result, report, max_in_flight=max_in_flight, timeout_s=timeout_s,
                    use_gpu=use_gpu, gpus_per_actor=gpus_per_actor, max_restarts=max_restarts,
                    max_task_retries=max_task_retries, base_model=base_model, prefix=prefix, force=force,
                    worker_cls=worker_cls, poll_s=poll_s)
    result.seconds = time.perf_counter() - started
    return result


def _run_actors(store: Store, todo: deque[ScorerSpec], config: ExtractConfig, result: FleetExtraction,
                report: Callable[[str, str], None], *, max_in_flight: int | None, timeout_s: float,
                use_gpu: bool | None, gpus_per_actor: float, max_restarts: int, max_task_retries: int,
                base_model: str | None, prefix: str, force: bool, worker_cls: type, poll_s: float) -> None:
    import ray

    from infra.ray_conn import ensure_ray

    if not ray.is_initialized():
        ensure_ray()
    cluster = ray.cluster_resources()
    has_gpus = float(cluster.get("GPU", 0.0)) > 0
    if use_gpu is None:
        use_gpu = has_gpus and cuda_in_workers(min(gpus_per_actor, float(cluster["GPU"])))
    elif use_gpu and has_gpus and not cuda_in_workers(min(gpus_per_actor, float(cluster["GPU"]))):
        raise ValueError("use_gpu=True, but Ray workers holding a GPU do not see CUDA (torch.cuda.is_available() "
                         "is False there): the cluster's GPUs are logical only")
    sizing = size_actors(cluster, len(todo), use_gpu=use_gpu, max_in_flight=max_in_flight,
                         gpus_per_actor=gpus_per_actor)
    result.device = sizing.device
    actor_class = ray.remote(worker_cls).options(
        num_cpus=sizing.num_cpus, num_gpus=sizing.num_gpus, max_restarts=max_restarts,
        max_task_retries=max_task_retries, max_concurrency=1)
    idle: list[Any] = []
    live: list[Any] = []
    running: dict[Any, _Job] = {}

    def retire(actor: Any) -> None:
        if actor in live:
            live.remove(actor)
        ray.kill(actor, no_restart=True)

    try:
        while todo or running:
            while todo and (idle or len(live) < sizing.window):
                if idle:
                    actor = idle.pop()
                else:
                    actor = actor_class.remote(config, sizing.device, sizing.threads)
                    live.append(actor)
                    result.actors_started += 1
                spec = todo.popleft()
                call = actor.extract.remote(store, spec, base_model, prefix, force)
                running[call] = _Job(spec, actor, time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
            for call in ready:
                job = running.pop(call)
                try:
                    ref = ray.get(call, timeout=60)
                except ray.exceptions.RayTaskError as exc:  # the scorer's own failure: the actor is fine
                    result.errors[job.spec.id] = _reason(exc)
                    idle.append(job.actor)
                    report(job.spec.id, "failed")
                except ray.exceptions.RayError as exc:  # the actor died past its restarts, or is unusable
                    result.errors[job.spec.id] = f"extraction worker failed: {_reason(exc)}"
                    retire(job.actor)
                    report(job.spec.id, "failed")
                else:
                    result.features[job.spec.id] = ref
                    result.computed.append(job.spec.id)
                    idle.append(job.actor)
                    report(job.spec.id, "computed")
            now = time.monotonic()
            for call, job in list(running.items()):
                if now - job.started > timeout_s:
                    running.pop(call)
                    retire(job.actor)
                    result.errors[job.spec.id] = (f"timed out after {timeout_s:g} s (waiting for a worker or "
                                                  "extracting); its actor was killed")
                    report(job.spec.id, "failed")
    finally:
        for actor in list(live):
            retire(actor)
