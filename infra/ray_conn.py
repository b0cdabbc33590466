"""Connect to Ray (docs/architecture.md §5): an existing cluster when one is named, else a local loopback-only Ray.

An address comes from the argument, then ``FLEETMERGE_RAY_ADDRESS`` (``Settings.ray_address``). With
none, a local single-machine Ray is started that listens on and advertises 127.0.0.1 only: Ray picks
the machine's network address by default, and only ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read when
Ray is imported) makes it use loopback. The local Ray also runs with usage stats off and, since
nobody else can reach it, Ray 2.60's token auth disabled (``RAY_AUTH_MODE=disabled``) unless the
environment chose otherwise.

Workers get the offline settings (``HF_HUB_OFFLINE=1``, ...) through the job's runtime_env. They
import our packages the way the driver does: from the installed (editable) package, so start the
driver from the project's environment; ``ship_code=True`` uploads our packages to a remote cluster
that does not have them installed.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from infra.settings import Settings, offline_env

LOOPBACK = "127.0.0.1"
# Seen by every Ray worker process of the job (offline, quiet, no tokenizer thread pools per worker).
WORKER_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
}
OUR_PACKAGES = ("infra", "workers", "gw", "flows")
# Prefect runs tasks in threads: two that both see no Ray would each start one (and time out starting).
_CONNECT_LOCK = threading.Lock()


def _use_loopback_only() -> None:
    """Make a local Ray bind and advertise 127.0.0.1 (must precede `import ray`; patched if it did not)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    # The flag is read once at import; if ray was imported before this call, set what it would have read.
    ray_constants.ENABLE_RAY_CLUSTER = False


def _worker_runtime_env(ship_code: bool) -> dict[str, Any]:
    env_vars = {key: os.environ.get(key, value) for key, value in WORKER_ENV.items()}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if ship_code:
        import importlib

        modules = []
        for name in OUR_PACKAGES:
            try:
                modules.append(importlib.import_module(name))
            except ImportError:
                continue  # a package not in this checkout is not needed by the job
        runtime_env["py_modules"] = modules
    return runtime_env


def describe_ray() -> dict[str, Any]:
    """What the current Ray connection is: GCS address, node address, dashboard URL, resources."""
    import ray

    context = ray.get_runtime_context()
    # The driver's node (absent for `ray://` client connections, which have no local node).
    node = getattr(ray._private.worker.global_worker, "node", None)
    return {
        "address": getattr(node, "address", None),
        "node_ip": getattr(node, "node_ip_address", None),
        "dashboard_url": getattr(node, "webui_url", None) or None,
        "namespace": context.namespace,
        "job_id": context.get_job_id(),
        "resources": {k: float(v) for k, v in ray.cluster_resources().items()
                      if k in ("CPU", "GPU", "memory", "object_store_memory")},
    }


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False,
               settings: Settings | None = None, ship_code: bool = False) -> dict[str, Any]:
    """Connect to Ray once and say what it is.

    address: a cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); defaults to
        ``FLEETMERGE_RAY_ADDRESS`` / ``settings.ray_address``; none starts a local loopback-only Ray.
    num_cpus: CPUs of a local Ray (default: all); not allowed when joining a cluster.
    dashboard: start the local Ray's dashboard (on 127.0.0.1).
    ship_code: upload our packages to the cluster's workers (for clusters without fleetmerge installed).

    Returns a dict with ``mode`` ("local", "cluster", or "existing" when Ray was already connected),
    ``address``, ``node_ip``, ``dashboard_url`` and ``resources``. Safe to call from several threads at
    once: one connects, the others find that connection.
    """
    with _CONNECT_LOCK:
        return _connect(address, num_cpus=num_cpus, dashboard=dashboard, settings=settings, ship_code=ship_code)


def _connect(address: str | None, *, num_cpus: int | None, dashboard: bool, settings: Settings | None,
             ship_code: bool) -> dict[str, Any]:
    offline_env()
    settings = settings if settings is not None else Settings.from_env()
    address = address or settings.ray_address
    if address is None:
        _use_loopback_only()
    import ray

    if ray.is_initialized():
        return {"mode": "existing", **describe_ray()}
    runtime_env = _worker_runtime_env(ship_code)
    if address:
        if num_cpus is not None:
            raise ValueError(f"ensure_ray: num_cpus={num_cpus} applies only to a local Ray, not to the cluster at "
                             f"{address!r} (its nodes declare their own resources)")
        ray.init(address=address, runtime_env=runtime_env, ignore_reinit_error=True, logging_level=logging.WARNING)
        return {"mode": "cluster", **describe_ray()}
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # address="local" always starts a new Ray here, even when RAY_ADDRESS points elsewhere.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard, dashboard_host=LOOPBACK,
             runtime_env=runtime_env, ignore_reinit_error=True, logging_level=logging.WARNING)
    return {"mode": "local", **describe_ray()}
