"""docs/results/mergeability.md from bench/mergeability.py's result (pure formatting)."""
from __future__ import annotations

from _util import same_groups, same_sizes
from flows.artifacts import TRIAL_COLUMN as SIGNAL_NAMES  # the plan artifact's name for each trial signal

PREDICTOR_NAMES = {
    "gw_l-3_cls": "GW, layer −3, CLS (the flow's features)",
    "gw_l-1_cls": "GW, layer −1, CLS",
    "gw_l-3_mean": "GW, layer −3, mean pooling",
    "gw_base_l-3_cls": "GW on the base model's features",
    "task_vector_cosine": "task-vector cosine",
    "cka_probe": "linear CKA on a shared probe set",
    "description": "description similarity",
    "description_tfidf": "description TF-IDF (the questions' words, no model)",
    "same_module": "same module",
}


# The product's plans as the tables name them: the measured planner's settings (bench/mergeability.py
# MEASURED_SETTINGS), then the description planner (PLANNER_PLANS).
PLAN_NAMES = {
    "measured": "measured (GW shortlist, agreement)",
    "measured/true_label": "measured (GW shortlist, true-label change)",
    "measured/cka": "measured (CKA shortlist, agreement)",
    "measured/cka/true_label": "measured (CKA shortlist, true-label change)",
    "measured/refit": "measured (GW shortlist, refit true-label change)",
    "measured/description/refit": "measured (description shortlist, refit true-label change)",
    "planner/description": "description planner (set packing on description distances)",
}


def _plan_label(name: str) -> str:
    """A plan as the tables name it: a measured setting by its options, a predictor's plan by the predictor."""
    if name.startswith("sized/"):
        return f"{PREDICTOR_NAMES.get(name[6:], name[6:])} (grouped at the default's sizes)"
    return PLAN_NAMES.get(name, name)


def _ci(c: dict) -> str:
    return f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"


def _told(c: dict) -> str:
    low, high = c["ci95"]
    return "better" if low > 0 else "worse" if high < 0 else "not told apart"


def _random_shortlist_recall(result: dict) -> float:
    """How often a random shortlist of the same size holds a scorer's best partner: m of its N − 1 partners."""
    return min(1.0, result["shortlist"] / (result["n_items"] - 1))


def correlation_section(result: dict, corr: dict) -> list[str]:
    """The predictors' Spearman with the measured outcome, one column per trial signal."""
    folds = result["by_fold"]
    fold0 = next(f for f in folds if f.get("correlation"))
    n = next(iter(corr.values()))["n_pairs"]
    total = fold0.get("pairs_total", n)
    over = f"all {n} pairs" if n == total else f"{n} of the {total} pairs (a uniform random sample: time ran out)"
    shipped = fold0.get("trial_signal", "agreement")
    by_signal = fold0.get("correlation_by_signal") or {shipped: corr}
    by_signal = {s: by_signal[s] for s in sorted(by_signal, key=lambda s: s != shipped)}  # the shipped one first
    seconds = fold0.get("predictor_seconds", {})
    lines = ["## What predicts the measured outcome", "",
             f"Spearman correlation over {over} of fold {fold0['fold']} (similarities, so positive = predicts "
             "mergeability) with the outcome by each trial signal, 95 % interval from resampling items "
             f"(the shipped signal, {SIGNAL_NAMES.get(shipped, shipped)}, first):", "",
             "| predictor | " + " | ".join(SIGNAL_NAMES.get(s, s) for s in by_signal) + " | seconds (cold, this fleet) |",
             "|---|" + "---|" * len(by_signal) + "---|"]
    for name, c in sorted(corr.items(), key=lambda kv: -kv[1]["spearman"]):
        cells = " | ".join(f"{by_signal[s][name]['spearman']:+.3f} {_ci(by_signal[s][name])}" for s in by_signal)
        lines.append(f"| {PREDICTOR_NAMES.get(name, name)} | {cells} | {seconds.get(name, 0):.0f} |")
    agreement = fold0.get("signal_agreement")
    if agreement:
        lines += ["", "How the signals rank the same pairs (Spearman between them): "
                  + "; ".join(f"{k.replace('_', '-')} {v:+.3f}" for k, v in agreement.items()) + "."]
    found = fold0.get("shortlist_finds_best_partner")
    if isinstance(found, (int, float)):
        found = {shipped: found}
    lines += ["", f"Trial-merging {n} pairs took {fold0['all_pairs_merge_seconds']:.0f} s of merge time; "
              f"the shortlist ({result['shortlist']} GW-nearest partners per scorer, {fold0['shortlist_pairs']} "
              f"pairs) {fold0['shortlist_merge_seconds']:.0f} s."
              + (" The shortlist holds each scorer's best measured partner for "
                 + ", ".join(f"{100 * v:.0f} % of the scorers by {SIGNAL_NAMES.get(s, s)}" for s, v in found.items())
                 + " (a random shortlist of the same size: "
                 f"{100 * _random_shortlist_recall(result):.0f} %)." if found else ""), ""]
    return lines


def _sizes(groups: list[list[str]]) -> str:
    trios, pairs = sum(len(g) == 3 for g in groups), sum(len(g) == 2 for g in groups)
    larger = sum(len(g) > 3 for g in groups)
    def n(count: int, what: str) -> str:
        return f"{count} {what}{'' if count == 1 else 's'}"

    return f"{n(trios, 'trio')}, {n(pairs, 'pair')}" + (f", {n(larger, 'larger group')}" if larger else "")


def _equal_sizes_note(folds: list[dict], default: str) -> str:
    """Which group sizes the plans at equal sizes were drawn at: the default's, or per fold how they differ."""
    elsewhere, differ = [], []
    for f in folds:
        drawn_at = f.get("sized_to", "measured")
        here, there = f["plans"].get(default), f["plans"].get(drawn_at)
        if drawn_at == default or here is None or there is None:
            continue
        if same_sizes(here, there):
            elsewhere.append(f"fold {f['fold']} at {_plan_label(drawn_at)}'s, the same sizes")
        else:
            differ.append(f"fold {f['fold']}: {_sizes(there)} against the default's {_sizes(here)}")
    note = "The plans at equal group sizes (module, description, random, each predictor's) take the default's plan's sizes"
    if differ:
        return f"{note} except where drawn at another plan's ({'; '.join(differ)})."
    return note + (f" ({'; '.join(elsewhere)})." if elsewhere else ".")


def default_choice_section(result: dict) -> list[str]:
    """How the default was chosen: each fold's pick on the other folds (bench/mergeability.choose_default)."""
    choice = result.get("default_choice")
    if not choice or "others_mean" not in choice:
        return []
    plans, folds = result["plans"], result["by_fold"]
    lines = ["", f"**Choosing the default**: {choice['rule']}. No fold's answers choose the plan they score; the "
             "default row above and every comparison of the default below are these nested figures. This rule "
             "replaced one that chose on validation (whose 12 or so answers per item told no two product planners "
             "apart, so a tie preference fixed in advance, the measured planner, decided) after every plan's test "
             "figures were known, and the description planner was added after the description plan's were: the "
             "nesting keeps each fold's answers out of its own choice, not out of the choice of rule and "
             "candidates, so the default wants confirming on data not yet seen (another dataset, or a district's "
             "own fleet).", "",
             "| fold | picked on the other folds | its mean there | runner-up there | the pick's test macro F1 on this fold |",
             "|---|---|---|---|---|"]
    for n, (fold, pick, means) in enumerate(zip(folds, choice["picks"], choice["others_mean"])):
        runner = max((p for p in means if p != pick), key=means.get)
        lines.append(f"| {fold['fold']} | {_plan_label(pick)} | {means[pick]:.3f} | {_plan_label(runner)} "
                     f"{means[runner]:.3f} | {plans[pick]['macro_f1_by_fold'][n]:.3f} |")
    stable = len(set(choice["picks"])) == 1
    lines += ["", f"So the default is **{_plan_label(choice['planner'])}**"
              + (", the pick on every fold." if stable else
                 f"; the picks differ across folds ({', '.join(map(_plan_label, choice['picks']))}), so the choice is not stable.")
              + " On validation (about 12 answers per item) the product planners score "
              + ", ".join(f"{_plan_label(p)} {v:.3f}" for p, v in choice["validation"].items())
              + ": too few answers to tell them apart (the rule before this one chose on validation and fell back "
                "on a declared tie preference)."]
    return lines


def partition_section(result: dict) -> list[str]:
    """Each plan against the random partitions themselves (bench/_quality_stats.against_random_partitions)."""
    partitions = result.get("against_random_partitions") or {}
    if not partitions:
        return []
    first = next(iter(partitions.values()))
    lines = ["", "### Against random partitions", "",
             "The paired intervals compare a plan with the random plans' *mean* on these answers; one partition "
             "can be lucky. Each random seed draws one partition of the items (the same in every fold), so here "
             f"each plan's test macro F1 (mean over folds) stands against the {first['n_random']} random "
             f"partitions' (mean {first['random_mean']:.3f}, sd {first['random_sd']:.4f}): how many reach it, and "
             "how far above them it lies (t, one-sided p from Student's t: a prediction interval for one more "
             "random partition).", "",
             "| plan | test macro F1 | random partitions reaching it | empirical p | t | p (t) |", "|---|---|---|---|---|---|"]
    for name, c in partitions.items():
        label = f"default ({_plan_label(result['default_planner'])})" if name == "default" else _plan_label(name)
        lines.append(f"| {label} | {c['plan']:.3f} | {c['random_reaching']} of {c['n_random']} | {c['empirical_p']:.3f} | "
                     f"{c['t']:+.2f} | {c['t_p']:.3f} |")
    return lines


def render(result: dict) -> str:
    plans, paired, default = result["plans"], result["paired"], result["default_planner"]
    folds = result["by_fold"]
    lines = ["# Which scorers should share a backbone (Beetle)", "",
             f"Generated by `bench/mergeability.py` ({result['folds']} folds, {result['n_items']} items; folds run: "
             f"{result['folds_run']}); do not edit by hand. A pair's **measured outcome** is the product's trial "
             "merge (`workers.pair_jobs`: the shipped method at its default parameters, own heads) scored by its "
             "worse member's signal against its own scorer on the item's train and validation answers "
             "(`gw.mergeability`): **agreement** (probability overlap with the own scorer, no labels) or the "
             "**true-label change** (the class-balanced change of the probability given to the true labels, the "
             "gate's statistic) or the **refit true-label change** (that change between heads refitted, "
             "cross-fitted, on the merged backbone and on the member's own).", ""]
    corr = result.get("correlation") or {}
    if corr:
        lines += correlation_section(result, corr)
    lines += ["## Plans", "",
              "Each plan consolidated with the shipped defaults (gated); test macro F1 and storage are means over "
              "folds; the default planner is chosen among the product's planners by nested cross-validation (below). "
              + _equal_sizes_note(folds, default), "",
              "| plan | test macro F1 | validation macro F1 | backbones planned | backbones after the gate | storage |",
              "|---|---|---|---|---|---|"]
    order = ["default", *PLAN_NAMES, "gw", "linkage", "module", "description", "random",
             *sorted(n for n in plans if n.startswith("random") and n != "random"),
             *sorted(n for n in plans if n.startswith("sized/")), "premerge"]
    for name in order:
        if name not in plans:
            continue
        p = plans[name]
        label = f"default ({p['planner']})" if name == "default" else _plan_label(name)
        planned = f"{p['planned_backbones']:.1f}" if "planned_backbones" in p else "–"
        lines.append(f"| {label} | {p['macro_f1']:.3f} | {p.get('validation_macro_f1', float('nan')):.3f} | {planned} | "
                     f"{p.get('backbones', float('nan')):.1f} | {p.get('storage_ratio', float('nan')):.2f}x |")
    lines += default_choice_section(result)
    lines += ["", "Paired over item × fold (test macro F1, A − B, 95 % bootstrap interval; `random` is the mean of the "
              "random plans):", "", "| comparison | mean | 95 % interval | wins / losses / ties | verdict |",
              "|---|---|---|---|---|"]
    for name, c in paired.items():
        lines.append(f"| {name} | {c['mean_diff']:+.4f} | {_ci(c)} | {c['wins']} / {c['losses']} / {c['ties']} | "
                     f"{_told(c)} |")
    lines += partition_section(result)
    lines += ["", "## Planning cost", ""]
    shipped = result.get("planning_seconds")
    if shipped:
        lines += [f"The shipped default's planning ({_plan_label(shipped['plan'])}; `fleetmerge consolidate` with no "
                  "options, timed alone on a copy of each fold's fleet without its planning caches: validation, "
                  "features, GW matrix, description distances, plan), seconds:", "",
                  "| fold | features | GW matrix | plan | total planning | the same plan as the benchmark's |",
                  "|---|---|---|---|---|---|"]
        for f in folds:
            t = f["default_planning"]
            s = t["flow_seconds"]
            lines.append(f"| {f['fold']} | {s.get('extract', 0):.0f} | {s.get('gw', 0):.0f} | {s.get('plan', 0):.0f} | "
                         f"{t['planning_seconds']:.0f} | {'yes' if t['same_plan'] else 'NO'} |")
        lines.append("")
    lines += ["The product's measured planning (`fleetmerge consolidate --planner measured`, cold: features, GW "
              "matrix, trial merges of the shortlist, plan) per fold, seconds on this machine "
              f"({result['machine']}):", "", "| fold | features | GW matrix | trial merges | total planning |",
              "|---|---|---|---|---|"]
    for f in folds:
        s = f["flow_seconds"]
        warm = "" if f.get("planning_cold", True) else " (warm: a resumed run reused its features; not a cold figure)"
        rerun = f.get("planning_rerun")
        if rerun:  # bench/mergeability.py --cold-planning: the shipped defaults' flow on a copy without its caches
            warm = (f" ({PLAN_NAMES.get(rerun.get('plan', 'measured'), rerun.get('plan'))}, the shipped default then, "
                    f"timed alone {rerun['date']} on a copy of the fleet without its planning caches; "
                    f"{'the same plan' if rerun['same_plan'] else 'a DIFFERENT plan'} as the benchmark's run)")
        lines.append(f"| {f['fold']} | {s.get('extract', 0):.0f} | {s.get('gw', 0):.0f} | "
                     f"{s.get('trial-merges', 0):.0f} | {f['planning_seconds']:.0f}{warm} |")
    variants = [(f["fold"], name, v) for f in folds for name, v in f.get("measured_variants", {}).items()]
    if variants:
        lines += ["", "The measured planner's other settings, each planned by the flow after the earlier plans of "
                  "its fold (stages whose work those had done are reused, so only a run that computed the features "
                  "is a cold figure; the true-label signal reads the same trial merges as agreement, so its cold "
                  "cost is its shortlist's):", "",
                  "| fold | setting | features | GW matrix | trial merges (with the CKA probe) | total planning | "
                  "trial merges computed / reused |", "|---|---|---|---|---|---|---|"]
        for fold, name, v in variants:
            s, c, r = v["seconds"], v["computed"], v["reused"]
            total = sum(s.get(k, 0.0) for k in ("validate", "extract", "gw", "trial-merges", "plan"))
            cold = " (cold)" if c.get("features", 0) > 0 else ""
            lines.append(f"| {fold} | {PLAN_NAMES.get(name, name)} | {s.get('extract', 0):.0f} | {s.get('gw', 0):.0f} | "
                         f"{s.get('trial-merges', 0):.0f} | {total:.0f}{cold} | {c.get('trial merges', 0)} / "
                         f"{r.get('trial merges', 0)} |")
    lines += ["", *verdict(result), ""]
    return "\n".join(lines)


def verdict(result: dict) -> list[str]:
    """What the figures say, in words (GW's contribution, the default's standing, the targets)."""
    paired, default = result["paired"], result["default_planner"]
    corr = result.get("correlation") or {}
    out = ["## What this says", ""]
    if len(result["folds_run"]) < result["folds"]:
        out.append(f"- **Partial evidence**: fold{'s' if len(result['folds_run']) > 1 else ''} "
                   f"{', '.join(map(str, result['folds_run']))} of {result['folds']} only, so the intervals are over that "
                   "fold's items; the default planner is not changed on it.")
    if corr:
        fold0 = next(f for f in result["by_fold"] if f.get("correlation"))
        signal = SIGNAL_NAMES.get(fold0.get("trial_signal", "agreement"))
        gw = corr.get("gw_l-3_cls")
        best = max(corr.items(), key=lambda kv: kv[1]["spearman"])
        best_text = ("no other cheap predictor does better" if best[0] == "gw_l-3_cls" else
                     f"the best cheap predictor is {PREDICTOR_NAMES.get(best[0], best[0])} "
                     f"({best[1]['spearman']:+.3f} {_ci(best[1])})")
        told = [PREDICTOR_NAMES.get(n, n) for n, c in corr.items() if c["ci95"][0] > 0]
        out.append(f"- GW on the flow's features correlates {gw['spearman']:+.3f} {_ci(gw)} with the measured "
                   f"outcome by the shipped signal ({signal}); {best_text}. Interval above 0: "
                   f"{', '.join(told) if told else 'none'}.")
        found = fold0.get("shortlist_finds_best_partner")
        if isinstance(found, dict) and fold0.get("trial_signal") in found:
            out.append(f"- The GW shortlist holds a scorer's best partner by {signal} for "
                       f"{100 * found[fold0['trial_signal']]:.0f} % of the scorers; a random one of the same size "
                       f"would for {100 * _random_shortlist_recall(result):.0f} %. It caps "
                       "the planning cost; it does not find the best partners.")
    vs = paired.get("default vs random")
    out.append(f"- The default planner ({default}) against random plans: {vs['mean_diff']:+.4f} {_ci(vs)}, "
               f"{_told(vs)} (target: interval above 0).")
    for other in ("module", "description"):
        c = paired.get(f"default vs {other}")
        if c:
            same = all(same_groups(f["plans"].get(other, []), f["plans"].get(default, [])) for f in result["by_fold"])
            out.append(f"- Against the {other} plan: {c['mean_diff']:+.4f} {_ci(c)}, {_told(c)} (target: at least as "
                       "good)" + (": at the default's group sizes it is the default's own plan on every fold." if same else "."))
    sized = sorted(n for n in result["plans"] if n.startswith("sized/"))
    chance = [f"{_plan_label(other)} {c['mean_diff']:+.4f} {_ci(c)}, {_told(c)}" for other in ("module", "description", *sized)
              if (c := paired.get(f"{other} vs random"))]
    if chance:
        out.append(f"- The other plans at the same group sizes against random ones: {'; '.join(chance)}.")
    planners = [f"{_plan_label(n)} {c['mean_diff']:+.4f} {_ci(c)}, {_told(c)} "
                f"({result['plans'][n]['planned_backbones']:.1f} backbones planned)"
                for n in result.get("product_plans", []) if n != default and (c := paired.get(f"{n} vs random"))]
    if planners:
        out.append(f"- The product's other planners, at their own group sizes, against the random plans "
                   f"({result['plans']['random']['planned_backbones']:.1f} backbones planned): {'; '.join(planners)}.")
    partitions = result.get("against_random_partitions") or {}
    beyond = [f"{'the default' if n == 'default' else _plan_label(n)} {c['plan']:.3f} (reached by {c['random_reaching']}, "
              f"t {c['t']:+.2f}, p {c['t_p']:.3f})" for n, c in partitions.items()
              if n in ("default", "module", "description")
              or (n in result.get("product_plans", []) and not n.startswith("measured"))]
    if beyond:
        first = next(iter(partitions.values()))
        out.append(f"- Against the {first['n_random']} random partitions themselves (test macro F1 "
                   f"{first['random_mean']:.3f} ± {first['random_sd']:.4f} sd): {'; '.join(beyond)}.")
    for name in PLAN_NAMES:
        c = paired.get(f"{name} vs measured")
        if c:
            out.append(f"- {PLAN_NAMES[name]} against the GW shortlist with agreement: {c['mean_diff']:+.4f} "
                       f"{_ci(c)}, {_told(c)}.")
    limit = 15 * 60
    measured, shipped = result["measured_planning_seconds"], result["planning_seconds"]
    if shipped:
        out.append(f"- Planning cost of the default: at most {shipped['max']:.0f} s per cold fold against the target "
                   f"{limit} s ({'met' if shipped['max'] <= limit else 'missed'}); the measured planner's at most "
                   f"{measured['max']:.0f} s.")
    else:
        out.append(f"- Planning cost (the measured planner): at most {measured['max']:.0f} s per cold fold against "
                   f"the target {limit} s ({'met' if measured['max'] <= limit else 'missed'}).")
    return out
