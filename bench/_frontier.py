"""Storage against quality on one fold: each merge method x group size k x per-item correction, gated and
ungated, on the product's jobs (NOTE says how; bench/quality_beetle.py --frontier runs it over folds)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gw.tuning import default_grid
from workers.consolidate import MergeConfig, choose, head_setting
from workers.fleet_gw import plan_fleet
from workers.group_jobs import sweep_job

NOTE = """\
- **Plans**: the GW planner at each k with the τ quantile at 1.0, so every scorer joins a group of at
  most k (`workers.fleet_gw.plan_fleet`, the flow's function).
- **Merges**: each method at its default parameters (the first candidate of its grid: a full grid is
  three merges a group), heads refit (the product's head setting); with the correction, each item's
  rank is the product's choice (`MergeConfig.correction_ranks`, by agreement with its own scorer).
- **Ungated**: every planned group as merged, from the product's cached `sweep_job` read with its
  `choose`. **Gated**: the product's gate and fallback (`GroupConsolidator.consolidate`, the code
  `consolidate_group_job` runs) on the same cached sweeps; the accepted checkpoints are not saved.
- **Storage** counts every encoder, head and kept adapter (float32 LoRA factors).
- **Seconds a group**: a planned group's sweep (merge, score every member's answers, refit its head,
  choose its correction's rank), mean over the planned groups, as first computed."""

METHODS = ("ties", "tsv_m", "iso_cts", "regmean")
KS = (2, 3, 5, 8, 16)
CACHE = "frontier_rows.json"
BYTES_PER_PARAMETER = 4  # adapters are saved in float32


def setting_name(method: str, k: int, correction: bool) -> str:
    return f"{method}/k{k}/{'corrected' if correction else 'plain'}"


def frontier_plans(D: np.ndarray, ids: Sequence[str], ks: Sequence[int]) -> dict[int, list[list[str]]]:
    return {k: [list(g) for g in plan_fleet(D, list(ids), tau=None, tau_quantile=1.0, k=k).groups] for k in ks}


def frontier_config(method: str, correction: bool, defaults: MergeConfig) -> MergeConfig:
    return MergeConfig(method=method, grid=default_grid(method)[:1], refit_heads=True, gate=defaults.gate,
                       delta=defaults.delta, seed=defaults.seed, item_correction=correction)


def run_setting(fold, groups: list[list[str]], config: MergeConfig, figures: Callable[..., dict]) -> dict:
    """The ungated and gated rows of one setting on `fold` (a bench.quality_beetle.Fold)."""
    setting = head_setting(config)
    store, consolidator = fold.store, fold.consolidator

    def sweep(members: Sequence[str]) -> dict:
        return sweep_job(store, list(members), config, consolidator=consolidator)

    ungated, gated, accepted_groups, seconds, decisions = {}, {}, [], [], []
    adapters = {"ungated": 0, "gated": 0}
    for group in groups:
        result = sweep(group)
        seconds.append(result["seconds"])
        chosen, _ = choose(result["evaluations"], fold.own, setting)
        ungated.update(chosen["scores"][setting])
        adapters["ungated"] += _adapter_parameters(chosen.get("correction"), group)
        specs = [consolidator.manifest.scorer(i) for i in group]
        outcome = consolidator.consolidate(specs, config, own={i: fold.own[i] for i in group},
                                           sweep=lambda sub: sweep([s.id for s in sub]))
        decisions.append(outcome.decision.to_dict())
        if outcome.candidate is not None:
            accepted_groups.append(outcome.accepted)
            gated.update(outcome.candidate["scores"][setting])
            adapters["gated"] += _adapter_parameters(outcome.candidate.get("correction"), outcome.accepted)
    rows = {}
    for kind, merged, kept in (("ungated", ungated, groups), ("gated", gated, accepted_groups)):
        row = figures(fold, {"items": fold.items(merged), "groups": kept},
                      adapter_bytes=adapters[kind] * BYTES_PER_PARAMETER)
        rows[kind] = row | {"adapter_parameters": adapters[kind]}
    rows["gated"]["whole_groups"] = sum(len(a) == len(g) for a, g in zip(accepted_groups, groups))
    rows["gated"]["decisions"] = [d["reason"] for d in decisions]
    return rows | {"groups": groups, "seconds_per_group": round(float(np.mean(seconds)), 2)}


def _adapter_parameters(correction: dict | None, members: Sequence[str]) -> int:
    return sum(int(correction[i]["parameters"]) for i in members) if correction else 0


def run_fold(fold, D: np.ndarray, ids: Sequence[str], here: Path, figures: Callable[..., dict], *,
             methods: Sequence[str], ks: Sequence[int], corrections: Sequence[bool], defaults: MergeConfig,
             log: Callable[[str], None]) -> dict:
    """Every requested setting on one fold, each cached in HERE/frontier_rows.json as it finishes."""
    cache = here / CACHE
    rows = json.loads(cache.read_text()) if cache.is_file() else {}
    plans = frontier_plans(D, ids, ks)
    for correction in corrections:
        for method in methods:
            for k in ks:
                name = setting_name(method, k, correction)
                if name in rows:
                    continue
                started = time.perf_counter()
                rows[name] = run_setting(fold, plans[k], frontier_config(method, correction, defaults), figures)
                rows[name]["seconds"] = round(time.perf_counter() - started, 1)
                cache.write_text(json.dumps(rows))
                log(f"frontier {name}: ungated {rows[name]['ungated']['macro_f1']:.3f} "
                    f"{rows[name]['ungated']['storage_ratio']:.2f}x, gated {rows[name]['gated']['macro_f1']:.3f} "
                    f"{rows[name]['gated']['storage_ratio']:.2f}x ({rows[name]['seconds']} s)")
    return rows


def combine(folds: Sequence[dict], premerge: Sequence[dict], weights: dict, paired: Callable) -> list[dict]:
    """One row per (setting, gated) present in every fold: means over folds, and the paired change of
    macro F1 against pre-merge over item x fold units."""
    premerge_units = {f"{n}:{i}": m for n, p in enumerate(premerge) for i, m in p["per_item_macro_f1"].items()}
    out = []
    for name in [n for n in folds[0] if all(n in f for f in folds)]:
        method, k, kind = name.split("/")
        for gated in (False, True):
            values = [f[name]["gated" if gated else "ungated"] for f in folds]
            units = {f"{n}:{i}": m for n, v in enumerate(values) for i, m in v["per_item_macro_f1"].items()}
            out.append({"method": method, "k": int(k[1:]), "correction": kind == "corrected", "gated": gated,
                        "storage_ratio": round(float(np.mean([v["storage_ratio"] for v in values])), 3),
                        "backbones": round(float(np.mean([v["backbones"] for v in values])), 1),
                        "macro_f1": round(float(np.mean([v["macro_f1"] for v in values])), 4),
                        "accuracy": round(float(np.mean([v["accuracy"] for v in values])), 4),
                        "adapter_parameters": round(float(np.mean([v["adapter_parameters"] for v in values]))),
                        "vs_premerge": paired(units, premerge_units, weights),
                        "seconds_per_group": round(float(np.mean([f[name]["seconds_per_group"] for f in folds])), 2),
                        "folds": len(folds)})
    return out


QUALITY_MARGIN = 0.02  # the targets: fleet macro F1 >= pre-merge - 0.02


def most_storage_within_margin(rows: Sequence[dict], premerge_macro_f1: float, correction: bool) -> dict | None:
    """The gated row (with or without the correction) of most storage whose macro F1 is within the margin."""
    good = [r for r in rows if r["gated"] and r["correction"] == correction
            and r["macro_f1"] >= premerge_macro_f1 - QUALITY_MARGIN]
    return max(good, key=lambda r: r["storage_ratio"], default=None)
