"""The nightly flow on a 3-node Ray cluster (ray.cluster_utils.Cluster on this machine).

The `ray_cluster` fixture (tests/fixtures_ray.py) stops the session's local Ray for this test and the
next test that needs one starts it again, so this file runs in any order.
"""
from __future__ import annotations

import shutil

from flows.nightly import consolidate
from infra.publish import latest_run
from infra.storage import open_store


def test_flow_on_a_three_node_cluster(prefect_harness, ray_cluster, tmp_path, tiny_fleet_dir):
    import ray

    root = tmp_path / "fleet"
    shutil.copytree(tiny_fleet_dir, root)
    config = {"grid": [], "max_responses": 48, "delta": 1.0, "ray_address": ray_cluster.address}
    summary = consolidate(fleet="fleet.yaml", store=str(root), config=config)
    assert len(ray.nodes()) == 3 and all(node["Alive"] for node in ray.nodes())
    assert summary["computed"]["features"] == 5 and summary["computed"]["pairs"] == 10
    assert latest_run(open_store(str(root))) == summary["run_id"]
