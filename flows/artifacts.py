"""What a run shows in the Prefect UI: progress bars, the GW heatmap, the plan, metrics and storage."""
from __future__ import annotations

import base64
import io
from typing import Any

from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)


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


def heatmap_png(matrix: list[list[float]], ids: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.35 * len(ids) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(ids)), ids, rotation=90, fontsize=7)
    ax.set_yticks(range(len(ids)), ids, fontsize=7)
    ax.set_title("Gromov-Wasserstein distances")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=90)
    plt.close(fig)
    return out.getvalue()


def publish_run_artifacts(summary: dict[str, Any], planned: dict, records: list[dict]) -> None:
    png = base64.b64encode(heatmap_png(planned["matrix"], planned["ids"])).decode()
    create_markdown_artifact(f"![GW distance heatmap](data:image/png;base64,{png})", key="gw-heatmap",
                             description="pairwise GW distances between the scorers' feature clouds")
    plan = planned["plan"]
    stability = {tuple(entry["group"]): entry["share"] for entry in plan.get("stability") or []}
    rows = [{"group": "+".join(g), "size": len(g), "stability": stability.get(tuple(g))} for g in plan["groups"]]
    rows += [{"group": s, "size": 1, "stability": None} for s in plan["singletons"]]
    create_table_artifact(rows, key="merge-plan", description=f"plan ({plan['method']}, tau={plan.get('tau')})")
    create_table_artifact(summary["items"], key="item-metrics",
                          description="macro F1 per item before and after, with the gate's decision")
    gates = [{"group": "+".join(r["members"]), "passed": r["gate"]["passed"], "accepted": "+".join(r["accepted"]),
              "reason": r["gate"]["reason"]} for r in records]
    if gates:
        create_table_artifact(gates, key="gate-decisions", description="the accuracy gate, group by group")
    storage = summary["storage"]
    create_markdown_artifact(
        f"# Run {summary['run_id']}\n\n"
        f"| | |\n|---|---|\n| bytes before | {storage['bytes_before']:,} |\n| bytes after | {storage['bytes_after']:,} |\n"
        f"| ratio | {storage['ratio']} |\n| backbones | {storage['n_backbones']} |\n| items | {storage['n_items']} |\n"
        f"| computed | {summary['computed']} |\n| reused | {summary['reused']} |\n"
        f"| set aside | {', '.join(summary['set_aside']) or 'none'} |\n",
        key="storage-summary", description="storage before and after, and what was computed or reused")
