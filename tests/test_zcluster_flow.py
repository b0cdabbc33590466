"""The nightly flow on a 3-node Ray cluster (ray.cluster_utils.Cluster on this machine).

Named to run last: it replaces the session's local Ray with a cluster and shuts it down after.
"""
from __future__ import annotations

import shutil

import pytest

from flows.nightly import consolidate
from infra.publish import latest_run
from infra.storage import open_store


@pytest.fixture
def three_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the session's local Ray, if any: this test brings its own
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_flow_on_a_three_node_cluster(prefect_harness, three_node_cluster, tmp_path, tiny_fleet_dir):
    import ray

    root = tmp_path / "fleet"
    shutil.copytree(tiny_fleet_dir, root)
    config = {"grid": [], "max_responses": 48, "delta": 1.0, "ray_address": three_node_cluster.address}
    summary = consolidate(fleet="fleet.yaml", store=str(root), config=config)
    assert len(ray.nodes()) == 3 and all(node["Alive"] for node in ray.nodes())
    assert summary["computed"]["features"] == 5 and summary["computed"]["pairs"] == 10
    assert latest_run(open_store(str(root))) == summary["run_id"]
