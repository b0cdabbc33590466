"""What a run shows in the Prefect UI: progress bars, the GW heatmap, the plan, metrics and storage."""
from __future__ import annotations

import base64
import io
from typing import Any

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from flows.report import megabytes


class Progress:
    """A progress artifact that a long step moves from 0 to 100 %."""

    def __init__(self, key: str, description: str):
        self._id = create_progress_artifact(0.0, key=key, description=description)
        self._last = 0.0

    def update(self, fraction: float) -> None:
        percent = round(100.0 * min(max(fraction, 0.0), 1.0), 1)
        if percent != self._last:
            update_progress_artifact(self._id, percent)
            self._last = percent


HEATMAP_MAX_INCHES = 14.0  # a fixed canvas: a district's heatmap must not grow with the square of its fleet
HEATMAP_MAX_LABELLED = 80  # scorers named on the axes at most (7 pt each); beyond that, names are unreadable


def heatmap_png(matrix: list[list[float]], ids: list[str]) -> bytes:
    """The GW matrix as a PNG of at most HEATMAP_MAX_INCHES square at 90 dpi, whatever the fleet's size
    (a pair the shortlist did not solve is blank). Rows and columns in the order given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    size = min(HEATMAP_MAX_INCHES, max(4.0, 0.35 * len(ids) + 2))
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(np.asarray(matrix, dtype=float), cmap="viridis", interpolation="nearest")
    if len(ids) <= HEATMAP_MAX_LABELLED:
        ax.set_xticks(range(len(ids)), ids, rotation=90, fontsize=7)
        ax.set_yticks(range(len(ids)), ids, fontsize=7)
    else:
        ax.set_xlabel(f"{len(ids)} scorers")
    ax.set_title("Gromov-Wasserstein distances")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


def plan_ordered(planned: dict) -> tuple[list[list[float]], list[str]]:
    """The GW matrix with its scorers in the plan's order (group after group, then the rest)."""
    ids = planned["ids"]
    grouped = [i for group in planned["plan"]["groups"] for i in group if i in ids]
    chosen = set(grouped)
    order = grouped + [i for i in ids if i not in chosen]
    index = {i: n for n, i in enumerate(ids)}
    matrix = planned["matrix"]
    return [[matrix[index[a]][index[b]] for b in order] for a in order], order


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _decision(record: dict) -> str:
    """A gate decision in words: merged whole, a fallback pair, or every member on its own scorer."""
    accepted, members = record["accepted"], record["members"]
    if not accepted:
        return "kept on own scorers"
    if len(accepted) == len(members):
        return "merged whole"
    left = [m for m in members if m not in accepted]
    return f"fallback pair {' + '.join(accepted)} ({', '.join(left)} on own scorer)"


# The measured outcome's column, by the plan's trial signal (gw.mergeability.TRIAL_SIGNALS).
TRIAL_COLUMN = {"agreement": "agreement", "true_label": "true-label change", "refit": "refit true-label change"}


def plan_rows(planned: dict) -> tuple[list[dict], str]:
    """The merge plan as table rows: per group its largest GW distance, for the description planner its
    largest description distance and, when trial merges were measured, the group's measured outcome (its
    worst member's trial signal against its own scorer, from the group's own trial merge, else the worst
    of its pairs'), side by side, 3 significant figures."""
    plan, ids, matrix = planned["plan"], planned["ids"], planned["matrix"]
    index = {i: n for n, i in enumerate(ids)}
    stability = {tuple(e["group"]): e["share"] for e in plan.get("stability") or []}
    measured = {frozenset(entry[:-1]): entry[-1] for entry in planned.get("measured") or []}
    described = planned.get("description_matrix")
    rows = []
    for group in plan["groups"]:
        spread = max(matrix[index[a]][index[b]] for a in group for b in group if a != b)
        row = {"group": " + ".join(group), "size": len(group), "largest GW distance": float(f"{spread:.3g}")}
        if described:  # the description planner's own distances, beside GW's
            widest = max(described[index[a]][index[b]] for a in group for b in group if a != b)
            row["largest description distance"] = float(f"{widest:.3g}")
        if measured:
            trials = [measured.get(frozenset(group))]
            if trials[0] is None:
                trials = [measured.get(frozenset((a, b))) for n, a in enumerate(group) for b in group[n + 1:]]
            row[f"trial-merge {TRIAL_COLUMN[plan.get('trial_signal', 'agreement')]}"] = None if None in trials else float(f"{min(trials):.3g}")
        if stability:
            row["stability"] = stability.get(tuple(group))
        rows.append(row)
    rows += [{"group": f"{s} (on its own)", "size": 1, "largest GW distance": None} for s in plan["singletons"]]
    objective = plan.get("objective")
    planner = plan.get("planner", "gw")
    split = plan.get("split") or {}
    pairs = sum(len(members) == 2 for members in measured)
    description = (f"plan ({planner} planner, {plan['method']}): τ = {plan['tau']:.3g}"
                   + (f", objective {objective:.3g}" if objective is not None else "")
                   + f"; {len(plan['groups'])} groups, {len(plan['singletons'])} items on their own"
                   + (f"; {pairs} pairs trial-merged" if measured else "")
                   + (f"; {len(split)} planned groups split after their own trial merge" if split else "")
                   + (f". Not by description: {plan['fallback']}" if plan.get("fallback") else ""))
    return rows, description


def run_markdown(summary: dict[str, Any], records: list[dict]) -> str:
    """One page for the whole run: what was merged, storage, the biggest changes, what was set aside."""
    storage = summary["storage"]
    lines = [f"# Run {summary['run_id']}", "",
             f"**Storage** {megabytes(storage['bytes_before'])} → {megabytes(storage['bytes_after'])} "
             f"({storage['ratio']}x smaller): "
             f"{storage['n_backbones']} backbones for {storage['n_items']} items.", "",
             "## Groups", "", "| planned group | gate | reason |", "|---|---|---|"]
    lines += [f"| {' + '.join(r['members'])} | {_decision(r)} | {r['gate']['reason']} |" for r in records]
    changed = [r for r in summary["items"] if r.get("test_macro_f1_before") is not None]
    changed.sort(key=lambda r: r["test_macro_f1_after"] - r["test_macro_f1_before"])
    lines += ["", "## Items that changed most (test macro F1)", "", "| item | before | after | change | backbone |",
              "|---|---|---|---|---|"]
    for r in changed[:3] + [r for r in changed[-3:] if r not in changed[:3]]:
        change = r["test_macro_f1_after"] - r["test_macro_f1_before"]
        lines.append(f"| {r['item']} | {r['test_macro_f1_before']:.3f} | {r['test_macro_f1_after']:.3f} | "
                     f"{change:+.3f} | {r['backbone']} |")
    lines += ["", "## Set aside", ""]
    lines += ([f"- **{item}**: {'; '.join(reasons)}" for item, reasons in summary["set_aside"].items()]
              or ["Nothing: every scorer passed validation."])
    lines += ["", f"Computed: {_counts(summary['computed'])}; reused: {_counts(summary['reused'])}. "
              f"Seconds: {', '.join(f'{k} {v:.1f}' for k, v in summary['seconds'].items())}."]
    if summary.get("driver_peak_rss_mb"):  # what the flow's process needs: size the machine that runs it
        lines += ["", f"Driver peak memory: {max(summary['driver_peak_rss_mb'].values()):,.0f} MB."]
    return "\n".join(lines) + "\n"


def publish_run_artifacts(summary: dict[str, Any], planned: dict, records: list[dict]) -> None:
    matrix, ids = plan_ordered(planned)
    png = base64.b64encode(heatmap_png(matrix, ids)).decode()
    create_markdown_artifact(f"![GW distance heatmap](data:image/png;base64,{png})", key="gw-heatmap",
                             description="pairwise GW distances between the scorers' feature clouds, "
                                         "the planned groups as blocks along the diagonal")
    rows, description = plan_rows(planned)
    create_table_artifact(rows, key="merge-plan", description=description)
    create_table_artifact(summary["items"], key="item-metrics",
                          description="macro F1 per item before and after (3 decimals), and what the gate decided")
    if records:
        create_table_artifact([{"planned group": " + ".join(r["members"]), "decision": _decision(r),
                                "reason": r["gate"]["reason"]} for r in records],
                              key="gate-decisions", description="the accuracy gate, group by group")
    storage = summary["storage"]
    corrections = f" + {storage['n_adapters']} item corrections" if storage.get("n_adapters") else ""
    create_markdown_artifact(
        "| | |\n|---|---|\n"
        f"| before | {megabytes(storage['bytes_before'])} ({storage['n_items']} scorers) |\n"
        f"| after | {megabytes(storage['bytes_after'])} ({storage['n_backbones']} backbones + {storage['n_items']} heads"
        f"{corrections}) |\n"
        f"| ratio | {storage['ratio']}x |\n| computed | {_counts(summary['computed'])} |\n"
        f"| reused | {_counts(summary['reused'])} |\n| set aside | {', '.join(summary['set_aside']) or 'none'} |\n",
        key="storage-summary", description="storage before and after, and what was computed or reused")
    create_markdown_artifact(run_markdown(summary, records), key="run-summary",
                             description=f"run {summary['run_id']} at a glance")
