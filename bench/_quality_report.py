"""Render the quality benchmark's JSON result as markdown (docs/results/<name>.md)."""
from __future__ import annotations

PLAN_NAMES = {"gw": "GW (ours)", "linkage": "GW + average linkage (paper)", "module": "module (person)",
              "description": "description (GPT-o1 stand-in)", "random": "random (mean over seeds)"}
METHOD_NAMES = {"ties": "TIES", "doge": "DOGE", "ta": "Task Arithmetic"}


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row(name: str, figures: dict, premerge: dict, extra: str = "") -> str:
    delta = None if figures.get("macro_f1") is None else figures["macro_f1"] - premerge["macro_f1"]
    return (f"| {name} | {_f(figures.get('accuracy'))} | {_f(figures.get('macro_f1'))} | {_f(figures.get('micro_f1'))} "
            f"| {_f(figures.get('qwk'))} | {'–' if delta is None else f'{delta:+.3f}'} | {extra} |")


def targets(result: dict) -> list[str]:
    """Plain statements of each target, met or missed."""
    lines = []
    pre, gated = result["premerge"]["macro_f1"], result.get("gated")
    if gated:
        drop = pre - gated["macro_f1"]
        lines.append(f"- Gated macro F1 within 0.02 of pre-merge: **{'met' if drop <= 0.02 else 'missed'}** "
                     f"({_f(gated['macro_f1'])} vs {_f(pre)}, a change of {-drop:+.3f}).")
        ratio = gated["storage_ratio"]
        lines.append(f"- Gated storage reduced at least 2.5x: **{'met' if ratio >= 2.5 else 'missed'}** ({ratio:.2f}x).")
    for method, by_plan in result["paired_gw_vs_baseline"].items():
        ours = result["ungated"]["gw"][method]["macro_f1"]
        beaten = [p for p in by_plan if result["ungated"][p][method]["macro_f1"] > ours]
        verdict = "met" if not beaten else f"missed (behind {', '.join(beaten)})"
        lines.append(f"- Ungated, {METHOD_NAMES.get(method, method)}: GW at least as good as every baseline plan: "
                     f"**{verdict}**.")
    return lines


def gate_summary(result: dict, gated: dict) -> list[str]:
    """How the planned groups fared at the gate, and why the gate is coarse on this data."""
    decisions = gated["decisions"]
    whole = sum(d["passed"] and len(d["accepted"]) == len(d["members"]) for d in decisions)
    smaller = sum(d["passed"] and len(d["accepted"]) < len(d["members"]) for d in decisions)
    sizes = sorted(result["validation_sizes"].values())
    median = sizes[len(sizes) // 2]
    ungated = result["ungated"]["gw"].get(gated["method"], {}).get("by_setting", {}).get("refit_heads")
    lines = [f"The gate kept {whole} of {len(decisions)} planned groups whole, cut {smaller} to a pair and "
             f"rejected {len(decisions) - whole - smaller}, leaving {gated['storage']['backbones']} backbones. "
             f"It judges each item on its validation split: {sizes[0]} to {sizes[-1]} answers (median {median}), "
             f"so one answer more or less moves an item's accuracy by about {1 / median:.2f}, more than "
             f"δ = {gated['delta']}, and macro F1 by as much or more."]
    if ungated:
        lines.append(f"Without the gate the same plan, method and head refit reach test macro F1 "
                     f"{_f(ungated['macro_f1'])} with {result['storage_ungated']['backbones']} backbones "
                     f"({result['storage_ungated']['ratio']:.2f}x); with it, {_f(gated['macro_f1'])} with "
                     f"{gated['storage']['backbones']} ({gated['storage_ratio']:.2f}x).")
    return lines + [""]


def module_purity(result: dict) -> list[str]:
    """Share of each plan's groups whose members all come from one curriculum module."""
    modules = result.get("item_modules") or {}
    if not modules:
        return []
    out = []
    for plan, variants in result["plans"].items():
        groups = [g for p in variants for g in p["groups"]]
        pure = sum(len({modules.get(m) for m in g}) == 1 for g in groups)
        out.append(f"{plan} {pure / len(groups):.2f}")
    return ["Share of groups inside one Beetle module: " + ", ".join(out) + ".", ""]


def analysis(result: dict) -> list[str]:
    """Which items and groups cost the most, computed from the per-item figures."""
    pre = {i: m["macro_f1"] for i, m in result["per_item_premerge"].items()}
    lines = []
    gated = result.get("gated")
    if gated:
        lines += gate_summary(result, gated)
        group_of = {i: g for g in gated["groups"] for i in g}
        drops = sorted(((gated["per_item_macro_f1"][i] - pre[i], i) for i in group_of))[:8]
        lines.append("Largest test macro F1 changes of merged items, gated (item, change, its group, "
                     "test answers; the gate saw validation only):")
        lines.append("")
        for change, item in drops:
            n = result["per_item_premerge"][item]["n"]
            lines.append(f"- `{item}`: {change:+.3f} in {' + '.join(group_of[item])} (n = {n})")
        lines.append("")
    behind = []
    for method, by_plan in result["paired_gw_vs_baseline"].items():
        for plan, cmp in by_plan.items():
            if cmp["mean_diff"] >= 0:
                continue
            ours, theirs = result["ungated"]["gw"][method], result["ungated"][plan][method]
            worst = sorted((ours["per_item_macro_f1"][i] - theirs["per_item_macro_f1"][i], i)
                           for i in ours["per_item_macro_f1"])[:5]
            items = ", ".join(f"`{i}` ({d:+.3f})" for d, i in worst)
            lines.append(f"- {METHOD_NAMES.get(method, method)}, GW behind {plan} by {-cmp['mean_diff']:.3f} "
                         f"(95% CI {cmp['ci95']}, sign test p = {cmp['sign_test_p']}): most of it from {items}.")
            behind.append(cmp["ci95"][0] <= 0.0 <= cmp["ci95"][1])
    if behind:
        verdict = ("every one of these intervals contains 0: at this test size the plans are not told apart"
                   if all(behind) else "some of these intervals exclude 0: those baselines are ahead beyond noise")
        sizes = [m["n"] for m in result["per_item_premerge"].values()]
        lines.append(f"- Where GW is behind, {verdict} ({result['n_test']} test answers over {result['n_items']} "
                     f"items, {min(sizes)} to {max(sizes)} per item).")
    return lines


def render_markdown(result: dict) -> str:
    pre = result["premerge"]
    out = [f"# Consolidating the {result['dataset']} fleet: plans x merge methods",
           "",
           "Generated by `bench/quality_beetle.py`; do not edit by hand. "
           f"{result['n_items']} items (one MiniLM-L6 scorer each), {result['n_test']} test answers (test_ua). "
           "Fleet figures are item figures weighted by test size, as GW-SMM reports them; micro F1 pools "
           "every test answer. Merge parameters and head settings were chosen on validation only.",
           "", "## Targets", "", *targets(result), "",
           "## Fleet figures (test)", "",
           "| plan / method | accuracy | macro F1 | micro F1 | QWK | Δ macro F1 | notes |",
           "|---|---|---|---|---|---|---|",
           _row("pre-merge (one scorer per item)", pre, pre, f"{result['n_items']} backbones")]
    for method, gated in result["gated_by_method"].items():
        out.append(_row(f"**gated**, GW plan, {METHOD_NAMES.get(method, method)}, heads refit", gated, pre,
                        f"{gated['storage']['backbones']} backbones, δ = {gated['delta']}"))
    for plan, by_method in result["ungated"].items():
        for method, figures in by_method.items():
            note = figures["head_setting"]
            if "std_macro_f1" in figures:
                note = f"macro F1 sd {figures['std_macro_f1']:.3f} over {len(figures['per_seed'])} seeds"
            out.append(_row(f"ungated, {PLAN_NAMES.get(plan, plan)}, {METHOD_NAMES.get(method, method)}",
                            figures, pre, note))
    out += ["", "Head settings (ungated macro F1, test / validation):", "",
            "| plan / method | own heads | heads refit |", "|---|---|---|"]
    for plan, by_method in result["ungated"].items():
        for method, figures in by_method.items():
            if "by_setting" not in figures:
                continue
            cells = [f"{_f(s['macro_f1'])} / {_f(s['validation_macro_f1'])}" for s in figures["by_setting"].values()]
            out.append(f"| {PLAN_NAMES.get(plan, plan)}, {METHOD_NAMES.get(method, method)} | {' | '.join(cells)} |")
    out += ["", "## Paired comparison: GW minus baseline, per item (test macro F1)", "",
            "Weighted mean difference over items with a bootstrap 95% interval (items resampled), and a "
            "two-sided sign test over items whose figures differ.", "",
            "| method | baseline | mean diff | 95% CI | wins / losses / ties | sign test p |", "|---|---|---|---|---|---|"]
    for method, by_plan in result["paired_gw_vs_baseline"].items():
        for plan, c in by_plan.items():
            out.append(f"| {METHOD_NAMES.get(method, method)} | {plan} | {c['mean_diff']:+.4f} | {c['ci95']} "
                       f"| {c['wins']} / {c['losses']} / {c['ties']} | {c['sign_test_p']} |")
    s_gated = result["gated"]["storage"] if result.get("gated") else None
    s_all = result["storage_ungated"]
    out += ["", "## Storage", "",
            f"- Before: {s_all['bytes_before'] / 1e6:.0f} MB ({s_all['items']} encoders with their heads).",
            f"- Ungated GW plan: {s_all['bytes_after'] / 1e6:.0f} MB ({s_all['backbones']} backbones), "
            f"{s_all['ratio']:.2f}x smaller."]
    if s_gated:
        out.append(f"- Gated: {s_gated['bytes_after'] / 1e6:.0f} MB ({s_gated['backbones']} backbones), "
                   f"{s_gated['ratio']:.2f}x smaller.")
    out += ["", "## Where it is lost", "", *analysis(result), "", *module_purity(result),
            "## Time per stage (seconds)", "",
            "| " + " | ".join(result["seconds"]) + " |", "|" + "---|" * len(result["seconds"]),
            "| " + " | ".join(str(v) for v in result["seconds"].values()) + " |", "",
            f"Machine: {result['machine']}. Cached stages (fleet, features, GW pairs, merged groups) read "
            "near zero on a rerun. What merging took when each group was computed (summed over the distinct "
            "groups of all plans, gate fallbacks included; merge = the merges alone, total = merges, "
            "forward passes, head refits and scoring; measured on a shared machine):", "",
            "| method | groups | merge s | total s |", "|---|---|---|---|",
            *[f"| {METHOD_NAMES.get(m, m)} | {v['groups']} | {v['merge']} | {v['total']} |"
              for m, v in result.get("group_compute_seconds", {}).items()], "",
            "## Plans", ""]
    for plan, variants in result["plans"].items():
        for n, p in enumerate(variants):
            groups = "; ".join(" + ".join(g) for g in p["groups"])
            label = plan if len(variants) == 1 else f"{plan} (seed {n})"
            out.append(f"- **{label}** ({len(p['groups'])} groups): {groups}")
    out += ["", "## Settings", "", "```json", _json(result["settings"]), "```", ""]
    return "\n".join(out)


def _json(value) -> str:
    import json

    return json.dumps(value, indent=1)
