"""Consolidate the SemEval-2013 Beetle fleet under every plan and merge method; compare with pre-merge.

    .venv/bin/python bench/quality_beetle.py [--data DIR] [--out NAME] [--work DIR] [--random-seeds 5]

1. Builds (or reuses) one MiniLM-L6 scorer per item (bench/build_beetle_fleet.py's fleet; validation
   carved from train, test = test_ua) and scores each on its own: the pre-merge figures.
2. Extracts features with the nightly job's settings (Ray actors) and computes the GW matrix (Ray
   tasks, cached per pair).
3. Plans, all with k = 3 and the same group sizes: `gw` (ours: `gw.plan.solve_plan`, tau at the
   `--tau-quantile` of the off-diagonal distances, 1.0 by default so that as many items as possible
   share a backbone), `linkage` (the paper's average linkage on the same matrix), `module` (the
   person's plan: items of one Beetle module grouped in item-id order; the few left over when a
   module's size is not a multiple of 3 are grouped together), `description` (average linkage on
   cosine similarity of MiniLM embeddings of the question text: the offline stand-in for the
   paper's GPT-o1 plan) and `random` (one plan per seed).
4. Merges every group with TIES, DOGE and Task Arithmetic, each with the members' own heads and with
   heads refit on the train split; merge parameters are chosen on validation only, per group, as
   the product chooses them. Ungated, to compare plans. The head setting reported per plan x method
   is the one with the better fleet validation macro F1.
5. Gated (the product as shipped): the GW plan, heads refit, gate at --delta on validation macro F1
   (a failed trio falls back to its best pair; what fails stays on its own scorer).

The test split is read only for the final figures. Writes NAME.json and NAME.md (default
docs/results/beetle); every merged group is cached as JSON under --work/quality, so a rerun or an
interrupted run resumes where it stopped. On this 2-core CPU machine, with the fleet built (building
it takes 15-35 minutes more), a cold run takes roughly 45 minutes alone and much longer next to other
jobs; the `seconds` in the JSON say what the recorded run took. The last line printed is one JSON
object.
"""
from __future__ import annotations

import argparse
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

from _group_eval import HEAD_SETTINGS, GroupEvaluator  # noqa: E402
from _quality_report import render_markdown  # noqa: E402
from _quality_stats import fleet_summary, paired_comparison, storage  # noqa: E402
from beetle_data import DEFAULT_DATA, prepare  # noqa: E402

from gw.baselines import description_plan, linkage_plan, module_plan, random_plan  # noqa: E402
from gw.gate import gate_group  # noqa: E402
from gw.plan import Plan, plan_from_groups, solve_plan  # noqa: E402
from gw.tuning import default_grid  # noqa: E402
from infra.manifest import load_manifest  # noqa: E402
from infra.settings import offline_env  # noqa: E402
from infra.storage import open_store  # noqa: E402
from infra.validation import validate_fleet  # noqa: E402
from workers.consolidate import GroupConsolidator  # noqa: E402
from workers.extract import ExtractConfig, pool  # noqa: E402
from workers.finetune import FinetuneConfig  # noqa: E402
from workers.fleet_build import build_fleet, load_items  # noqa: E402
from workers.fleet_gw import distance_matrix  # noqa: E402
from workers.models import default_base_dir, quiet_transformers  # noqa: E402
from workers.ray_extract import extract_fleet  # noqa: E402
from workers.ray_gw import compute_distances  # noqa: E402

METHODS = ("ties", "doge", "ta")
BASELINE_PLANS = ("linkage", "module", "description", "random")


def log(message: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def merge_grid(method: str, doge_steps: int) -> list[dict]:
    """Validation grids, cut down from the product's for CPU time: Task Arithmetic's full grid (4 lambdas),
    TIES at lambda 1 over its three top-k shares, DOGE at the paper's eta only (each candidate is a
    full optimisation)."""
    if method == "doge":
        return [{"eta": 0.07, "steps": doge_steps}]
    if method == "ties":
        return [{"lam": 1.0, "top_k": k} for k in (0.1, 0.2, 0.3)]
    return default_grid(method)


def question_embeddings(questions: list[str]) -> np.ndarray:
    """Mean-pooled, L2-normalised MiniLM embeddings of the question texts (the base model, offline)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    base = default_base_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    model = AutoModel.from_pretrained(str(base), local_files_only=True, use_safetensors=True).eval()
    batch = tokenizer(questions, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        pooled = pool(model(**batch).last_hidden_state, batch["attention_mask"], "mean")
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def plan_items(plan: Plan, item_results) -> dict:
    """Per-item test figures and predictions of a plan: grouped items from their group's result."""
    per_item, predictions, validation = {}, {}, {}
    for group in plan.groups:
        result = item_results(tuple(group))
        for item in group:
            per_item[item], predictions[item] = result["test"][item], result["test_predictions"][item]
            validation[item] = result["validation"][item]
    return {"test": per_item, "predictions": predictions, "validation": validation}


def with_individual(grouped: dict, individual: dict) -> tuple[dict, dict, dict]:
    """Every item's test figures, test predictions and validation figures: from its merged group where
    it has one, else from its own scorer."""
    def pick(key: str, own: str) -> dict:
        return {i: grouped[key].get(i, individual[i][own]) for i in individual}

    return pick("test", "test"), pick("predictions", "test_predictions"), pick("validation", "validation")


def summarise(plan: Plan, evaluator: GroupEvaluator, individual: dict, method: str, grid: list[dict]) -> dict:
    """Fleet figures of one plan x method for each head setting, and the setting validation picks."""
    out = {}
    labels = {i: r["test_labels"] for i, r in individual.items()}
    for setting in HEAD_SETTINGS:
        grouped = plan_items(plan, lambda g: evaluator.group(g, method, grid)["chosen"][setting])
        test, predictions, validation = with_individual(grouped, individual)
        out[setting] = {**fleet_summary(test, predictions, labels),
                        "validation_macro_f1": fleet_summary(validation)["macro_f1"],
                        "per_item_macro_f1": {i: m["macro_f1"] for i, m in test.items()}}
    chosen = max(HEAD_SETTINGS, key=lambda s: out[s]["validation_macro_f1"])
    return {**{k: v for k, v in out[chosen].items() if k != "per_item_macro_f1"}, "head_setting": chosen,
            "per_item_macro_f1": out[chosen]["per_item_macro_f1"],
            "by_setting": {s: {k: v for k, v in r.items() if k != "per_item_macro_f1"} for s, r in out.items()}}


def gated_run(plan: Plan, evaluator: GroupEvaluator, individual: dict, method: str, grid: list[dict],
              delta: float) -> dict:
    """The product's gate over the GW plan (heads refit): accepted (sub-)groups and fleet figures."""
    def refit(group):
        return evaluator.group(group, method, grid)["chosen"]["refit_heads"]

    decisions, accepted = [], []
    for group in plan.groups:
        baseline = {m: individual[m]["validation"]["macro_f1"] for m in group}
        decision = gate_group(list(group), baseline,
                              lambda sub: {m: refit(sub)["validation"][m]["macro_f1"] for m in sub}, delta=delta)
        decisions.append(decision.to_dict())
        if decision.passed:
            accepted.append(tuple(decision.accepted))
    shipped = plan_from_groups([list(g) for g in accepted], list(individual), "gw+gate")
    grouped = plan_items(shipped, refit)
    labels = {i: r["test_labels"] for i, r in individual.items()}
    test, predictions, _ = with_individual(grouped, individual)
    return {**fleet_summary(test, predictions, labels), "method": method, "head_setting": "refit_heads",
            "delta": delta, "groups": [list(g) for g in accepted], "decisions": decisions,
            "per_item_macro_f1": {i: m["macro_f1"] for i, m in test.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset directory in the SemEval-2013 layout")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "beetle"),
                        help="result path without suffix: NAME.json and NAME.md are written")
    parser.add_argument("--work", default=None, help="cache (default .fleetmerge/<dataset dir name>)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--gated-methods", default="ties,ta,doge",
                        help="methods run through the gate (the first, the product's default, is the headline)")
    parser.add_argument("--random-seeds", type=int, default=5)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--tau-quantile", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=0.02)
    parser.add_argument("--layer", type=int, default=-3, help="feature layer for GW (the nightly default: -3)")
    # DOGE's paper runs 400 Adam steps; 100 here for CPU time (on a Beetle trio the loss reached
    # 1.6e-4 against 1.1e-4 at 400, from 3.7e-3 at the start).
    parser.add_argument("--doge-steps", type=int, default=100)
    parser.add_argument("--method-random-seeds", default="",
                        help="fewer random plans for some methods, e.g. 'doge=1,ta=2' (CPU time; stated in the report)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    offline_env()
    quiet_transformers()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    methods = [m for m in args.methods.split(",") if m]
    gated_methods = [m for m in args.gated_methods.split(",") if m]
    random_seeds = {m: args.random_seeds for m in methods}
    for part in filter(None, args.method_random_seeds.split(",")):
        method, _, count = part.partition("=")
        random_seeds[method] = min(int(count), args.random_seeds)
    data_dir = Path(args.data).resolve()
    work = Path(args.work) if args.work else ROOT / ".fleetmerge" / data_dir.name.split("_")[-1]
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 1)
        clock = now
        log(f"{stage}: {seconds[stage]} s")

    # 1. The fleet and its pre-merge figures.
    responses, items_path = prepare(data_dir, work / "data", seed=args.seed)
    store = open_store(str(work / "fleet"))
    build_fleet(pq.read_table(responses), load_items(items_path), default_base_dir(), store,
                fleet_name=data_dir.name, config=FinetuneConfig(seed=args.seed))
    manifest = load_manifest(store)
    report = validate_fleet(store, manifest)
    ids = sorted(report.usable_ids)
    lap("build")
    consolidator = GroupConsolidator(store, manifest)
    evaluator = GroupEvaluator(consolidator, work / "quality", seed=args.seed)
    individual = {i: evaluator.individual(i) for i in ids}
    labels = {i: r["test_labels"] for i, r in individual.items()}
    premerge = fleet_summary({i: r["test"] for i, r in individual.items()},
                             {i: r["test_predictions"] for i, r in individual.items()}, labels)
    weights = {i: r["test"]["n"] for i, r in individual.items()}
    lap("premerge")

    # 2. Features and the GW matrix, as the nightly job computes them.
    extraction = extract_fleet(store, report.usable, ExtractConfig(layer=args.layer, max_responses=256, seed=args.seed),
                               base_model=manifest.base_model)
    if extraction.errors:
        log(f"features failed for {sorted(extraction.errors)}: those items stay individual")
    lap("extract")
    gw_ids = sorted(extraction.features)
    distances = compute_distances(store, {i: extraction.features[i] for i in gw_ids})
    D = distance_matrix(store, distances["key"], gw_ids)
    lap("gw")

    # 3. Plans of equal group sizes.
    meta = {json.loads(line)["item_id"]: json.loads(line) for line in items_path.read_text().splitlines() if line}
    gw = solve_plan(D, gw_ids, tau_quantile=args.tau_quantile, k=args.k)
    sizes = sorted((len(g) for g in gw.groups), reverse=True)
    plans: dict[str, list[Plan]] = {
        "gw": [gw],
        "linkage": [linkage_plan(D, gw_ids, gw.n_groups, k=args.k, fill=True)],
        "module": [module_plan({i: meta[i].get("module") or "?" for i in gw_ids}, sizes)],
        "description": [description_plan(question_embeddings([meta[i].get("question") or i for i in gw_ids]),
                                         gw_ids, gw.n_groups, k=args.k, fill=True)],
        "random": [random_plan(gw_ids, gw.n_groups, args.k, seed=s, sizes=sizes) for s in range(args.random_seeds)],
    }
    lap("plans")

    # 4. Ungated: every plan x method (groups cached, so shared groups are merged once).
    ungated: dict[str, dict] = {}
    for method in methods:
        grid = merge_grid(method, args.doge_steps)
        for name, variants in plans.items():
            if name == "random":
                variants = variants[:random_seeds[method]]
            runs = []
            for n, plan in enumerate(variants):
                log(f"ungated {method} / {name}{'' if len(variants) == 1 else f' seed {n}'}: {plan.n_groups} groups")
                runs.append(summarise(plan, evaluator, individual, method, grid))
            ungated.setdefault(name, {})[method] = average_runs(runs) if name == "random" else runs[0]
    lap("merge_ungated")

    # 5. Gated: the GW plan through the product's gate.
    backbone_bytes, head_bytes = member_bytes(consolidator, ids[0])
    gated_by_method = {}
    for method in gated_methods:
        run = gated_run(gw, evaluator, individual, method, merge_grid(method, args.doge_steps), args.delta)
        n_backbones = len(ids) - sum(len(g) - 1 for g in run["groups"])
        run["storage"] = storage(len(ids), n_backbones, backbone_bytes, head_bytes)
        run["storage_ratio"] = run["storage"]["ratio"]
        gated_by_method[method] = run
    lap("merge_gated")

    comparisons = {method: {name: paired_comparison(ungated["gw"][method]["per_item_macro_f1"],
                                                    ungated[name][method]["per_item_macro_f1"], weights)
                            for name in BASELINE_PLANS} for method in methods}
    seconds["total"] = round(time.perf_counter() - started, 1)
    cold = {m: {"groups": sum(k[0] == m for k in evaluator.compute_seconds),
                "merge": round(sum(v["merge"] for k, v in evaluator.compute_seconds.items() if k[0] == m), 1),
                "total": round(sum(v["total"] for k, v in evaluator.compute_seconds.items() if k[0] == m), 1)}
            for m in methods}
    result = {
        "dataset": data_dir.name, "n_items": len(ids), "n_test": sum(weights.values()), "k": args.k,
        "premerge": premerge,
        "gated": gated_by_method[gated_methods[0]] if gated_methods else None,
        "gated_by_method": gated_by_method,
        "ungated": ungated,
        "paired_gw_vs_baseline": comparisons,
        "plans": {name: [p.to_dict() for p in variants] for name, variants in plans.items()},
        "storage_ungated": storage(len(ids), len(ids) - sum(len(g) - 1 for g in gw.groups), backbone_bytes, head_bytes),
        "distances": {"ids": gw_ids, "matrix": np.round(D, 6).tolist(), "computed": distances["computed"],
                      "reused": distances["reused"]},
        "per_item_premerge": {i: r["test"] for i, r in individual.items()},
        "validation_sizes": {i: r["validation"]["n"] for i, r in individual.items()},
        "item_modules": {i: meta[i].get("module") for i in ids},
        "settings": {"methods": methods, "gated_methods": gated_methods, "random_seeds": args.random_seeds,
                     "tau_quantile": args.tau_quantile, "delta": args.delta, "doge_steps": args.doge_steps,
                     "random_seeds_by_method": random_seeds,
                     "grids": {m: merge_grid(m, args.doge_steps) for m in methods}, "seed": args.seed,
                     "extract": {"layer": args.layer, "pooling": "cls", "max_responses": 256}},
        "seconds": seconds,
        "group_compute_seconds": cold,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {consolidator.device}",
        "set_aside": report.rejected | dict(extraction.errors),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(render_markdown(result))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    headline = {"premerge_macro_f1": premerge["macro_f1"],
                "gated_macro_f1": result["gated"]["macro_f1"] if result["gated"] else None,
                "gated_storage_ratio": result["gated"]["storage_ratio"] if result["gated"] else None,
                **{f"ungated_{p}_{m}_macro_f1": ungated[p][m]["macro_f1"] for p in ungated for m in ungated[p]},
                "seconds_total": seconds["total"]}
    print(json.dumps(headline))


def average_runs(runs: list[dict]) -> dict:
    """Mean over seeds of the fleet figures; per-item figures averaged too (for the paired comparison)."""
    keys = ("accuracy", "macro_f1", "micro_f1", "qwk", "validation_macro_f1")
    mean = {k: round(float(np.mean([r[k] for r in runs if r.get(k) is not None])), 4) for k in keys}
    per_item = {i: float(np.mean([r["per_item_macro_f1"][i] for r in runs])) for i in runs[0]["per_item_macro_f1"]}
    return {**mean, "std_macro_f1": round(float(np.std([r["macro_f1"] for r in runs])), 4),
            "head_setting": "per seed: " + ", ".join(r["head_setting"] for r in runs),
            "per_seed": [{k: r[k] for k in (*keys, "head_setting")} for r in runs], "per_item_macro_f1": per_item}


def member_bytes(consolidator: GroupConsolidator, item: str) -> tuple[int, int]:
    """Bytes of one encoder and one head (all items share the architecture)."""
    member = consolidator.member(consolidator.manifest.scorer(item))
    size = lambda state: sum(t.numel() * t.element_size() for t in state.values())  # noqa: E731
    return size(member.backbone), size(member.head)


if __name__ == "__main__":
    main()
