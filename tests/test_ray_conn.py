"""`ensure_ray` from several threads at once (the flow's parallel merge tasks) starts one Ray."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from infra.settings import Settings

THREADS = 8


def test_concurrent_ensure_ray_initialises_once(monkeypatch):
    # ray.init and ray.is_initialized are stand-ins here: the session's real Ray (if any) is left alone.
    import ray

    from infra import ray_conn

    state = {"initialised": False, "inits": 0}

    def slow_init(**kwargs):
        time.sleep(0.05)  # a real start takes seconds: every other thread arrives meanwhile
        state["inits"] += 1
        state["initialised"] = True

    monkeypatch.setattr(ray, "is_initialized", lambda: state["initialised"])
    monkeypatch.setattr(ray, "init", slow_init)
    monkeypatch.setattr(ray_conn, "describe_ray", lambda: {})
    arrive = threading.Barrier(THREADS)

    def connect(_) -> str:
        arrive.wait()
        return ray_conn.ensure_ray(settings=Settings())["mode"]

    with ThreadPoolExecutor(THREADS) as pool:
        modes = list(pool.map(connect, range(THREADS)))
    assert state["inits"] == 1
    assert sorted(modes) == ["existing"] * (THREADS - 1) + ["local"]
