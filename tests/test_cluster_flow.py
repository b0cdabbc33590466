"""The nightly flow on a 3-node Ray cluster (ray.cluster_utils.Cluster on this machine): it runs, and its
tasks ran on more than one node (Ray's state API, asked at the cluster's own address).

The `ray_cluster` fixture (tests/fixtures_ray.py) stops the session's local Ray for this test and the
next test that needs one starts it again, so this file runs in any order.
"""
from __future__ import annotations

import shutil
import threading
import time

import pytest

from flows.nightly import consolidate
from infra.publish import latest_run, read_manifest
from infra.storage import open_store


def _nodes_that_ran_tasks(address: str, timeout_s: float = 30.0) -> dict[str, set[str]]:
    """Task name -> ids of the nodes where it finished, from Ray's state API (task events arrive late)."""
    from ray.util.state import list_tasks

    deadline = time.monotonic() + timeout_s
    while True:
        tasks = list_tasks(address=address, filters=[("state", "=", "FINISHED")], limit=10_000, detail=True,
                           raise_on_missing_output=False)
        nodes: dict[str, set[str]] = {}
        for task in tasks:
            if task.type in ("NORMAL_TASK", "ACTOR_TASK") and task.node_id:
                nodes.setdefault(task.func_or_class_name, set()).add(task.node_id)
        if len(set().union(*nodes.values())) >= 2 or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def test_flow_on_a_three_node_cluster(prefect_harness, ray_cluster, tmp_path, tiny_fleet_dir):
    import ray

    root = tmp_path / "fleet"
    shutil.copytree(tiny_fleet_dir, root)
    config = {"grid": [], "max_responses": 48, "delta": 1.0, "ray_address": ray_cluster.address}
    summary = consolidate(fleet="fleet.yaml", store=str(root), config=config)
    assert len(ray.nodes()) == 3 and all(node["Alive"] for node in ray.nodes())
    assert summary["computed"]["features"] == 5 and summary["computed"]["pairs"] == 10
    assert latest_run(open_store(str(root))) == summary["run_id"]
    # The work was spread: the flow's tasks (extraction actors, GW chunks, merges) ran on >= 2 nodes.
    ran = _nodes_that_ran_tasks(ray_cluster.address)
    used = set().union(*ran.values())
    assert len(used) >= 2 and used <= {node["NodeID"] for node in ray.nodes()}, ran


@pytest.mark.faults
@pytest.mark.slow
def test_a_node_removed_mid_run_the_run_completes(prefect_harness, ray_cluster, tmp_path, tiny_fleet_dir):
    """A worker node is removed once the merges have begun (the first merge task is running on the
    cluster): its tasks are retried elsewhere, the run publishes every item, on the two nodes left."""
    import ray

    root = tmp_path / "fleet"
    shutil.copytree(tiny_fleet_dir, root)
    config = {"grid": [], "max_responses": 48, "delta": 1.0, "ray_address": ray_cluster.address}
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(summary=consolidate(fleet="fleet.yaml", store=str(root),
                                                                              config=config)))
    run.start()
    victim = ray_cluster.list_all_nodes()[-1]  # not the head
    deadline = time.monotonic() + 240
    while run.is_alive() and time.monotonic() < deadline and not _merge_task_running(ray_cluster.address):
        time.sleep(0.2)
    assert run.is_alive(), "the run finished before its merges could be interrupted"
    ray_cluster.remove_node(victim)
    run.join(timeout=300)
    assert "summary" in outcome, "the run did not complete after a node was removed"
    summary = outcome["summary"]
    assert sum(node["Alive"] for node in ray.nodes()) == 2
    routing = read_manifest(open_store(str(root)), summary["run_id"])["routing"]
    assert latest_run(open_store(str(root))) == summary["run_id"] and len(routing) == 5


def _merge_task_running(address: str) -> bool:
    from ray.util.state import list_tasks

    tasks = list_tasks(address=address, filters=[("state", "=", "RUNNING")], limit=1_000,
                       raise_on_missing_output=False)
    return any(task.func_or_class_name == "consolidate_group_job" for task in tasks)
