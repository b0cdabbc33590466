"""Running many small jobs: in this process, or as Ray tasks with a bounded window and a deadline.

The GW matrix (`workers.ray_gw`) and the trial merges (`workers.pair_jobs`) both hand out chunks of
work this way: at most `window` jobs in flight (the cluster's CPUs by default), half a CPU each, every
wait with a timeout, and whatever is unfinished at the deadline cancelled. The flow's one-off jobs (a
group's merge, an item kept on its own scorer) run through `run_on_ray`, as the same kind of task.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence


class _Local:
    """Runs each job as it is submitted, in this process."""

    def __init__(self, fn: Callable, shared: tuple) -> None:
        self._fn, self._shared, self._done = fn, shared, []

    def __len__(self) -> int:
        return len(self._done)

    def submit(self, tag, *args) -> None:
        self._done.append((tag, self._fn(*self._shared, *args)))

    def wait(self) -> list:
        done, self._done = self._done, []
        return done


class _OnRay:
    """Jobs as Ray tasks (`_as_task`); `shared` arguments are put in the object store once."""

    def __init__(self, fn: Callable, shared: tuple, deadline: float, timeout_s: float, label: str) -> None:
        import ray

        self._remote = _as_task(fn)
        self._shared = tuple(ray.put(value) for value in shared)
        self._pending: dict = {}
        self._deadline, self._timeout_s, self._label = deadline, timeout_s, label

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, tag, *args) -> None:
        self._pending[self._remote.remote(*self._shared, *args)] = tag

    def wait(self) -> list:
        import ray

        left = self._deadline - time.monotonic()
        if left <= 0:
            for ref in self._pending:
                ray.cancel(ref, force=True)
            raise TimeoutError(f"{self._label}: {len(self._pending)} tasks still unfinished after {self._timeout_s} s")
        done, _ = ray.wait(list(self._pending), num_returns=1, timeout=min(left, 60.0))
        return [(self._pending.pop(ref), ray.get(ref, timeout=60.0)) for ref in done]


def _as_task(fn: Callable):
    import ray

    # Half a CPU each: never wait forever for CPUs that extraction actors or other jobs hold.
    return ray.remote(num_cpus=0.5, max_retries=2)(fn)


def run_on_ray(fn: Callable, *args, address: str | None = None, timeout_s: float, **kwargs):
    """One job as a Ray task (connecting first if this process has not: thread-safe), waited for at most
    `timeout_s` seconds; returns its result."""
    import ray

    from infra.ray_conn import ensure_ray

    ensure_ray(address)
    return ray.get(_as_task(fn).remote(*args, **kwargs), timeout=timeout_s)


def runner(fn: Callable, shared: tuple, use_ray: bool, max_in_flight: int | None, deadline: float,
           timeout_s: float, *, label: str = "jobs"):
    """(runner, window): one job at a time in process, else as many as Ray has CPUs (or `max_in_flight`)."""
    if not use_ray:
        return _Local(fn, shared), 1
    import ray

    from infra.ray_conn import ensure_ray

    ensure_ray()
    window = max_in_flight or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return _OnRay(fn, shared, deadline, timeout_s, label), window


def run_all(runner, window: int, jobs: Sequence[tuple], on_result: Callable) -> None:
    """Submit `jobs` ((tag, *args)) keeping at most `window` in flight; `on_result(tag, result)` each."""
    queue = deque(jobs)
    while queue or len(runner):
        while queue and len(runner) < window:
            runner.submit(*queue.popleft())
        for tag, result in runner.wait():
            on_result(tag, result)


def fill_missing(chunk_job: Callable, shared: tuple, todo: Sequence[str], keys: Mapping[str, str], *args,
                 use_ray: bool, chunk_size: int, timeout_s: float, label: str) -> None:
    """Per-scorer results written under `keys` by `chunk_job(*shared, ids, *args, keys)`, for the scorers
    in `todo` (those not stored yet), in chunks of `chunk_size`: as Ray tasks, or in process."""
    import time

    if not todo:
        return
    jobs_runner, window = runner(chunk_job, shared, use_ray, None, time.monotonic() + timeout_s, timeout_s, label=label)
    chunks = [list(todo[n:n + chunk_size]) for n in range(0, len(todo), chunk_size)]
    run_all(jobs_runner, window, [(tuple(c), c, *args, [keys[i] for i in c]) for c in chunks], lambda *_: None)
