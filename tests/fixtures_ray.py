"""Ray fixtures: one local Ray per test session (starting one costs 5-10 s), started only when a test asks."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

__all__ = ["ray_local"]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[dict[str, Any]]:
    """A local loopback-only Ray with 2 CPUs (token auth off, usage stats off); yields `ensure_ray`'s description."""
    import ray

    from infra.ray_conn import ensure_ray

    info = ensure_ray(num_cpus=2)
    try:
        yield info
    finally:
        if info["mode"] != "existing":  # only shut down what this fixture started
            ray.shutdown()
