"""What predicts mergeability on Beetle, and which planner's plan is best (issue 11), over K folds.

    .venv/bin/python bench/mergeability.py [--folds 3] [--all-pairs-folds 0] [--predictor-plans]
    .venv/bin/python bench/mergeability.py --render-only   # re-render the markdown from the JSON

Per fold (the folds and cached fleets of bench/quality_beetle.py):

1. **The product's measured planning, cold**: `fleetmerge consolidate --planner measured` as a user runs
   it (the Prefect flow, otherwise the shipped defaults). Its stage seconds (features, GW matrix, trial
   merges, plan) are the planning cost; its published plan is the measured planner's.
2. **Every pair's measured outcome** (folds in `--all-pairs-folds`, after every fold's plans): the product's trial merge
   (`workers.pair_jobs.measure_pairs`, cached, so the shortlist's pairs are reused) for all N(N−1)/2
   pairs, and the Spearman correlation with it of each cheap predictor: GW at layers −3 and −1 with CLS
   pooling and at −3 with mean pooling, GW on the base model's features of the same responses,
   task-vector cosine, linear CKA on a shared probe set (256 training answers drawn over all items),
   description similarity (base MiniLM mean-pooled embeddings of the item questions), same module.
   Each correlation carries a 95 % interval from resampling items (a pair is kept when both of its items
   are drawn), since pairs sharing an item are not independent.
3. **Plans**, each scored with the product's gated consolidation (`consolidate_group_job`, shipped
   defaults): the product's planners (measured at each of MEASURED_SETTINGS; gw, linkage and the
   description planner, PLANNER_PLANS) at their own group sizes, and at the shipped plan's group sizes
   the module plan (a person's), the description plan (the GPT-o1 stand-in: groups by question
   similarity), `--random-seeds` random plans and (`--predictor-plans`, or by name in `--plans`) a plan
   from each other predictor. The default is chosen by nested cross-validation (`choose_default`: each
   fold's plan is picked on the other folds); every reported figure is *test* macro F1, paired over item ×
   fold, and each plan also stands against the random partitions themselves
   (`_quality_stats.against_random_partitions`).

Cached in each fold's store and directory, so an interrupted run resumes; writes
docs/results/mergeability.{json,md}; the last line printed is one JSON object. Cold on 2 cores (fleets
built), each fold takes about 12 min of planning and about 3 min per gated plan (about 2 h for the
default plans), and fold 0's trial merges of all pairs about 1.7 h more; a rerun with the caches takes
seconds. Each gated plan writes about 1.4 GB of group checkpoints per fold: removing those of plans
that are not shipped keeps their records.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
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

from _quality_stats import against_random_partitions, fleet_summary, paired_comparison  # noqa: E402
from _util import reap_on_exit, same_groups, same_sizes  # noqa: E402
from beetle_data import DEFAULT_DATA, fold_dir, prepare  # noqa: E402
from quality_beetle import Fold, figures  # noqa: E402

from flows.config import PLANNERS, ConsolidateConfig  # noqa: E402
from gw.baselines import module_plan, random_plan, sized_plan  # noqa: E402
from gw.mergeability import TRIAL_SIGNALS, shortlist  # noqa: E402
from gw.similarity import cka_matrix, cosine_similarity_matrix, task_vector_cosine  # noqa: E402
from infra.publish import read_manifest  # noqa: E402
from infra.settings import offline_env  # noqa: E402
from infra.storage import open_store  # noqa: E402
from workers.descriptions import description_distances  # noqa: E402
from workers.extract import ExtractConfig  # noqa: E402
from workers.extract.encoder import extract_features  # noqa: E402
from workers.extract.run import load_spec_scorer  # noqa: E402
from workers.finetune import FinetuneConfig  # noqa: E402
from workers.fleet_build import build_fleet, load_items  # noqa: E402
from workers.fleet_gw import distance_matrix, plan_fleet  # noqa: E402
from workers.models import default_base_dir, quiet_transformers  # noqa: E402
from workers.pair_jobs import measure_pairs, outcomes  # noqa: E402
from workers.ray_extract import extract_fleet  # noqa: E402
from workers.ray_gw import compute_distances  # noqa: E402

# Cheap predictors, each a similarity (larger = expected to merge better).
GW_VARIANTS = {"gw_l-3_cls": (-3, "cls"), "gw_l-1_cls": (-1, "cls"), "gw_l-3_mean": (-3, "mean")}
PREDICTORS = (*GW_VARIANTS, "gw_base_l-3_cls", "task_vector_cosine", "cka_probe", "description", "same_module")
PROBE_SIZE = 256
PLANNING_VERSION = 2  # 2: the planned trios are checked by their own trial merges
# The measured planner's settings that are product options (`--shortlist-by`, `--trial-signal`): "measured"
# is GW shortlist and agreement; each other combination is planned by the flow itself with those settings.
MEASURED_SETTINGS = {
    "measured": {"shortlist_by": "gw", "trial_signal": "agreement"},
    "measured/cka": {"shortlist_by": "cka", "trial_signal": "agreement"},  # run first: its planning is the cold one
    "measured/cka/true_label": {"shortlist_by": "cka", "trial_signal": "true_label"},
    "measured/true_label": {"shortlist_by": "gw", "trial_signal": "true_label"},
    "measured/refit": {"shortlist_by": "gw", "trial_signal": "refit"},
    "measured/description/refit": {"shortlist_by": "description", "trial_signal": "refit"},
}


# The other planners by their plan names here ("description" is the comparator plan at equal group sizes, so
# the description planner's plan is "planner/description"); each is planned by the product's plan_fleet.
PLANNER_PLANS = {"gw": "gw", "linkage": "linkage", "planner/description": "description"}
assert set(PLANNER_PLANS.values()) == set(PLANNERS) - {"measured"}, "a planner of flows.config has no plan here"


def shipped_plan() -> str:
    """The plan name of what `fleetmerge consolidate` does with no options."""
    d = ConsolidateConfig()
    if d.planner != "measured":
        return next(n for n, p in PLANNER_PLANS.items() if p == d.planner)
    return next(n for n, v in MEASURED_SETTINGS.items()
                if v == {"shortlist_by": d.shortlist_by, "trial_signal": d.trial_signal})


def product_plans(names) -> list[str]:
    """The plans a user can get from `fleetmerge consolidate` (the default is chosen among them)."""
    return [n for n in names if n in PLANNER_PLANS or n in MEASURED_SETTINGS]


def log(message: str) -> None:
    print(f"[mergeability {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Predictors
# ----------------------------------------------------------------------------------------------------


def gw_similarity(store, fold: Fold, config: ExtractConfig, *, base: bool = False) -> np.ndarray:
    """−GW over the fleet's features at `config` (with `base`, the base model's features of the same
    responses)."""
    specs = [fold.manifest.scorer(i) for i in fold.ids]
    prefix = "features"
    if base:
        specs = [s.model_copy(update={"checkpoint": fold.manifest.base_model}) for s in specs]
        prefix = "features-base"
    extraction = extract_fleet(store, specs, config, base_model=fold.manifest.base_model, prefix=prefix)
    if extraction.errors:
        raise RuntimeError(f"features failed: {extraction.errors}")
    result = compute_distances(store, extraction.features)
    D = distance_matrix(store, result["key"], result["ids"])
    assert result["ids"] == fold.ids
    return -D


def task_vector_similarity(fold: Fold) -> np.ndarray:
    base = fold.consolidator.base_state
    deltas = []
    for i in fold.ids:
        backbone = fold.consolidator.member(fold.manifest.scorer(i)).backbone
        deltas.append({k: backbone[k].float() - base[k].float() for k in base
                       if k in backbone and base[k].is_floating_point()})
    return task_vector_cosine(deltas)


def probe_texts(responses_path: Path, seed: int) -> list[str]:
    table = pq.read_table(responses_path, columns=["text", "split"]).to_pylist()
    train = [r["text"] for r in table if r["split"] == "train"]
    rng = np.random.default_rng(seed)
    return [train[n] for n in sorted(rng.choice(len(train), size=min(PROBE_SIZE, len(train)), replace=False))]


def cka_similarity(store, fold: Fold, texts: list[str]) -> np.ndarray:
    config = ConsolidateConfig().extract_config()  # the flow's layer and pooling
    features = {}
    for i in fold.ids:
        scorer = load_spec_scorer(store, fold.manifest.scorer(i), "cpu", base_model=fold.manifest.base_model)
        features[i] = extract_features(scorer, texts, config)
    return cka_matrix(features)


def description_similarity(store, fold: Fold) -> np.ndarray:
    return 1.0 - description_distances(store, fold.ids, use_ray=False)  # the `--shortlist-by description` signal


def description_distance(similarity: np.ndarray) -> np.ndarray:
    """description_similarity's matrix as workers.descriptions gave it (0 diagonal, NaN where unknown)."""
    D = 1.0 - similarity
    np.fill_diagonal(D, 0.0)
    return D


def predictors(store, fold: Fold, here: Path, responses: Path, seed: int,
               names: tuple[str, ...] = PREDICTORS) -> tuple[dict[str, np.ndarray], dict]:
    """The named predictors' similarity matrices (rows in fold.ids order) and the seconds each took
    cold, cached in the fold directory (one file per predictor, so a run that needs more adds them)."""
    out, seconds = {}, {}
    for name in names:
        cache = here / "predictors" / f"{name}.npz"
        if cache.is_file():
            with np.load(cache) as stored:
                out[name], seconds[name] = stored["similarity"], float(stored["seconds"])
            continue
        started = time.perf_counter()
        out[name] = compute_predictor(name, store, fold, responses, seed)
        seconds[name] = round(time.perf_counter() - started, 1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, similarity=out[name], seconds=seconds[name])
        log(f"  {name}: {seconds[name]:.0f} s")
    return out, seconds


def compute_predictor(name: str, store, fold: Fold, responses: Path, seed: int) -> np.ndarray:
    if name in GW_VARIANTS:
        layer, pooling = GW_VARIANTS[name]
        return gw_similarity(store, fold, dataclasses.replace(ConsolidateConfig().extract_config(), layer=layer,
                                                              pooling=pooling))
    if name == "gw_base_l-3_cls":
        return gw_similarity(store, fold, ConsolidateConfig().extract_config(), base=True)
    if name == "task_vector_cosine":
        return task_vector_similarity(fold)
    if name == "cka_probe":
        return cka_similarity(store, fold, probe_texts(responses, seed))
    if name == "description":
        return description_similarity(store, fold)
    if name == "description_tfidf":  # the same questions by their words alone: does the grouping, not MiniLM, help?
        from sklearn.feature_extraction.text import TfidfVectorizer

        texts = [fold.manifest.scorer(i).description or "" for i in fold.ids]
        return cosine_similarity_matrix(TfidfVectorizer().fit_transform(texts).toarray())
    if name == "same_module":
        modules = [fold.manifest.scorer(i).module or i for i in fold.ids]
        return np.array([[float(a == b) for b in modules] for a in modules])
    raise ValueError(f"unknown predictor {name!r}")


# ----------------------------------------------------------------------------------------------------
# Correlation with the measured outcome
# ----------------------------------------------------------------------------------------------------


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def correlations(similarity: dict[str, np.ndarray], measured: dict[tuple[str, str], float], ids: list[str],
                 draws: int = 300, seed: int = 0) -> dict:
    """Spearman of each predictor with the outcome over all pairs, with a 95 % interval over items."""
    index = {i: n for n, i in enumerate(ids)}
    pairs = sorted(measured)
    y = np.array([measured[p] for p in pairs])
    rows = np.array([index[a] for a, _ in pairs]), np.array([index[b] for _, b in pairs])
    rng = np.random.default_rng(seed)
    out = {}
    for name, S in similarity.items():
        x = S[rows]
        boot = []
        for _ in range(draws):
            drawn = np.bincount(rng.integers(0, len(ids), size=len(ids)), minlength=len(ids))
            # a pair is drawn (drawn[a] * drawn[b]) times: repeat it that often
            weight = drawn[rows[0]] * drawn[rows[1]]
            keep = np.repeat(np.arange(len(pairs)), weight)
            if len(keep) > 2 and np.ptp(x[keep]) > 0:
                boot.append(spearman(x[keep], y[keep]))
        low, high = np.percentile(boot, [2.5, 97.5])
        out[name] = {"spearman": round(spearman(x, y), 3), "ci95": [round(float(low), 3), round(float(high), 3)],
                     "n_pairs": len(pairs)}
    return out


# ----------------------------------------------------------------------------------------------------
# One fold
# ----------------------------------------------------------------------------------------------------


def as_distance(similarity: np.ndarray) -> np.ndarray:
    """A similarity as a distance for the planners: its largest value minus it (>= 0; GW's −D is D again)."""
    D = np.nanmax(similarity) - similarity
    np.fill_diagonal(D, 0.0)
    return D


def validation_figures(run: dict) -> dict:
    """A gated run's validation macro F1, for the fleet and per item (the default is chosen on these)."""
    return {"validation_macro_f1": fleet_summary({i: v["validation"] for i, v in run["items"].items()})["macro_f1"],
            "validation_per_item_macro_f1": {i: v["validation"]["macro_f1"] for i, v in run["items"].items()}}


def measured_variant(store, fold_index: int, name: str) -> dict:
    """The flow's plan with the measured planner at one of MEASURED_SETTINGS (its published plan and seconds)."""
    from flows.nightly import consolidate

    settings = MEASURED_SETTINGS[name]
    summary = consolidate(fleet="fleet.yaml", store=store.uri, config={
        "planner": "measured", **settings,
        "run_id": f"mergeability-fold{fold_index}-{name.replace('/', '-')}-v{PLANNING_VERSION}"})
    plan = read_manifest(store, summary["run_id"])["extra"]["plan"]
    return {"groups": [list(g) for g in plan["groups"]], "seconds": summary["seconds"],
            "computed": summary["computed"], "reused": summary["reused"], "settings": settings}


# What the planning stages fill in a fold's store (features, GW pairs, trial merges, CKA probes, own-scorer
# evidence) and the earlier runs' publications; a cold-planning copy has none of them.
PLANNING_CACHES = ("features", "gw", "candidates/pairs", "candidates/probe", "candidates/sketches",
                   "candidates/own", "published")


def cold_planning(here: Path, fold_index: int, expected: list[list[str]]) -> dict:
    """The shipped defaults' planning timed cold, alone on the machine: the flow on a copy of the fold's
    fleet (hard links, so no bytes are copied) without PLANNING_CACHES. The group merges stay cached:
    they come after the plan and are not planning. The plan must be the one the cached run published."""
    import shutil
    import subprocess

    from flows.nightly import consolidate

    copy = here / "cold_planning"
    shutil.rmtree(copy, ignore_errors=True)
    subprocess.run(["cp", "-al", str(here / "fleet"), str(copy)], check=True)
    for cache in PLANNING_CACHES:
        shutil.rmtree(copy / cache, ignore_errors=True)
    try:
        summary = consolidate(fleet="fleet.yaml", store=str(copy), config={"run_id": f"cold-planning-fold{fold_index}"})
        plan = read_manifest(open_store(str(copy)), summary["run_id"])["extra"]["plan"]
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    seconds = summary["seconds"]
    same = same_groups(plan["groups"], expected)
    log(f"fold {fold_index}: cold planning {planning_total(seconds)} s; same plan as the cached run: {same}")
    return {"planning_seconds": planning_total(seconds), "flow_seconds": seconds,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "same_plan": same,
            "computed": summary["computed"], "plan": shipped_plan()}


def default_planning_seconds(folds: list[dict]) -> dict | None:
    """The shipped default's cold planning seconds per fold and their max (None until every fold has them)."""
    timed = [f.get("default_planning") for f in folds]
    if any(t is None or t["plan"] != shipped_plan() for t in timed):
        return None
    by_fold = [t["planning_seconds"] for t in timed]
    return {"plan": shipped_plan(), "by_fold": by_fold, "max": max(by_fold)}


def planning_total(seconds: dict) -> float:
    """Planning cost: the flow's stages up to the plan (validation, features, GW, trial merges, plan)."""
    return round(sum(seconds.get(k, 0.0) for k in ("validate", "extract", "gw", "trial-merges", "plan")), 1)


def at_equal_sizes(name: str) -> bool:
    """Whether a plan is drawn at the shipped plan's group sizes (the comparisons at equal group sizes)."""
    return name in ("module", "description") or name.startswith(("random", "sized/"))


def complete(name: str, cached: dict) -> bool:
    """Whether a cached fold has this plan's row as this version needs it: a measured setting's row (one
    the tie rule can choose) with per-item validation figures, which older rows lack; a plan at equal group
    sizes drawn at the sizes of the plan shipped now (an older run drew them at another default's)."""
    row = cached["rows"].get(name)
    if row is None or (name in MEASURED_SETTINGS and "validation_per_item_macro_f1" not in row):
        return False
    if not at_equal_sizes(name):
        return True
    drawn_at = cached.get("sized_to", "measured")  # a plan shipped before: its sizes may still be the shipped plan's
    plans = cached.get("plans", {})
    return drawn_at == shipped_plan() or (drawn_at in plans and shipped_plan() in plans and
                                          same_sizes(plans[drawn_at], plans[shipped_plan()]))


def wanted_plans(args) -> list[str]:
    """The plans a run gates, in order (`--plans`: only those)."""
    return args.plans or list(dict.fromkeys([
        "measured", *PLANNER_PLANS, *MEASURED_SETTINGS, "module", "description",
        *(f"random{s}" for s in range(args.random_seeds)),
        *((f"sized/{n}" for n in PREDICTORS if n not in ("description", "same_module")) if args.predictor_plans else ())]))


def run_fold(fold_index: int, args, data_dir: Path, work: Path, cached: dict | None = None) -> dict:
    """One fold's plans and their gated figures; with `cached` (an earlier result of this fold), only the
    plans it lacks are computed and added to it."""
    started = time.perf_counter()
    here = fold_dir(work, args.folds, fold_index)
    responses, items_path = prepare(data_dir, here / "data", seed=args.seed, folds=args.folds, fold=fold_index)
    store = open_store(str(here / "fleet"))
    build_fleet(pq.read_table(responses), load_items(items_path), default_base_dir(), store,
                fleet_name=data_dir.name, config=FinetuneConfig(seed=args.seed))
    fold = Fold(store, args.seed)
    defaults = ConsolidateConfig()
    merge_config = defaults.merge_config()
    log(f"fold {fold_index}: {len(fold.ids)} scorers ready")

    # 1. The product's measured planning, as a user runs it (cold the first time; its seconds are kept).
    from flows.nightly import consolidate

    planning_cache = here / "mergeability_planning.json"
    previous = json.loads(planning_cache.read_text()) if planning_cache.is_file() else None
    if cached:  # the measured plan and its planning cost are the cached run's
        planning = {"plan": {"groups": cached["plans"]["measured"]}, "seconds": cached["flow_seconds"],
                    "computed": {"features": int(cached.get("planning_cold", True))}}
    elif previous and previous.get("version") == PLANNING_VERSION:
        planning = previous
    else:
        summary = consolidate(fleet="fleet.yaml", store=store.uri, config={
            "planner": "measured", **MEASURED_SETTINGS["measured"],
            "run_id": f"mergeability-fold{fold_index}-v{PLANNING_VERSION}"})
        published = read_manifest(store, summary["run_id"])
        seconds = summary["seconds"]
        if previous:  # an earlier version's run computed (cold) what this one reused: keep each stage's cold time
            seconds = {k: max(v, previous["seconds"].get(k, 0.0)) for k, v in seconds.items()}
        planning = {"run_id": summary["run_id"], "seconds": seconds, "plan": published["extra"]["plan"],
                    "computed": summary["computed"], "reused": summary["reused"], "version": PLANNING_VERSION}
        planning_cache.write_text(json.dumps(planning))
    seconds = planning["seconds"]
    planning_seconds = planning_total(seconds)
    log(f"fold {fold_index}: measured planning {planning_seconds} s ({planning['computed']})")

    # 2. The plans' predictors (all of them with --predictor-plans).
    wanted = [n for n in wanted_plans(args) if not (cached and complete(n, cached))]
    names = PREDICTORS if args.predictor_plans else ("gw_l-3_cls", "description")
    similarity, predictor_seconds = {}, dict(cached["predictor_seconds"]) if cached else {}

    def similarity_of(name: str) -> np.ndarray:  # computed (or read from the fold's cache) when first needed
        if name not in similarity:
            computed, took = predictors(store, fold, here, responses, args.seed, (name,))
            similarity.update(computed)
            predictor_seconds.update(took)
        return similarity[name]

    if cached:
        result = {k: v for k, v in cached.items() if k not in ("plans", "rows", "seconds")}
    else:
        for name in names:
            similarity_of(name)
        short = shortlist(-similarity_of("gw_l-3_cls"), fold.ids, defaults.shortlist)
        trials = measure_pairs(store, short, merge_config)  # the flow's, cached
        result = {"fold": fold_index, "ids": fold.ids, "planning_seconds": planning_seconds,
                  "planning_cold": planning["computed"]["features"] > 0,
                  "flow_seconds": seconds, "shortlist_pairs": len(short),
                  "shortlist_merge_seconds": trials["merge_seconds"]}

    # 3. Plans, gated with the shipped defaults.
    measured = [list(g) for g in planning["plan"]["groups"]]
    variants = dict(cached.get("measured_variants", {})) if cached else {}

    def shipped_sizes() -> list[int]:  # the plans compared at equal group sizes take the shipped plan's
        if shipped_plan() not in plans:
            plans[shipped_plan()] = plan_of(shipped_plan())
        return sorted((len(g) for g in plans[shipped_plan()]), reverse=True)

    def plan_of(name: str) -> list[list[str]]:
        if name == "measured":
            return measured
        if name in MEASURED_SETTINGS:
            variants[name] = measured_variant(store, fold_index, name)
            log(f"fold {fold_index}: {name} planned by the flow ({variants[name]['computed']})")
            return variants[name]["groups"]
        if name in PLANNER_PLANS:
            planner = PLANNER_PLANS[name]  # the flow's distances: GW, or the descriptions' (workers.signals)
            D = (description_distance(similarity_of("description")) if planner == "description"
                 else -similarity_of("gw_l-3_cls"))
            return [list(g) for g in plan_fleet(D, fold.ids, tau=defaults.tau, tau_quantile=defaults.tau_quantile,
                                                k=defaults.k, planner=planner).groups]
        sizes = shipped_sizes()
        if name == "module":
            return [list(g) for g in module_plan({i: fold.manifest.scorer(i).module or "?" for i in fold.ids},
                                                 sizes).groups]
        if name.startswith("random"):
            return [list(g) for g in random_plan(fold.ids, len(sizes), defaults.k, seed=int(name[6:]),
                                                 sizes=sizes).groups]
        predictor = name.removeprefix("sized/")
        return [list(g) for g in sized_plan(as_distance(similarity_of(predictor)), fold.ids, sizes).groups]

    plans = dict(cached["plans"]) if cached else {}
    rows = dict(cached["rows"]) if cached else {}
    for name in wanted:
        if name not in plans or at_equal_sizes(name):  # a cached plan whose row lacks figures is gated
            plans[name] = plan_of(name)                   # again (cached jobs), not replanned
        groups = plans[name]
        log(f"fold {fold_index}: gated plan {name} ({len(groups)} groups)")
        run = fold.gated(groups, merge_config)
        rows[name] = figures(fold, run) | validation_figures(run) | {
            "planned_backbones": len(fold.ids) - sum(len(g) - 1 for g in groups)}
    own = {"items": fold.items({}), "groups": []}
    premerge = figures(fold, own) | validation_figures(own)
    if cached and premerge["per_item_macro_f1"] != cached["rows"]["premerge"]["per_item_macro_f1"]:
        raise RuntimeError(f"fold {fold_index}: the rebuilt fleet's pre-merge figures differ from the cached "
                           "run's; its plans cannot be compared with the new ones (remove the cached rows)")
    rows["premerge"] = premerge
    result |= {"plans": plans, "rows": rows, "sized_to": shipped_plan(),
               "test_sizes": {i: fold.own[i]["test"]["n"] for i in fold.ids},
               "validation_sizes": {i: fold.own[i]["validation"]["n"] for i in fold.ids},
               "predictor_seconds": predictor_seconds, "measured_variants": variants,
               "seconds": round(time.perf_counter() - started + (cached or {}).get("seconds", 0.0), 1)}
    return result


def all_pairs_fold(fold_index: int, args, data_dir: Path, work: Path) -> dict:
    """Every pair's measured outcome on one fold (built and planned by run_fold first) and each
    predictor's correlation with it; run after every fold's plans, since it is the longest step."""
    here = fold_dir(work, args.folds, fold_index)
    responses = here / "data" / "responses.parquet"
    store = open_store(str(here / "fleet"))
    fold = Fold(store, args.seed)
    merge_config = ConsolidateConfig().merge_config()
    similarity, predictor_seconds = predictors(store, fold, here, responses, args.seed)
    short = set(shortlist(-similarity["gw_l-3_cls"], fold.ids, ConsolidateConfig().shortlist))
    # Every pair in a seeded random order, one batch at a time until the budget is spent: a prefix of a
    # random order is a uniform sample, so the correlations stay unbiased when the budget cuts it short.
    every = list(itertools.combinations(fold.ids, 2))
    order = [every[n] for n in np.random.default_rng(args.seed).permutation(len(every))]
    started, records, merge_seconds = time.perf_counter(), [], 0.0
    for start in range(0, len(order), 48):
        if time.perf_counter() - started > args.pairs_seconds:
            break
        batch = measure_pairs(store, order[start:start + 48], merge_config)
        records += batch["pairs"]
        merge_seconds += batch["merge_seconds"]
    # every trial signal is in every record: the predictors are correlated with each, the shipped one first
    by_signal = {s: outcomes({"pairs": records}, s) for s in TRIAL_SIGNALS}
    shipped = ConsolidateConfig().trial_signal
    measured_all = by_signal[shipped]
    measured_pairs = sorted(measured_all)
    column = {s: np.array([by_signal[s][p] for p in measured_pairs]) for s in TRIAL_SIGNALS}
    by_signal_correlation = {s: correlations(similarity, o, fold.ids) for s, o in by_signal.items()}
    result = {"predictor_seconds": predictor_seconds, "all_pairs_merge_seconds": round(merge_seconds, 1),
              "pairs_total": len(every), "trial_signal": shipped, "correlation": by_signal_correlation[shipped],
              "correlation_by_signal": by_signal_correlation,
              "signal_agreement": {f"{a} ~ {b}": round(spearman(column[a], column[b]), 3)
                                   for a, b in itertools.combinations(TRIAL_SIGNALS, 2)},
              "outcomes": [[a, b, {s: round(by_signal[s][(a, b)], 5) for s in TRIAL_SIGNALS}]
                           for a, b in measured_pairs]}
    if len(measured_all) == len(every):  # how often a scorer's best measured partner is on its shortlist
        result["shortlist_finds_best_partner"] = {}
        for s, values in by_signal.items():
            best = {i: max((v, p) for p, v in values.items() if i in p)[1] for i in fold.ids}
            result["shortlist_finds_best_partner"][s] = round(float(np.mean([best[i] in short for i in fold.ids])), 3)
    log(f"fold {fold_index}: correlations {({k: v['spearman'] for k, v in result['correlation'].items()})}")
    return result


# ----------------------------------------------------------------------------------------------------
# Across folds
# ----------------------------------------------------------------------------------------------------


def combine(folds: list[dict], random_seeds: int) -> dict:
    names = [n for n in folds[0]["rows"] if all(n in f["rows"] for f in folds)]
    units = {n: {f"{f['fold']}:{i}": m for f in folds for i, m in f["rows"][n]["per_item_macro_f1"].items()}
             for n in names}
    randoms = [f"random{s}" for s in range(random_seeds) if f"random{s}" in names]
    units["random"] = {u: float(np.mean([units[r][u] for r in randoms])) for u in units[randoms[0]]}
    weights = {f"{f['fold']}:{i}": n for f in folds for i, n in f["test_sizes"].items()}
    plans = {}
    for name in names:
        values = [f["rows"][name] for f in folds]
        plans[name] = {k: round(float(np.mean([v[k] for v in values])), 4)
                       for k in ("macro_f1", "validation_macro_f1", "accuracy", "qwk", "backbones",
                                 "planned_backbones", "storage_ratio") if all(v.get(k) is not None for v in values)}
        plans[name]["macro_f1_by_fold"] = [v["macro_f1"] for v in values]
    plans["random"] = {k: round(float(np.mean([plans[r][k] for r in randoms])), 4)
                       for k in ("macro_f1", "validation_macro_f1", "backbones", "planned_backbones", "storage_ratio")}
    planners = product_plans(plans)
    choice = choose_default(plans, folds, planners)
    default = choice["planner"]
    plans["default"], units["default"] = nested_default(plans, units, folds, choice)
    compare = [("default", other) for other in ("random", "module", "description", *planners, "premerge")
               if other != default and other in plans]
    # each measured setting against the first measured planner's (GW shortlist, agreement): one option's effect
    compare += [(name, "measured") for name in planners if name in MEASURED_SETTINGS and name != "measured"]
    # does any grouping beat chance: the plans at equal group sizes against the random ones
    compare += [(name, "random") for name in ("module", "description", *(n for n in names if n.startswith("sized/")))
                if name in plans]
    compare += [(name, "random") for name in planners if name != default and name not in MEASURED_SETTINGS]
    paired = {f"{a} vs {b}": paired_comparison(units[a], units[b], weights) for a, b in compare}
    # ... and against each random partition (its mean over the folds; one seed draws one partition of the 47)
    partitions = {name: against_random_partitions(plans[name]["macro_f1"], [plans[r]["macro_f1"] for r in randoms])
                  for name in ("default", *planners, "module", "description", *(n for n in names if n.startswith("sized/")))
                  if name in plans and name != default and len(randoms) > 1}
    return {"plans": plans, "default_planner": default, "default_choice": choice, "shipped_plan": shipped_plan(),
            "product_plans": planners, "paired": paired, "n_units": len(weights),
            "against_random_partitions": partitions}


# The rule that picks the default among the product's plans (session 5; it replaced a validation rule whose
# validation, about 12 answers per item, told no two product planners apart and so decided by a declared tie
# preference): a nested cross-validated choice. For each fold k, the product planner with the best mean test
# macro F1 over the *other* folds is fold k's pick, and fold k's figure of its pick is what the rule scores on
# fold k: no fold's answers choose the plan they score (the other folds' fleets were trained on answers that
# include fold k's, which the choice reads only through their scores on other answers). The default is the
# rule's pick over all folds (what it picks for a new fold); the "default" row and its comparisons are the
# nested figures. With one fold there is nothing to nest: the best validation mean.
def choose_default(plans: dict, folds: list[dict], planners: list[str]) -> dict:
    validation = {p: plans[p]["validation_macro_f1"] for p in planners}
    if len(folds) < 2:
        leader = max(planners, key=lambda p: (validation[p], p == shipped_plan()))
        return {"planner": leader, "picks": [leader], "rule": "best mean validation macro F1 (one fold: nothing to nest)",
                "validation": validation}

    def best(on: list[int]) -> str:
        return max(planners, key=lambda p: (np.mean([plans[p]["macro_f1_by_fold"][j] for j in on]), p == shipped_plan()))

    everywhere = list(range(len(folds)))
    picks = [best([j for j in everywhere if j != k]) for k in everywhere]
    return {"planner": best(everywhere), "picks": picks, "validation": validation,
            "others_mean": [{p: round(float(np.mean([plans[p]["macro_f1_by_fold"][j] for j in everywhere if j != k])), 4)
                             for p in planners} for k in everywhere],
            "rule": "nested cross-validation: each fold's plan is the product planner with the best mean test macro "
                    "F1 on the other folds; the default is the planner with the best mean over all folds"}


def nested_default(plans: dict, units: dict, folds: list[dict], choice: dict) -> tuple[dict, dict]:
    """The "default" row and its per-unit figures: each fold's figures from the plan picked without it."""
    picks = dict(zip((f["fold"] for f in folds), choice["picks"]))
    by_fold = [plans[picks[f["fold"]]]["macro_f1_by_fold"][n] for n, f in enumerate(folds)]
    row = {**plans[choice["planner"]], "planner": choice["planner"], "macro_f1_by_fold": by_fold,
           "macro_f1": round(float(np.mean(by_fold)), 4)}
    return row, {u: units[picks[int(u.split(":")[0])]][u] for u in units[choice["planner"]]}


PAIR_FIELDS = ("predictor_seconds", "all_pairs_merge_seconds", "pairs_total", "trial_signal", "correlation",
               "correlation_by_signal", "signal_agreement", "outcomes", "shortlist_finds_best_partner")
# 2: every trial signal's outcome and correlations (PAIR_VERSION 3 records); an older cache is measured again
PAIRS_CACHE = "mergeability_pairs_v2.json"


def resumed(earlier: dict | None, work: Path, args) -> dict | None:
    """An earlier result's fold as this run's cache: its rows, and its every-pair outcomes as the pairs cache."""
    if earlier is None:
        return None
    pairs = fold_dir(work, args.folds, earlier["fold"]) / PAIRS_CACHE
    if "correlation_by_signal" in earlier and not pairs.is_file():
        pairs.parent.mkdir(parents=True, exist_ok=True)
        pairs.write_text(json.dumps({k: earlier[k] for k in PAIR_FIELDS if k in earlier}))
    rows = {k: v for k, v in earlier.items() if k not in PAIR_FIELDS or k == "predictor_seconds"}
    if "correlation" in earlier:  # the predictors' seconds were the pairs cache's; the rows kept their own
        rows["predictor_seconds"] = {k: v for k, v in earlier["predictor_seconds"].items()
                                     if k in ("gw_l-3_cls", "description")}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "mergeability"))
    parser.add_argument("--work", default=None, help="cache (default .fleetmerge/<dataset dir name>)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--only-folds", default="")
    parser.add_argument("--all-pairs-folds", default="0", help="folds where every pair is trial-merged")
    parser.add_argument("--pairs-seconds", type=float, default=float("inf"),
                        help="stop trial-merging all pairs after this long (a uniform random sample of them)")
    parser.add_argument("--random-seeds", type=int, default=12,
                        help="random plans per fold (seed s draws the same partition in every fold where the sizes agree)")
    parser.add_argument("--plans", default="", help="gate only these plans (comma-separated names; default all)")
    parser.add_argument("--predictor-plans", action="store_true", help="also a plan from every other predictor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--cold-planning", action="store_true",
                        help="time the shipped defaults' planning again, cold, on a copy of each fold's fleet without "
                             "its planning caches (run it alone: it is the planning-cost figure)")
    parser.add_argument("--resume-from", default=None,
                        help="an earlier result JSON: a fold without a cache starts from that run's rows (and every "
                             "pair's outcomes), checked against the rebuilt fleet, and adds only the plans it lacks")
    args = parser.parse_args()
    reap_on_exit()
    out = Path(args.out)
    from _mergeability_report import render

    if args.render_only:
        out.with_suffix(".md").write_text(render(json.loads(out.with_suffix(".json").read_text())))
        return
    offline_env()
    quiet_transformers()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.all_pairs = {int(f) for f in args.all_pairs_folds.split(",") if f}
    args.plans = [p for p in args.plans.split(",") if p]
    data_dir = Path(args.data).resolve()
    work = Path(args.work) if args.work else ROOT / ".fleetmerge" / data_dir.name.split("_")[-1]
    wanted = [int(f) for f in args.only_folds.split(",") if f] or list(range(args.folds))
    started = time.perf_counter()
    earlier = {f["fold"]: f for f in json.loads(Path(args.resume_from).read_text())["by_fold"]} if args.resume_from else {}
    folds = []
    def rows_cache(f: int) -> Path:
        return fold_dir(work, args.folds, f) / f"mergeability_rows{'_predictors' if args.predictor_plans else ''}.json"

    for f in wanted:
        cache = rows_cache(f)
        cached = json.loads(cache.read_text()) if cache.is_file() else resumed(earlier.get(f), work, args)
        if cached is not None and all(complete(n, cached) for n in wanted_plans(args)):
            folds.append(cached)
            continue
        folds.append(run_fold(f, args, data_dir, work, cached))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(folds[-1]))
    for fold in folds if args.cold_planning else ():
        if fold.get("default_planning", {}).get("plan") != shipped_plan():  # timed again for a new default
            fold["default_planning"] = cold_planning(fold_dir(work, args.folds, fold["fold"]), fold["fold"],
                                                     fold["plans"][shipped_plan()])
            rows_cache(fold["fold"]).write_text(json.dumps(fold))
    for fold in folds:  # every pair, last: the plans across folds come first
        if fold["fold"] in args.all_pairs:
            cache = fold_dir(work, args.folds, fold["fold"]) / PAIRS_CACHE
            if not cache.is_file():
                cache.write_text(json.dumps(all_pairs_fold(fold["fold"], args, data_dir, work)))
            pairs = json.loads(cache.read_text())
            fold |= pairs | {"predictor_seconds": fold["predictor_seconds"] | pairs["predictor_seconds"]}
            shipped = ConsolidateConfig().trial_signal  # the headline correlations are with what the planner reads
            if shipped in fold.get("correlation_by_signal", {}):
                fold |= {"trial_signal": shipped, "correlation": fold["correlation_by_signal"][shipped]}
    for fold in folds:  # rows cached before the flag: the fold's planning record says whether it was cold
        record = fold_dir(work, args.folds, fold["fold"]) / "mergeability_planning.json"
        if "planning_cold" not in fold and record.is_file():
            fold["planning_cold"] = json.loads(record.read_text())["computed"]["features"] > 0
    cold = [f["planning_seconds"] for f in folds if f.get("planning_cold", True)]
    combined = combine(folds, args.random_seeds)
    correlation = {}
    for f in folds:
        for name, c in f.get("correlation", {}).items():
            correlation.setdefault(name, c | {"fold": f["fold"]})
    result = {
        "dataset": data_dir.name, "folds": args.folds, "folds_run": wanted, "n_items": len(folds[0]["ids"]),
        "shortlist": ConsolidateConfig().shortlist, "correlation": correlation, **combined,
        "default_minus_random": combined["paired"]["default vs random"],
        # The shipped default's planning, timed cold (--cold-planning), when every fold has it
        "planning_seconds": default_planning_seconds(folds),
        # The measured planner's. A fold whose planning reused cached features (a resumed run) is not a cold
        # figure: left out of max.
        "measured_planning_seconds": {"by_fold": [f["planning_seconds"] for f in folds], "max": max(cold, default=None),
                                      "warm_folds": [f["fold"] for f in folds if not f.get("planning_cold", True)]},
        "by_fold": folds, "defaults": {k: v for k, v in dataclasses.asdict(ConsolidateConfig()).items()
                                       if k not in ("run_id", "ray_address")},
        "seconds": {"folds": [f["seconds"] for f in folds], "this_run": round(time.perf_counter() - started, 1)},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(result))
    beetle = out.parent / "beetle.json"
    if beetle.is_file():  # the planner row of defaults.md reads this result
        from _quality_report import render_defaults

        (out.parent / "defaults.md").write_text(render_defaults(json.loads(beetle.read_text()), result))
    log(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}{' and defaults.md' if beetle.is_file() else ''}")
    print(json.dumps({"default_planner": result["default_planner"],
                      "default_macro_f1": result["plans"]["default"]["macro_f1"],
                      "random_macro_f1": result["plans"]["random"]["macro_f1"],
                      "default_minus_random_ci95": result["default_minus_random"]["ci95"],
                      "planning_seconds_max": (result["planning_seconds"] or {}).get("max"),
                      "seconds_total": result["seconds"]["this_run"]}))


if __name__ == "__main__":
    main()
