"""The nightly consolidation as a Prefect flow over Ray (docs/architecture.md §1).

validate -> extract features (Ray actors) -> GW matrix (Ray tasks, cached per pair) -> plan ->
merge + gate each group (one Prefect task per group, throttled by the `fleetmerge-merge` tag's
concurrency limit; the work itself runs as a Ray task) -> publish atomically.

Prefect is the control plane: tasks pass URIs, keys and small JSON records, never tensors; artifacts
show the heatmap, the plan, the metrics and the storage figures. Every heavy result is cached in the
store under a content hash, so a rerun with nothing changed computes nothing and publishes nothing
new. The flow fails loudly when a step fails (a failed task is raised, not swallowed).
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.futures import wait

from flows import artifacts
from flows.config import ConsolidateConfig
from infra.manifest import MANIFEST_KEY
from infra.settings import Settings, offline_env

MERGE_TAG = "fleetmerge-merge"
RAY_WAIT_S = 3600.0  # Prefect's timeouts cannot interrupt a blocking ray.get: every Ray wait has its own


def new_run_id() -> str:
    """A UTC timestamp (runs sort by time) and a random tail: two runs started in one second differ."""
    return time.strftime("run-%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"


def _retry_transient(task, task_run, state) -> bool:
    """Retry what may pass on a second try (a storage hiccup, a lost Ray worker); not bad input (a broken
    manifest, a missing file, a failed validation), which fails the same way again."""
    try:
        state.result()
    except (ValueError, KeyError, FileNotFoundError):
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient
        return True
    return True


def _merge_run_name(parameters: dict) -> str:
    """The UI names a merge box by its members, so a person can tell the groups apart."""
    return "merge " + " + ".join(parameters["members"])


def _connect(cfg: ConsolidateConfig) -> None:
    """Join the configured Ray cluster up front; without one, steps start a local Ray only if they compute."""
    if cfg.ray_address:
        from infra.ray_conn import ensure_ray

        ensure_ray(cfg.ray_address)


def _store(uri: str, settings: dict | None):
    from infra.storage import open_store

    return open_store(uri, Settings(**settings) if settings else Settings.from_env(store=uri))


@task(name="validate", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def validate_task(store_uri: str, settings: dict | None, manifest_key: str) -> dict:
    from infra.manifest import load_manifest
    from infra.validation import validate_fleet

    store = _store(store_uri, settings)
    report = validate_fleet(store, load_manifest(store, manifest_key))
    logger = get_run_logger()
    logger.info(report.summary())
    return report.to_dict()


def _plan_config(store_uri: str, settings: dict | None, manifest_key: str, usable: list[str],
                 cfg: ConsolidateConfig) -> tuple[ConsolidateConfig, str | None]:
    """The config the run plans with: planning by description needs two or more described usable scorers
    (ConsolidateConfig.for_described), checked before minutes of features."""
    cfg, fallback = cfg.for_fleet(_store(store_uri, settings), usable, manifest_key)
    if fallback:
        get_run_logger().warning(f"--planner description: {fallback}")
    return cfg, fallback


@task(name="extract-features", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def extract_task(store_uri: str, settings: dict | None, manifest_key: str, usable: list[str],
                 cfg: ConsolidateConfig) -> dict:
    from infra.manifest import load_manifest
    from workers.ray_extract import extract_fleet

    _connect(cfg)
    store = _store(store_uri, settings)
    manifest = load_manifest(store, manifest_key)
    config = cfg.extract_config()
    logger = get_run_logger()
    bar = artifacts.Progress("extract-progress", "features extracted")

    def progress(scorer_id: str, status: str, done: int, total: int) -> None:
        logger.info(f"features {scorer_id}: {status} ({done}/{total})")
        bar.update(done / total)

    result = extract_fleet(store, [manifest.scorer(i) for i in usable], config, progress=progress,
                           base_model=manifest.base_model, timeout_s=RAY_WAIT_S)
    logger.info(f"features: {len(result.computed)} computed, {len(result.reused)} reused, "
                f"{len(result.errors)} failed")
    return result.to_dict()


@task(name="gw-matrix", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def distances_task(store_uri: str, settings: dict | None, features: dict, cfg: ConsolidateConfig) -> dict:
    from workers.extract import FeatureRef
    from workers.ray_gw import compute_distances

    _connect(cfg)
    store = _store(store_uri, settings)
    refs = {i: FeatureRef.from_dict(r) for i, r in features.items()}
    logger = get_run_logger()
    bar = artifacts.Progress("gw-progress", "GW pairs done")

    def progress(done: int, total: int) -> None:
        bar.update(done / max(total, 1))

    result = compute_distances(store, refs, solver=cfg.solver, progress=progress, timeout_s=RAY_WAIT_S,
                               **_skipping(cfg, len(refs)))
    logger.info(f"GW matrix: {result['computed']} pairs computed, {result['reused']} reused, "
                f"{result['skipped']} skipped by the lower bound"
                + (f", {result['not_shortlisted']} not shortlisted (gw_candidates={result['candidates']})"
                   if result["candidates"] else ""))
    return result


def _candidates(cfg: ConsolidateConfig, n_scorers: int) -> int:
    """Partners per scorer the GW step solves (0: all pairs): the setting, or by the fleet's size."""
    from gw.shortlist_size import auto_candidates

    if cfg.gw_candidates is not None:
        return cfg.gw_candidates
    return 0 if cfg.planner == "linkage" else auto_candidates(n_scorers)


def _skipping(cfg: ConsolidateConfig, n_scorers: int) -> dict:
    """How the GW step may skip pairs: by the plan's own threshold, so the plan is that of the full matrix.

    Nothing downstream needs the pairs at or above tau: the GW planner (cliques under tau) never groups
    them, and a quantile tau comes out exact (see gw.matrix). The heatmap shows a skipped pair at its
    lower bound, itself >= tau. Only the GW planner skips: average linkage reads every distance, and
    the measured planner's tau is on its own scale (its shortlist wants each scorer's nearest GW
    partners, whatever tau is). (Bootstrap stability would be fine: it recomputes full matrices on the
    resamples and reads only grouped pairs of this one.)
    """
    candidates = _candidates(cfg, n_scorers)
    if candidates:  # a shortlist: each scorer's nearest partners by the bound, tau from their values
        return {"candidates": candidates, "candidates_tau_quantile": cfg.tau_quantile}
    if not cfg.skip_by_bounds or cfg.planner != "gw":
        return {}
    return {"skip_tau": cfg.tau} if cfg.tau is not None else {"skip_tau_quantile": cfg.tau_quantile}


def _signal(store, signal: str, ids: list[str], manifest_key: str, distances: dict, cfg: ConsolidateConfig,
            consequence: str):
    """The distances of one cheap signal (workers.signals), after naming the scorers it knows nothing about."""
    from workers.fleet_gw import distance_matrix
    from workers.signals import signal_distances, unknown_note, unknown_to

    gw = distance_matrix(store, distances["key"], ids) if signal == "gw" else None
    D = signal_distances(store, signal, ids, gw=gw, extract_config=cfg.extract_config(), seed=cfg.seed,
                         manifest_key=manifest_key, timeout_s=RAY_WAIT_S)
    unknown = unknown_to(D, ids)
    if unknown:
        get_run_logger().warning(f"{unknown_note(signal, unknown)}; {consequence}")
    return D


@task(name="trial-merges", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def trial_merges_task(store_uri: str, settings: dict | None, manifest_key: str, distances: dict,
                      cfg: ConsolidateConfig) -> dict:
    """The measured planner's evidence: each scorer's shortlist of nearest partners (by GW, task-vector
    cosine, linear CKA on a probe set or description similarity), trial-merged."""
    from gw.mergeability import shortlist
    from workers.pair_jobs import measure_pairs

    _connect(cfg)
    store = _store(store_uri, settings)
    ids = distances["ids"]
    signal = _signal(store, cfg.plan_signal, ids, manifest_key, distances, cfg,
                     "they are never shortlisted and stay on their own scorers")
    pairs = shortlist(signal, ids, cfg.shortlist)
    bar = artifacts.Progress("trial-merge-progress", "trial merges done")
    result = measure_pairs(store, pairs, cfg.merge_config(), manifest_key=manifest_key,
                           progress=lambda done, total: bar.update(done / max(total, 1)), timeout_s=RAY_WAIT_S)
    get_run_logger().info(f"trial merges: {len(pairs)} pairs (shortlist {cfg.shortlist} per scorer by "
                          f"{cfg.shortlist_by}), "
                          f"{result['computed']} computed, {result['reused']} reused")
    return result


@task(name="plan", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def plan_task(store_uri: str, settings: dict | None, manifest_key: str, distances: dict, cfg: ConsolidateConfig,
              trials: dict | None = None, fallback: str | None = None) -> dict:
    """The plan, with `fallback` (why the description planner gave way, if it did) beside it."""
    from workers.fleet_gw import distance_matrix, plan_fleet
    from workers.pair_jobs import outcomes

    store = _store(store_uri, settings)
    ids = distances["ids"]
    matrix = distance_matrix(store, distances["key"], ids)
    measured = outcomes(trials, cfg.trial_signal) if trials else None
    tau = cfg.tau
    if tau is None and distances.get("candidates") and cfg.planner == "gw":
        tau = distances["tau"]  # the quantile over all pairs, not over the shortlisted ones (gw.candidates)
    packed = matrix
    if cfg.planner == "description":  # packs the descriptions' distances; the GW matrix stays the report's
        _connect(cfg)
        packed = _signal(store, cfg.plan_signal, ids, manifest_key, distances, cfg, "they stay on their own scorers")
    plan = plan_fleet(packed, ids, tau=tau, tau_quantile=cfg.tau_quantile, k=cfg.k, planner=cfg.planner,
                      measured=measured)
    logger = get_run_logger()
    split, groups_measured = {}, {}
    if measured and any(len(g) > 2 for g in plan.groups):
        # The planner scored each trio by its pairs: merge the planned trios themselves and split a weak one.
        from workers.fleet_gw import check_planned_groups
        from workers.pair_jobs import measure_pairs

        _connect(cfg)
        larger = [g for g in plan.groups if len(g) > 2]
        checked = measure_pairs(store, larger, cfg.merge_config(), manifest_key=manifest_key, timeout_s=RAY_WAIT_S)
        groups_measured = outcomes(checked, cfg.trial_signal)
        plan, split = check_planned_groups(plan, ids, measured, groups_measured)
        logger.info(f"planned groups checked by their own trial merges: {len(larger)} ({checked['computed']} "
                    f"computed), {len(split)} split into their best pair")
    logger.info(f"plan ({cfg.planner} planner, {plan.method}, tau={plan.tau:.4g}): {len(plan.groups)} "
                f"groups, {len(plan.singletons)} singletons")
    signal = {"trial_signal": cfg.trial_signal, "shortlist_by": cfg.shortlist_by} if measured else {}
    noted = {"fallback": fallback} if fallback else {}
    return {"plan": plan.to_dict() | {"planner": cfg.planner, "split": split} | signal | noted, "matrix": matrix.tolist(), "ids": ids,
            "description_matrix": packed.tolist() if cfg.planner == "description" else None,
            "measured": [[*p, v] for p, v in sorted({**(measured or {}), **groups_measured}.items())] or None,
            "group_trials": {"computed": checked["computed"], "reused": checked["reused"]} if groups_measured else None}


@task(name="group-keys", retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_transient)
def group_keys_task(store_uri: str, settings: dict | None, manifest_key: str, groups: list[list[str]],
                    cfg: ConsolidateConfig) -> list[dict]:
    """Each planned group's cache key, and whether its record is already stored."""
    from workers.group_jobs import RECORD, group_key, group_prefix

    store = _store(store_uri, settings)
    config = cfg.merge_config()
    keys = [group_key(store, members, config, manifest_key) for members in groups]
    return [{"key": key, "cached": store.exists(f"{group_prefix(key)}/{RECORD}")} for key in keys]


@task(name="merge-group", task_run_name=_merge_run_name, tags=[MERGE_TAG], retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retry_transient)
def merge_group_task(store_uri: str, settings: dict | None, manifest_key: str, members: list[str],
                     cfg: ConsolidateConfig, key: str) -> dict:
    from workers.group_jobs import cached_record, consolidate_group_job, group_prefix
    from workers.ray_jobs import run_on_ray

    store = _store(store_uri, settings)
    config = cfg.merge_config()
    record = cached_record(store, group_prefix(key))  # cached and whole: no Ray task, no model load
    if record is None:  # the flow has connected to Ray: this finds that connection
        record = run_on_ray(consolidate_group_job, store, members, config, manifest_key=manifest_key, key=key,
                            address=cfg.ray_address, timeout_s=RAY_WAIT_S)
    get_run_logger().info(f"group {'+'.join(members)}: {record['gate']['reason']}"
                          f"{' (reused)' if record['reused'] else ''}")
    return record


@task(name="keep-individual", task_run_name="keep {item} on its own scorer", retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retry_transient)
def individual_task(store_uri: str, settings: dict | None, manifest_key: str, item: str,
                    ray_address: str | None = None) -> dict:
    from workers.group_jobs import cached_kept_item, kept_item_job
    from workers.ray_jobs import run_on_ray

    store = _store(store_uri, settings)
    result = cached_kept_item(store, item, manifest_key=manifest_key)  # cached and whole: no Ray, no model
    if result is None:  # the scorer is loaded (and scored, if no group job did) on Ray, not in the driver
        result = run_on_ray(kept_item_job, store, item, manifest_key=manifest_key, address=ray_address,
                            timeout_s=RAY_WAIT_S)
    return result


@task(name="publish", retries=1, retry_delay_seconds=10, retry_condition_fn=_retry_transient)
def publish_task(store_uri: str, settings: dict | None, manifest_key: str, sources: dict[str, str],
                 run_id: str, extra: dict, token: str | None = None) -> dict:
    from infra.manifest import load_manifest
    from infra.publish import latest_run, read_manifest
    from workers.publish_fleet import publish_consolidated, weights_bytes_before

    store = _store(store_uri, settings)
    logger = get_run_logger()
    latest = latest_run(store)
    if latest is not None and read_manifest(store, latest).get("extra", {}).get("sources") == sources:
        logger.info(f"nothing changed since run {latest}: it stays the published state")
        return {**read_manifest(store, latest), "republished": False}
    manifest = load_manifest(store, manifest_key)
    items = [i for source in sources for i in extra["members"][source]]
    published = publish_consolidated(store, run_id, sources, bytes_before=weights_bytes_before(store, manifest, items),
                                     extra={**extra, "sources": sources}, token=token)
    logger.info(f"published run {run_id}: {published['extra']['storage']}")
    return {**published, "republished": True}


@flow(name="fleetmerge-consolidate", log_prints=True)
def consolidate(fleet: str = MANIFEST_KEY, store: str = ".fleetmerge/demo/fleet", config: dict | None = None,
                settings: dict | None = None) -> dict:
    """Consolidate the fleet whose manifest is `fleet` (a key) in the store at `store`; returns the run summary."""
    offline_env()
    cfg = ConsolidateConfig.from_dict(config)  # a dict for deployments; typed from here on
    started = time.perf_counter()
    run_id = cfg.run_id or new_run_id()
    token = uuid.uuid4().hex  # this run's claim on its run id; the publish task's retries pass it again
    timings: dict[str, float] = {}
    peak_rss: dict[str, float] = {}  # the driver's peak RSS by the end of each stage: which one grows it

    def timed(name: str, value=None):
        timings[name] = round(time.perf_counter() - started - sum(timings.values()), 2)
        peak_rss[name] = _peak_rss_mb()
        return value

    report = timed("validate", validate_task(store, settings, fleet))
    cfg, fallback = _plan_config(store, settings, fleet, report["usable"], cfg)
    features = timed("extract", extract_task(store, settings, fleet, report["usable"], cfg))
    usable = sorted(features["features"])
    set_aside = {**report["rejected"], **{i: [r] for i, r in features["errors"].items()}}
    if len(usable) < 2:
        raise RuntimeError(f"fewer than two scorers have features; set aside: {set_aside}")
    distances = timed("gw", distances_task(store, settings, {i: features["features"][i] for i in usable}, cfg))
    trials = timed("trial-merges", trial_merges_task(store, settings, fleet, distances, cfg)) \
        if cfg.planner == "measured" else None
    planned = timed("plan", plan_task(store, settings, fleet, distances, cfg, trials, fallback))
    plan = planned["plan"]

    groups = [list(group) for group in plan["groups"]]
    keys = group_keys_task(store, settings, fleet, groups, cfg)
    if not all(k["cached"] for k in keys):
        # Connect once, here: merge tasks run in parallel threads, and each starting its own local Ray
        # at the same moment times out. A rerun with every group cached starts no Ray.
        from infra.ray_conn import ensure_ray

        ensure_ray(cfg.ray_address)
    futures = [merge_group_task.submit(store, settings, fleet, group, cfg, k["key"]) for group, k in zip(groups, keys)]
    wait(futures)
    records = [f.result(raise_on_failure=True) for f in futures]
    timed("merge")

    sources: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    merged_items: set[str] = set()
    for n, record in enumerate(records, 1):
        if record["checkpoint"]:
            name = f"groups/g{n:03d}"
            sources[name], members[name] = record["checkpoint"], record["accepted"]
            merged_items.update(record["accepted"])
    individual = [i for i in usable if i not in merged_items]
    kept = [f.result(raise_on_failure=True)
            for f in individual_task.map(unmapped(store), unmapped(settings), unmapped(fleet), individual,
                                         unmapped(cfg.ray_address))]
    for result in kept:
        name = f"items/{result['item']}"
        sources[name], members[name] = result["checkpoint"], [result["item"]]
    timed("individual")

    extra = {"plan": plan, "gate": [r["gate"] for r in records], "members": members, "set_aside": set_aside,
             "config": {k: v for k, v in cfg.to_dict().items() if k != "run_id"}}
    published = publish_task(store, settings, fleet, sources, run_id, extra, token)
    timed("publish")

    summary = {
        "run_id": published["run_id"], "republished": published["republished"], "store": store,
        "planner": plan["planner"], **({"fallback": plan["fallback"]} if plan.get("fallback") else {}),
        "groups": [r["accepted"] for r in records if r["checkpoint"]], "individual": individual,
        "set_aside": set_aside, "storage": published["extra"]["storage"],
        "computed": {"features": len(features["computed"]), "pairs": distances["computed"],
                     **({"trial merges": _trials(trials, planned, "computed")} if trials else {}),
                     "merges": sum(not r["reused"] for r in records)},
        "reused": {"features": len(features["reused"]), "pairs": distances["reused"],
                   **({"trial merges": _trials(trials, planned, "reused")} if trials else {}),
                   "merges": sum(r["reused"] for r in records)},
        "skipped": {"pairs": distances["skipped"],
                    **({"not shortlisted": distances["not_shortlisted"]} if distances.get("candidates") else {})},
        "items": _item_table(records, kept),
        "seconds": {**timings, "total": round(time.perf_counter() - started, 2)},
        "driver_peak_rss_mb": peak_rss,
    }
    artifacts.publish_run_artifacts(summary, planned, records)
    timed("artifacts")  # after the run-summary artifact, which shows the figures up to publish
    summary["seconds"] = {**timings, "total": round(time.perf_counter() - started, 2)}
    return summary


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _trials(trials: dict, planned: dict, kind: str) -> int:
    """Trial merges computed or reused: the shortlist's pairs and the planned groups' checks."""
    return trials[kind] + ((planned.get("group_trials") or {}).get(kind) or 0)


def _item_table(records: list[dict], kept: list[dict]) -> list[dict[str, Any]]:
    """Per item: its backbone, what the gate decided, validation and test macro F1 before and after."""
    rows = []
    for record in records:
        accepted = set(record["accepted"])
        fallback = bool(accepted) and len(accepted) < len(record["members"])
        for item in record["members"]:
            before = record["baseline_test"][item]["macro_f1"]
            merged = item in accepted
            after = record.get("merged_test", {}).get(item, {}).get("macro_f1", before) if merged else before
            rank = ((record.get("correction") or {}).get(item) or {}).get("rank", 0) if merged else 0
            decision = ("merged (fallback pair)" if fallback else "merged") if merged else "kept on its own scorer (gate)"
            rows.append({"item": item, "backbone": " + ".join(record["accepted"]) if merged else "own scorer",
                         "decision": f"{decision}, correction rank {rank}" if rank else decision,
                         "val_macro_f1_before": _round(val_before := record["baseline_validation"][item]["macro_f1"]),
                         "val_macro_f1_after": _round(record["merged_validation"][item]["macro_f1"] if merged
                                                      else val_before),
                         "test_macro_f1_before": _round(before), "test_macro_f1_after": _round(after)})
    planned = {row["item"] for row in rows}
    rows += [{"item": k["item"], "backbone": "own scorer", "decision": "kept on its own scorer (not planned into a group)",
              "val_macro_f1_before": _round(k["validation_macro_f1"]),
              "val_macro_f1_after": _round(k["validation_macro_f1"]),
              "test_macro_f1_before": _round(k["test_macro_f1"]), "test_macro_f1_after": _round(k["test_macro_f1"])}
             for k in kept if k["item"] not in planned]
    return sorted(rows, key=lambda r: r["item"])


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
