"""Consolidate the SemEval-2013 Beetle fleet through the product's own path, over K folds.

    .venv/bin/python bench/quality_beetle.py [--folds 3] [--data DIR] [--out NAME] [--work DIR]
    .venv/bin/python bench/quality_beetle.py --render-only   # re-render the markdown from NAME.json

Per fold (K stratified folds per item over all labelled answers, train + test_ua; fold f is the test
split, validation is carved from the rest; `--folds 1` keeps the official split, test = test_ua):

1. The fold's fleet: one MiniLM-L6 scorer per item (bench/build_beetle_fleet.py's build, cached).
2. **shipped**: `fleetmerge consolidate` as a user runs it, with no options: the Prefect flow with
   `ConsolidateConfig()`'s defaults, published to the fold's store. Its storage ratio comes from the
   published manifest, its test figures from the group records the flow wrote.
3. Plans at the GW plan's group sizes: `gw` (the flow's GW planner, recomputed with the flow's
   function; when GW is the shipped planner, checked equal to the published plan), `module` (the
   person's plan: items of one Beetle module) and `random` (seeded), plus GW at the other τ quantile (0.3
   against 1.0, the shipped one against the other) for the τ default. (The planners against each other at
   the shipped plan's sizes: bench/mergeability.py.) Ungated, each group is scored with the product's `sweep_job` and
   `choose` (both head settings); gated, with the product's `consolidate_group_job` (default gate
   "bound" and the old δ-rule). Nothing here merges, refits, selects or gates on its own.
4. On the first fold only, the three-method table (TIES, Task Arithmetic, DOGE) on the gw plan.

Every figure is a mean over folds; paired comparisons are over item x fold units (test macro F1,
weighted by test answers, bootstrap interval over units). The test split is read only for figures.
Everything is cached in each fold's store (features, GW pairs, sweeps, group records), so a rerun or an
interrupted run resumes where it stopped; `--resume-from NAME.json` takes an earlier run's rows and redoes
only the shipped run (for a new planner default; the merge and gate defaults must be the earlier ones). Writes NAME.json and NAME.md (default docs/results/beetle);
the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _frontier as frontier  # noqa: E402
from _quality_report import render_defaults, render_markdown  # noqa: E402
from _quality_stats import fleet_summary, paired_comparison, storage  # noqa: E402
from _util import reap_on_exit, same_groups  # noqa: E402
from beetle_data import DEFAULT_DATA, fold_dir, prepare  # noqa: E402

from flows.config import ConsolidateConfig  # noqa: E402
from gw.baselines import module_plan, random_plan  # noqa: E402
from infra.manifest import load_manifest  # noqa: E402
from infra.publish import read_manifest  # noqa: E402
from infra.settings import offline_env  # noqa: E402
from infra.storage import open_store  # noqa: E402
from infra.validation import validate_fleet  # noqa: E402
from workers.consolidate import HEAD_SETTINGS, GroupConsolidator, MergeConfig, choose  # noqa: E402
from workers.finetune import FinetuneConfig  # noqa: E402
from workers.fleet_build import build_fleet, load_items  # noqa: E402
from workers.fleet_gw import distance_matrix, plan_fleet  # noqa: E402
from workers.group_jobs import consolidate_group_job, own_job, sweep_job  # noqa: E402
from workers.models import default_base_dir, quiet_transformers  # noqa: E402
from workers.ray_extract import extract_fleet  # noqa: E402
from workers.ray_gw import compute_distances  # noqa: E402

METHODS = ("ties", "task_arithmetic", "doge")
GATES = ("bound", "delta")


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Fold:
    """One fold's fleet and the product's cached jobs on it."""

    def __init__(self, store, seed: int):
        self.store = store
        self.manifest = load_manifest(store)
        report = validate_fleet(store, self.manifest)
        self.ids = sorted(report.usable_ids)
        self.set_aside = report.rejected
        self.consolidator = GroupConsolidator(store, self.manifest)
        self.own = {i: own_job(store, i, consolidator=self.consolidator) for i in self.ids}
        self.seed = seed

    def items(self, merged: dict[str, dict]) -> dict[str, dict]:
        """Every item's test scores and predictions: from its merged group where it has one, else its own."""
        out = {}
        for i in self.ids:
            source = merged.get(i) or self.own[i]
            out[i] = {"test": source["test"], "predictions": source["test_predictions"],
                      "validation": source["validation"]}
        return out

    def ungated(self, groups: list[list[str]], config: MergeConfig, setting: str) -> dict:
        merged = {}
        for group in groups:
            evaluations = sweep_job(self.store, group, config, consolidator=self.consolidator)["evaluations"]
            chosen, _ = choose(evaluations, self.own, setting)
            merged.update(chosen["scores"][setting])
        return {"items": self.items(merged), "groups": groups}

    def gated(self, groups: list[list[str]], config: MergeConfig) -> dict:
        merged, accepted, decisions = {}, [], []
        for group in groups:
            record = consolidate_group_job(self.store, group, config, consolidator=self.consolidator)
            decisions.append(record["gate"])
            if record["accepted"]:
                accepted.append(record["accepted"])
                for i in record["accepted"]:
                    merged[i] = {"test": record["merged_test"][i], "test_predictions": record["merged_test_predictions"][i],
                                 "validation": record["merged_validation"][i]}
        return {"items": self.items(merged), "groups": accepted, "decisions": decisions}


def figures(fold: Fold, run: dict, *, adapter_bytes: int = 0) -> dict:
    per_item = {i: v["test"] for i, v in run["items"].items()}
    summary = fleet_summary(per_item, {i: v["predictions"] for i, v in run["items"].items()},
                            {i: fold.own[i]["test_labels"] for i in fold.ids})
    backbones = len(fold.ids) - sum(len(g) - 1 for g in run["groups"])
    return {**summary, "backbones": backbones, "storage_ratio": storage_ratio(fold, backbones, adapter_bytes),
            "per_item_macro_f1": {i: m["macro_f1"] for i, m in per_item.items()}}


def storage_ratio(fold: Fold, backbones: int, adapter_bytes: int = 0) -> float:
    """Serving bytes before (an encoder and a head per item) over after (one encoder per backbone, the
    heads and the items' correction adapters)."""
    member = fold.consolidator.member(fold.manifest.scorer(fold.ids[0]))
    size = lambda state: sum(t.numel() * t.element_size() for t in state.values())  # noqa: E731
    return storage(len(fold.ids), backbones, size(member.backbone), size(member.head), adapter_bytes)["ratio"]


def run_fold(fold_index: int, args, data_dir: Path, work: Path, methods: list[str]) -> dict:
    """Every row of the report for one fold (figures per row, per-item macro F1 for the paired tests)."""
    started = time.perf_counter()
    fold, here = open_fold(fold_index, args, data_dir, work)
    store = fold.store
    defaults = ConsolidateConfig()
    log(f"fold {fold_index}: {len(fold.ids)} scorers ready ({time.perf_counter() - started:.0f} s)")

    shipped = shipped_run(fold, fold_index)
    merge_config = defaults.merge_config()
    D, gw_ids = full_gw_matrix(fold)
    gw = plan_fleet(D, gw_ids, tau=defaults.tau, tau_quantile=defaults.tau_quantile, k=defaults.k)
    # With the GW planner shipped, the recomputed GW plan must be the published one (the rows below are then
    # the shipped plan's ablations); with another planner shipped they are the GW plan's, at its own sizes.
    same_plan = None
    if defaults.planner == "gw":
        same_plan = same_groups(gw.groups, shipped["shipped_plan"]["groups"])
        if not same_plan:
            log(f"fold {fold_index}: WARNING the recomputed GW plan differs from the published one")
    sizes = sorted((len(g) for g in gw.groups), reverse=True)
    modules = {i: fold.manifest.scorer(i).module or "?" for i in gw_ids}
    alt = alternative_tau_quantile(defaults.tau_quantile)
    plans = {"gw": [list(g) for g in gw.groups],
             f"gw_tau{alt:g}": [list(g) for g in plan_fleet(D, gw_ids, tau=None, tau_quantile=alt, k=defaults.k).groups],
             "module": [list(g) for g in module_plan(modules, sizes).groups]}
    for seed in range(args.random_seeds):
        plans[f"random{seed}"] = [list(g) for g in random_plan(gw_ids, len(sizes), defaults.k, seed=seed,
                                                               sizes=sizes).groups]

    rows: dict[str, dict] = {"premerge": figures(fold, {"items": fold.items({}), "groups": []}),
                             "shipped": shipped.pop("row")}
    compared = ["gw"] if args.methods_only else list(plans)
    for name, groups in ((n, plans[n]) for n in compared):
        log(f"fold {fold_index}: ungated {name} ({len(groups)} groups)")
        for setting in HEAD_SETTINGS:
            rows[f"ungated/{name}/{defaults.method}/{setting}"] = figures(fold, fold.ungated(groups, merge_config, setting))
    for name in ("gw",) if args.methods_only else ("gw", f"gw_tau{alt:g}", "module"):
        for gate in GATES:
            log(f"fold {fold_index}: gated {name} gate={gate}")
            config = dataclasses.replace(merge_config, gate=gate)
            run = fold.gated(plans[name], config)
            rows[f"gated/{name}/{defaults.method}/{gate}"] = figures(fold, run) | {
                "groups": run["groups"], "decisions": run["decisions"]}
    if fold_index == 0:
        for method in methods:
            if method == defaults.method:
                continue
            config = MergeConfig(method=method, grid=method_grid(method), gate=defaults.gate, delta=defaults.delta,
                                 seed=defaults.seed)
            log(f"fold 0: ungated gw with {method}")
            for setting in HEAD_SETTINGS:
                rows[f"ungated/gw/{method}/{setting}"] = figures(fold, fold.ungated(plans["gw"], config, setting))
    return {"fold": fold_index, "ids": fold.ids, "rows": rows, "plans": plans, "same_plan_as_published": same_plan,
            **shipped, "validation_sizes": {i: fold.own[i]["validation"]["n"] for i in fold.ids},
            "test_sizes": {i: fold.own[i]["test"]["n"] for i in fold.ids},
            "modules": {i: fold.manifest.scorer(i).module for i in fold.ids}, "set_aside": fold.set_aside,
            "seconds": round(time.perf_counter() - started, 1)}


def shipped_run(fold: Fold, fold_index: int) -> dict:
    """The shipped run: the flow with its defaults, exactly as `fleetmerge consolidate --store S` runs it;
    its row from the group records the flow wrote, its summary, its published plan and who planned it."""
    from flows.nightly import consolidate

    summary = consolidate(fleet="fleet.yaml", store=fold.store.uri, config={"run_id": f"bench-fold{fold_index}"})
    published = read_manifest(fold.store, summary["run_id"])
    plan = published["extra"]["plan"]
    run = fold.gated([list(g) for g in plan["groups"]], ConsolidateConfig().merge_config())  # the flow's records
    log(f"fold {fold_index}: shipped run {summary['run_id']} ({summary['seconds']['total']} s)")
    return {"row": figures(fold, run) | {"storage_ratio_published": published["extra"]["storage"]["ratio"]},
            "shipped_summary": {k: summary[k] for k in ("run_id", "groups", "individual", "storage", "seconds")},
            "shipped_planner": shipped_planner_name(plan), "shipped_plan": {"groups": [list(g) for g in plan["groups"]]}}


def shipped_planner_name(plan: dict) -> str:
    """The published plan's planner with its measured settings, e.g. "measured (gw shortlist, refit)"."""
    if plan.get("planner") != "measured":
        return plan.get("planner", "gw")
    return f"measured ({plan.get('shortlist_by', 'gw')} shortlist, {plan.get('trial_signal', 'agreement')})"


def default_planner_name() -> str:
    """The shipped planner as shipped_planner_name names a published plan's."""
    d = ConsolidateConfig()
    return shipped_planner_name({"planner": d.planner, "shortlist_by": d.shortlist_by, "trial_signal": d.trial_signal})


def resumed_fold(earlier: dict, fold_index: int, args, data_dir: Path, work: Path) -> dict:
    """An earlier run's fold with only the shipped run redone: the other rows depend on the fleet and the
    merge and gate defaults, not on the planner (checked: the rebuilt fleet's pre-merge figures must equal
    the earlier ones, and the merge and gate defaults must be unchanged)."""
    fold, _ = open_fold(fold_index, args, data_dir, work)
    premerge = figures(fold, {"items": fold.items({}), "groups": []})
    before = earlier["rows"]["premerge"]  # per-item figures when the earlier JSON kept them, else the fleet's
    key = "per_item_macro_f1" if "per_item_macro_f1" in before else "macro_f1"
    if premerge[key] != before[key] or any(premerge[k] != before[k] for k in ("accuracy", "qwk", "micro_f1")):
        raise RuntimeError(f"fold {fold_index}: the rebuilt fleet's pre-merge figures differ from the earlier run's")
    shipped = shipped_run(fold, fold_index)
    result = {**earlier, "rows": {**earlier["rows"], "premerge": premerge, "shipped": shipped.pop("row")}, **shipped,
              "resumed_rows": sorted(n for n in earlier["rows"] if n not in ("shipped", "premerge"))}
    if ConsolidateConfig().planner != "gw":
        result["same_plan_as_published"] = None
    return result


MERGE_DEFAULTS = ("layer", "pooling", "max_responses", "method", "grid", "refit_heads", "delta", "gate", "seed", "k",
                  "tau", "tau_quantile", "solver")


def open_fold(fold_index: int, args, data_dir: Path, work: Path) -> tuple[Fold, Path]:
    """One fold's fleet (built on first use, cached) and its directory."""
    here = fold_dir(work, args.folds, fold_index)
    responses, items_path = prepare(data_dir, here / "data", seed=args.seed, folds=args.folds, fold=fold_index)
    store = open_store(str(here / "fleet"))
    build_fleet(pq.read_table(responses), load_items(items_path), default_base_dir(), store,
                fleet_name=data_dir.name, config=FinetuneConfig(seed=args.seed))
    return Fold(store, args.seed), here


def full_gw_matrix(fold: Fold) -> tuple[np.ndarray, list[str]]:
    """The fold's full GW matrix with the shipped feature settings (features and pairs cached in its store
    by the flow's own jobs)."""
    extraction = extract_fleet(fold.store, [fold.manifest.scorer(i) for i in fold.ids],
                               ConsolidateConfig().extract_config(), base_model=fold.manifest.base_model)
    ids = sorted(extraction.features)
    distances = compute_distances(fold.store, {i: extraction.features[i] for i in ids})
    return distance_matrix(fold.store, distances["key"], ids), ids


def run_frontier(args, data_dir: Path, work: Path, wanted: list[int]) -> None:
    """The storage-against-quality table (bench/_frontier.py) on the requested folds, into NAME.json/.md
    beside the rows of the last full run."""
    defaults = ConsolidateConfig().merge_config()
    methods = [m for m in args.frontier_methods.split(",") if m]
    ks = [int(k) for k in args.frontier_ks.split(",") if k]
    corrections = [c == "on" for c in args.frontier_corrections.split(",") if c]
    folds, premerge, weights = [], [], {}
    for f in wanted:
        started = time.perf_counter()
        fold, here = open_fold(f, args, data_dir, work)
        D, ids = full_gw_matrix(fold)
        log(f"fold {f}: {len(fold.ids)} scorers and the GW matrix ready ({time.perf_counter() - started:.0f} s)")
        folds.append(frontier.run_fold(fold, D, ids, here, figures, methods=methods, ks=ks, corrections=corrections,
                                       defaults=defaults, log=lambda m, f=f: log(f"fold {f}: {m}")))
        premerge.append(figures(fold, {"items": fold.items({}), "groups": []}))
        weights.update({f"{len(premerge) - 1}:{i}": fold.own[i]["test"]["n"] for i in fold.ids})
        del fold  # its consolidator holds every member's encoder (~4 GB)
    out = Path(args.out)
    result = json.loads(out.with_suffix(".json").read_text())
    result["frontier"] = frontier.combine(folds, premerge, weights, paired_comparison)
    result["frontier_settings"] = {"folds_run": wanted,  # every setting cached in all of them is in the table
                                   "premerge_macro_f1": round(float(np.mean([p["macro_f1"] for p in premerge])), 4),
                                   "note": frontier.NOTE}
    write(out, result)
    pre = result["frontier_settings"]["premerge_macro_f1"]

    def most_storage(correction: bool) -> float | None:
        best = frontier.most_storage_within_margin(result["frontier"], pre, correction)
        return best["storage_ratio"] if best else None

    print(json.dumps({"frontier_rows": len(result["frontier"]), "folds": wanted, "premerge_macro_f1": pre,
                      "gated_storage_within_margin": most_storage(False),
                      "gated_storage_within_margin_corrected": most_storage(True)}))


def alternative_tau_quantile(shipped: float) -> float:
    """The τ quantile the shipped one is compared with: 0.3 (a strict plan) against 1.0 (all grouped)."""
    return 0.3 if shipped > 0.5 else 1.0


def method_grid(method: str) -> list[dict] | None:
    """DOGE's default grid is three full optimisations; one (the paper's η) keeps the table affordable."""
    return [{"eta": 0.07}] if method == "doge" else None


def method_pairs(methods: list[str], default: str) -> list[tuple[str, str]]:
    """Each other method against the shipped one (A − B with B the default), then the others pairwise."""
    others = [m for m in methods if m != default]
    return [(m, default) for m in others] + [(a, b) for a in others for b in others if a < b]


def combine(folds: list[dict]) -> dict:
    """Mean over folds of every row present in all folds, with the spread over folds."""
    names = [n for n in folds[0]["rows"] if all(n in f["rows"] for f in folds)]
    out = {}
    for name in names:
        values = [f["rows"][name] for f in folds]
        row = {k: round(float(np.mean([v[k] for v in values if v.get(k) is not None])), 4)
               for k in ("accuracy", "macro_f1", "micro_f1", "qwk", "backbones", "storage_ratio",
                         "storage_ratio_published") if any(v.get(k) is not None for v in values)}
        row["macro_f1_sd_over_folds"] = round(float(np.std([v["macro_f1"] for v in values])), 4)
        if all("per_item_macro_f1" in v for v in values):  # rows resumed from a JSON without them cannot be paired
            row["per_unit_macro_f1"] = {f"{f['fold']}:{i}": m for f, v in zip(folds, values)
                                        for i, m in v["per_item_macro_f1"].items()}
        out[name] = row
    return out


def comparisons(rows: dict, weights: dict, pairs: list[tuple[str, str]]) -> dict:
    return {f"{a} vs {b}": paired_comparison(rows[a]["per_unit_macro_f1"], rows[b]["per_unit_macro_f1"], weights)
            for a, b in pairs if "per_unit_macro_f1" in rows.get(a, {}) and "per_unit_macro_f1" in rows.get(b, {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset directory in the SemEval-2013 layout")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "beetle"),
                        help="result path without suffix: NAME.json and NAME.md are written")
    parser.add_argument("--work", default=None, help="cache (default .fleetmerge/<dataset dir name>)")
    parser.add_argument("--folds", type=int, default=3, help="K folds (1: the official split)")
    parser.add_argument("--only-folds", default="", help="run these folds only, e.g. '0' (the report needs all)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods of the first fold's method table")
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-only", action="store_true", help="re-render NAME.md and defaults.md from NAME.json")
    parser.add_argument("--frontier", action="store_true",
                        help="only the storage-against-quality table (method x k x correction, gated and ungated), "
                             "added to NAME.json beside the last full run's rows")
    parser.add_argument("--frontier-methods", default=",".join(frontier.METHODS))
    parser.add_argument("--frontier-ks", default=",".join(map(str, frontier.KS)))
    parser.add_argument("--frontier-corrections", default="off,on", help="'off', 'on' or 'off,on'")
    parser.add_argument("--resume-from", default=None,
                        help="an earlier NAME.json: its rows are this run's cache and only the shipped run is redone "
                             "(for a change of the planner defaults; refused when the merge or gate defaults changed)")
    parser.add_argument("--methods-only", action="store_true",
                        help="only the shipped run, the GW plan (gated and ungated) and the method table: a quick "
                             "look at other merge methods (cached apart from the full run's rows)")
    args = parser.parse_args()
    reap_on_exit()
    if args.render_only:
        rerender(Path(args.out))
        return
    offline_env()
    quiet_transformers()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    data_dir = Path(args.data).resolve()
    work = Path(args.work) if args.work else ROOT / ".fleetmerge" / data_dir.name.split("_")[-1]
    methods = [m for m in args.methods.split(",") if m]
    wanted = [int(f) for f in args.only_folds.split(",") if f] or list(range(args.folds))
    if args.frontier:
        run_frontier(args, data_dir, work, wanted)
        return
    started = time.perf_counter()
    folds = []
    earlier = json.loads(Path(args.resume_from).read_text()) if args.resume_from else None
    if earlier:
        changed = [k for k in MERGE_DEFAULTS if earlier["defaults"].get(k) != getattr(ConsolidateConfig(), k)]
        if changed:
            raise SystemExit(f"--resume-from {args.resume_from}: its rows were made with other defaults ({changed}); "
                             "run without it")
    for f in wanted:
        cache = fold_dir(work, args.folds, f) / ("quality_rows_methods.json" if args.methods_only else "quality_rows.json")
        cached = json.loads(cache.read_text()) if cache.is_file() else None
        if cached is not None and (args.methods_only or cached.get("shipped_planner") == default_planner_name()):
            folds.append(cached)
            continue
        # a fold cached with another planner shipped: only its shipped run is redone
        previous = cached or next((e for e in (earlier or {}).get("by_fold", []) if e["fold"] == f), None)
        folds.append(resumed_fold(previous, f, args, data_dir, work) if previous
                     else run_fold(f, args, data_dir, work, methods))
        cache.write_text(json.dumps(folds[-1]))
    rows = combine(folds)
    weights = {f"{f['fold']}:{i}": n for f in folds for i, n in f["test_sizes"].items()}
    method = ConsolidateConfig().method
    pairs = [("shipped", "premerge"), (f"ungated/gw/{method}/refit_heads", f"ungated/module/{method}/refit_heads"),
             *[(f"ungated/gw/{method}/refit_heads", f"ungated/random{s}/{method}/refit_heads")
               for s in range(args.random_seeds)],
             (f"ungated/gw/{method}/refit_heads", f"ungated/gw/{method}/own_heads"),
             (f"gated/gw/{method}/bound", f"gated/gw/{method}/delta"),
             (f"gated/gw_tau{alternative_tau_quantile(ConsolidateConfig().tau_quantile):g}/{method}/bound",
              f"gated/gw/{method}/bound"),
             (f"gated/gw/{method}/bound", f"ungated/gw/{method}/refit_heads")]
    result = {
        "dataset": data_dir.name, "folds": args.folds, "folds_run": wanted, "n_items": len(folds[0]["ids"]),
        "n_test": sum(weights.values()), "k": ConsolidateConfig().k,
        "premerge": _figures(rows["premerge"]), "shipped": _figures(rows["shipped"]),
        "gated": _figures(rows.get(f"gated/gw/{method}/bound", {})),
        "rows": {name: _figures(row) for name, row in rows.items()},
        "paired": comparisons(rows, weights, pairs),
        "first_fold_rows": {n: _figures(r) for n, r in folds[0]["rows"].items()},
        "first_fold_paired": comparisons(
            {n: r | {"per_unit_macro_f1": {f"0:{i}": m for i, m in r["per_item_macro_f1"].items()}}
             for n, r in folds[0]["rows"].items() if "per_item_macro_f1" in r},
            {f"0:{i}": n for i, n in folds[0]["test_sizes"].items()},
            [(f"ungated/gw/{a}/refit_heads", f"ungated/gw/{b}/refit_heads") for a, b in method_pairs(methods, method)]),
        "by_fold": folds,  # per-item figures included, so the report can be re-rendered and re-paired
        "defaults": {k: v for k, v in dataclasses.asdict(ConsolidateConfig()).items()
                     if k not in ("run_id", "ray_address")},
        "seconds": {"folds": [f["seconds"] for f in folds], "this_run": round(time.perf_counter() - started, 1)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    for name in ("paired", "first_fold_paired"):  # comparisons of resumed rows: the earlier run's, as it paired them
        for pair, c in (earlier or {}).get(name, {}).items():
            result[name].setdefault(pair, c)
    out = Path(args.out)
    if out.with_suffix(".json").is_file():  # the frontier (--frontier) is its own run: keep it beside the new rows
        previous_result = json.loads(out.with_suffix(".json").read_text())
        result |= {k: previous_result[k] for k in ("frontier", "frontier_settings") if k in previous_result}
    write(out, result, defaults=not args.methods_only)
    print(json.dumps({"folds": args.folds, "premerge_macro_f1": result["premerge"]["macro_f1"],
                      "shipped_macro_f1": result["shipped"]["macro_f1"],
                      "shipped_storage_ratio": result["shipped"]["storage_ratio"],
                      "seconds_total": result["seconds"]["this_run"]}))


def gate_expectation(result: dict, draws: int = 2000) -> dict:
    """What the gate's simulated operating characteristic says about this run's groups.

    members: per-member acceptance when quality does not change, at each fold's median validation size
    (a pair then passes whole with a², a trio with a³: members' validation answers are independent).
    tradeoff: the default rule at stricter confidence levels, accept@0 against reject@−0.10 at the
    first fold's median size (ρ = 0.95), to show what more storage would cost the guarantee."""
    from gw.gate import BoundRule, make_rule
    from gw.gate_sim import simulate_oc

    rule = make_rule(result["defaults"]["gate"], result["defaults"]["delta"])
    members = {}
    for fold in result["by_fold"]:
        sizes = sorted(fold["validation_sizes"].values())
        n = sizes[len(sizes) // 2]
        for rho in (0.8, 0.95):
            members[f"{fold['fold']}:{rho}"] = {"fold": fold["fold"], "n": n, "correlation": rho,
                                                "member": round(simulate_oc(rule, n, 0.0, rho, draws=draws), 3)}
    n = next(iter(members.values()))["n"]
    tradeoff = [{"confidence": level, "n": n, "correlation": 0.95,
                 "accept_at_0": round(simulate_oc(BoundRule(z=z), n, 0.0, 0.95, draws=draws), 3),
                 "reject_at_drop_0.10": round(1 - simulate_oc(BoundRule(z=z), n, -0.10, 0.95, draws=draws), 3)}
                for level, z in ((0.9, 1.2816), (0.95, 1.6449), (0.975, 1.96), (0.99, 2.3263))]
    return {"members": members, "tradeoff": tradeoff}


def write(out: Path, result: dict, *, defaults: bool = True) -> None:
    """NAME.json, NAME.md and (`defaults`) defaults.md beside them."""
    if "tradeoff" not in result.get("gate_expectation", {}):
        result["gate_expectation"] = gate_expectation(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_markdown(result))
    if defaults:
        planners = out.parent / "mergeability.json"
        (out.parent / "defaults.md").write_text(
            render_defaults(result, json.loads(planners.read_text()) if planners.is_file() else None))
    log(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}{' and defaults.md' if defaults else ''}")


def rerender(out: Path) -> None:
    """Re-render the markdown from a finished run's NAME.json (no model is run)."""
    write(out, json.loads(out.with_suffix(".json").read_text()))


def _figures(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("per_unit_macro_f1", "per_item_macro_f1")}


if __name__ == "__main__":
    main()
