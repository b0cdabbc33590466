"""`fleetmerge distances` and `fleetmerge plan`: the GW half of the nightly run, on its own."""
from __future__ import annotations

import json

from flows.config import ConsolidateConfig
from gw.mergeability import shortlist
from infra.manifest import load_manifest
from infra.ray_conn import ensure_ray
from infra.storage import Store
from infra.validation import validate_fleet
from workers.fleet_gw import bootstrap_matrices, distance_matrix, plan_fleet
from workers.pair_jobs import measure_pairs, outcomes
from workers.ray_extract import extract_fleet
from workers.ray_gw import compute_distances
from workers.signals import signal_distances, unknown_note, unknown_to


def distances_and_plan(store: Store, manifest_key: str, cfg: ConsolidateConfig, *, plan: bool, bootstrap: int = 0,
                       min_stability: float = 0.0) -> dict:
    """The full GW matrix of the fleet (the run's features, so the flow reuses them), and its plan if asked."""
    manifest = load_manifest(store, manifest_key)
    report = validate_fleet(store, manifest)
    if report.rejected:
        print(report.summary())
    if plan:
        cfg, fallback = cfg.for_fleet(store, report.usable, manifest_key)
        if fallback:
            print(f"--planner description: {fallback}")
    ensure_ray(cfg.ray_address)
    features = extract_fleet(store, report.usable, cfg.extract_config(), base_model=manifest.base_model)
    for item, reason in features.errors.items():
        print(f"set aside {item}: {reason}")
    result = compute_distances(store, features.features, solver=cfg.solver)
    ids = result["ids"]
    matrix = distance_matrix(store, result["key"], ids)
    print(f"GW matrix ({cfg.solver}): {result['computed']} pairs computed, {result['reused']} reused -> "
          f"{store.uri_for(result['key'])}")
    width = max(len(i) for i in ids)
    print(" " * (width + 2) + " ".join(f"{n:>7}" for n in range(len(ids))))
    for n, (item, row) in enumerate(zip(ids, matrix)):
        print(f"{item:<{width}} {n:>1} " + " ".join(f"{v:7.3g}" for v in row))
    out = {"distances": result}
    if plan:
        resampled = bootstrap_matrices(store, features.features, bootstrap, solver=cfg.solver) if bootstrap else []
        measured, packed = None, matrix
        if cfg.planner in ("measured", "description"):
            packed = signal_distances(store, cfg.plan_signal, ids, gw=matrix, extract_config=cfg.extract_config(),
                                      seed=cfg.seed, manifest_key=manifest_key)
            unknown = unknown_to(packed, ids)
            if unknown:
                print(f"{unknown_note(cfg.plan_signal, unknown)}; they stay on their own scorers")
        if cfg.planner == "measured":
            trials = measure_pairs(store, shortlist(packed, ids, cfg.shortlist), cfg.merge_config(),
                                   manifest_key=manifest_key)
            measured = outcomes(trials, cfg.trial_signal)
            print(f"trial merges: {len(measured)} pairs ({trials['computed']} computed, {trials['reused']} reused)")
        chosen = plan_fleet(packed, ids, tau=cfg.tau, tau_quantile=cfg.tau_quantile, k=cfg.k, planner=cfg.planner,
                            measured=measured, resampled=resampled, min_stability=min_stability)
        stability = dict(chosen.stability or {})
        print(f"\nplan ({cfg.planner} planner, {chosen.method}, tau={chosen.tau:.4g}, k={cfg.k}):")
        for group in chosen.groups:
            share = f"  stability {stability[group]:.2f}" if group in stability else ""
            print(f"  {' + '.join(group)}{share}")
        print(f"  singletons: {', '.join(chosen.singletons) or 'none'}")
        store.write_json("gw/plan.json", chosen.to_dict())
        print(f"plan written to {store.uri_for('gw/plan.json')}")
        out["plan"] = chosen.to_dict()
    print(json.dumps({k: v for k, v in out.get("distances", {}).items() if k != "ids"}))
    return out
