"""Does the demo district plant what merging cares about? Every pair of a built demo fleet, merged.

    .venv/bin/python bench/demo_pairs.py --store .fleetmerge/demo/fleet    # after `fleetmerge demo`

For every pair of the fleet's scorers: the product's one merge-and-score call
(`workers.consolidate.GroupConsolidator.evaluate(pair, {}, MergeConfig())`: TIES at its default
parameters, heads refit on the merged backbone and, beside them, the members' own heads), and per
member the change of validation (and test) macro F1 against its own scorer, and the agreement of the
merged model's decisions (refit heads) with its own scorer's on its held-out responses (validation
and test). Pairs are split by the items' `module` (the demo's topics): within a topic against across.
The GW distance of each pair comes from the fleet's distances table, when it has exactly one. And
the plan `gw.plan.solve_plan` makes (shipped tau and k) when a pair's distance is its measured outcome,
the worst member's change of validation macro F1 (turned into a distance: the best outcome minus it).
Prints one line per pair, then one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra.settings import offline_env  # noqa: E402

offline_env()  # before torch is imported (OMP_WAIT_POLICY=PASSIVE, offline hub)

import numpy as np  # noqa: E402

from infra.manifest import load_manifest  # noqa: E402
from infra.storage import open_store  # noqa: E402
from gw.plan import solve_plan  # noqa: E402
from workers.consolidate import GroupConsolidator, MergeConfig, decide  # noqa: E402
from workers.models import quiet_transformers  # noqa: E402

HELD_OUT = ("validation", "test")


def gw_distances(store, ids) -> dict[tuple[str, str], float]:
    """The pairs of the fleet's distances table under gw/distances/ (empty unless there is exactly one)."""
    keys = [k for k in store.list("gw/distances/") if k.endswith(".parquet")]
    if len(keys) != 1:
        return {}
    rows = store.read_table(keys[0], columns=["a", "b", "value"]).to_pylist()
    return {tuple(sorted((r["a"], r["b"]))): float(r["value"]) for r in rows if r["a"] in ids and r["b"] in ids}


def decisions(cons: GroupConsolidator, model, spec) -> np.ndarray:
    member = cons.member(spec)
    texts = [t for split in HELD_OUT for t in member.texts[split]]
    return decide(cons.probabilities(model, spec.id, cons.features(model, texts)), spec.task)


def measured_plan(rows: list[dict]) -> list[list[str]]:
    """The plan over distances made of the measured pair outcomes (worst member's validation change)."""
    ids = sorted({i for row in rows for i in row["pair"]})
    index = {i: n for n, i in enumerate(ids)}
    outcome = np.zeros((len(ids), len(ids)))
    for row in rows:
        a, b = (index[i] for i in row["pair"])
        outcome[a, b] = outcome[b, a] = min(m["d_val_f1_refit"] for m in row["members"].values())
    distances = outcome.max() - outcome + 1e-3  # the best pair is the closest; every pair may be grouped
    np.fill_diagonal(distances, 0.0)
    return [list(g) for g in solve_plan(distances, ids).groups]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=".fleetmerge/demo/fleet")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    quiet_transformers()
    store = open_store(args.store)
    manifest = load_manifest(store)
    specs = {s.id: s for s in manifest.scorers}
    topic = {s.id: s.module for s in manifest.scorers}
    cons = GroupConsolidator(store, manifest, device=args.device)
    started = time.perf_counter()
    own, own_decisions = {}, {}
    for i, spec in specs.items():
        own[i] = cons.own(spec)
        own_decisions[i] = decisions(cons, cons.individual(spec), spec)
    gw = gw_distances(store, set(specs))
    config = MergeConfig()
    rows = []
    for a, b in itertools.combinations(sorted(specs), 2):
        evaluation, model = cons.evaluate([specs[a], specs[b]], {}, config)
        row = {"pair": [a, b], "within": topic[a] == topic[b], "gw": gw.get((a, b)), "members": {}}
        for i in (a, b):
            scores = evaluation["scores"]
            merged = decisions(cons, model, specs[i])
            row["members"][i] = {
                "d_val_f1_refit": scores["refit_heads"][i]["validation"]["macro_f1"] - own[i]["validation"]["macro_f1"],
                "d_val_f1_own": scores["own_heads"][i]["validation"]["macro_f1"] - own[i]["validation"]["macro_f1"],
                "d_test_f1_refit": scores["refit_heads"][i]["test"]["macro_f1"] - own[i]["test"]["macro_f1"],
                "agreement": float(np.mean(merged == own_decisions[i])),
            }
        rows.append(row)
        m = row["members"]
        print(f"{a:>14} + {b:<14} {'within' if row['within'] else 'across':>6}  gw {row['gw'] or float('nan'):.4f}  "
              + "  ".join(f"{i}: dF1 val {m[i]['d_val_f1_refit']:+.3f} (own heads {m[i]['d_val_f1_own']:+.3f}) "
                          f"test {m[i]['d_test_f1_refit']:+.3f} agree {m[i]['agreement']:.3f}" for i in m),
              flush=True)

    def summary(within: bool) -> dict:
        members = [v for r in rows if r["within"] == within for v in r["members"].values()]
        gws = [r["gw"] for r in rows if r["within"] == within and r["gw"] is not None]
        out = {"pairs": sum(r["within"] == within for r in rows), "member_rows": len(members)}
        for key in ("d_val_f1_refit", "d_val_f1_own", "d_test_f1_refit", "agreement"):
            values = np.array([v[key] for v in members])
            out[key] = {"mean": round(float(values.mean()), 4), "min": round(float(values.min()), 4),
                        "max": round(float(values.max()), 4)}
        out["gw_mean"] = round(float(np.mean(gws)), 5) if gws else None
        return out

    result = {"store": store.uri, "method": config.method, "params": "defaults", "within": summary(True),
              "across": summary(False), "measured_plan": measured_plan(rows), "own_val_macro_f1": {i: round(o["validation"]["macro_f1"], 4)
                                                             for i, o in own.items()},
              "seconds": round(time.perf_counter() - started, 1), "pairs": rows}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
