"""Small helpers shared by the benchmarks: thread settings, timing, the final JSON line."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# Benchmarks run as scripts (python bench/x.py): make the repository importable.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def same_groups(a, b) -> bool:
    """Whether two plans (lists of groups) hold the same groups, in any order."""
    return sorted(map(sorted, a)) == sorted(map(sorted, b))


def same_sizes(a, b) -> bool:
    """Whether two plans have the same group sizes (the comparisons at equal group sizes)."""
    return sorted(map(len, a)) == sorted(map(len, b))


def reap_on_exit() -> None:
    """Stop whatever this benchmark starts (a Prefect server, Ray) also when it is killed: the CLI's
    watchdog (infra/reaper.py), for benchmarks that run the flow in-process."""
    from infra.reaper import start_reaper

    start_reaper()


def add_threads_argument(parser) -> None:
    """``--threads`` (default 1) for the CPU-seconds benchmarks."""
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and BLAS alike (1: CPU seconds then measure work, "
                             "not the spinning of idle threads on a shared machine)")


def set_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: every core) for torch and for numpy's BLAS alike.

    Returns the count used. BLAS is limited through threadpoolctl when it is installed.
    """
    n = n or os.cpu_count() or 1
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        pass
    return n


@dataclass
class Timing:
    """CPU seconds (all threads of this process) and wall seconds of a block."""

    cpu: float = 0.0
    wall: float = 0.0

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(self.cpu + other.cpu, self.wall + other.wall)

    def as_dict(self) -> dict[str, float]:
        return {"cpu_s": round(self.cpu, 4), "wall_s": round(self.wall, 4)}


@contextmanager
def timed() -> Iterator[Timing]:
    """``with timed() as t: ...`` fills ``t.cpu`` (time.process_time) and ``t.wall``."""
    t = Timing()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        yield t
    finally:
        t.cpu = time.process_time() - cpu
        t.wall = time.perf_counter() - wall


def ratio(baseline: float, ours: float) -> float:
    """baseline / ours, rounded (inf when ours took no measurable time)."""
    return round(baseline / ours, 2) if ours > 0 else math.inf


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """This process's peak resident memory while the block runs, sampled on a thread every
    ``interval`` seconds; ``start`` is the RSS the block began from."""

    def __init__(self, interval: float = 0.001) -> None:
        import threading

        self.interval = interval
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def commit() -> str | None:
    """The repository's HEAD commit (with "+dirty" for uncommitted changes), or None outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's result as ONE JSON object on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)
