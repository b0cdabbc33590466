"""Ray fixtures: one owner of the session's Ray, so tests that need a local Ray and tests that bring a
multi-node cluster run in any order (starting a local Ray costs 5-10 s, so it is started only when a
test asks, and kept until a cluster test needs the process's Ray connection)."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

__all__ = ["ray_cluster", "ray_local", "ray_session"]


class RaySession:
    """The test session's Ray connection: a local Ray, or one test's own cluster, never both at once."""

    def __init__(self) -> None:
        self.local_info: dict[str, Any] | None = None  # set while the local Ray this owner started is up

    def local(self) -> dict[str, Any]:
        """A local loopback-only Ray with 2 CPUs (token auth off, usage stats off); `ensure_ray`'s description."""
        import ray

        from infra.ray_conn import ensure_ray

        if self.local_info is None or not ray.is_initialized():
            self.local_info = ensure_ray(num_cpus=2)
        return self.local_info

    def cluster(self, n_nodes: int) -> Iterator[Any]:
        """A `ray.cluster_utils.Cluster` of `n_nodes` one-CPU nodes on this machine, for one test.

        A process holds one Ray connection, so the local Ray goes first; the next `local()` starts it again.
        """
        import ray
        from ray.cluster_utils import Cluster

        self.local_info = None
        ray.shutdown()  # whatever Ray this process is connected to: this test brings its own
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(n_nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()

    def close(self) -> None:
        """At the session's end: shut down the Ray this process is connected to, unless it was not ours."""
        import ray

        if self.local_info is not None and self.local_info["mode"] == "existing":
            return  # not ours to stop
        self.local_info = None
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[RaySession]:
    session = RaySession()
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def ray_local(ray_session: RaySession) -> dict[str, Any]:
    """The session's local Ray (started on first use, or again after a cluster test)."""
    return ray_session.local()


@pytest.fixture
def ray_cluster(ray_session: RaySession) -> Iterator[Any]:
    """A 3-node Ray cluster on this machine, for one test; the session's local Ray is stopped first."""
    yield from ray_session.cluster(3)
