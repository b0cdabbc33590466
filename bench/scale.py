"""Benchmark: planning a 500-scorer fleet through the shortlist (gw/candidates.py), and what it loses.

    python bench/scale.py                # the reference run (500 x 1,000 x 384, and the 150-scorer check)
    python bench/scale.py --quick        # smoke run (toy sizes)

Fleets: the planted-cluster generator (gw/synthetic.py), families of ``--family-size`` (default 5, so
a family cannot be one group of k = 3 and the planner has real choices), d = 384.

* ``plan_500_seconds``: cold, features given (drawn before the clock starts): preparation of every
  cloud, one cost profile each, the SLB of all pairs, each scorer's ``--m`` nearest by the bound,
  our batched entropic GW on those candidate pairs only, and ``gw.plan.solve_plan`` (k = 3, tau =
  :func:`gw.candidates.shortlist_tau` at the flow's default quantile) on the sparse matrix. Wall
  seconds with every core (``--threads``, default all). Solved pairs are cached under ``--work``
  (one JSON line each), so an interrupted run resumes; a resumed run adds the cached pairs' own
  recorded solve seconds, and says how many pairs it resumed (0: a true cold run).
* ``shortlist_objective_gap`` (``--check-scorers``, default 150, at ``--check-points`` points, default
  128, so all 11,175 pairs take minutes here; cached the same way): the
  full matrix's plan against the shortlist's, both scored by ``gw.plan.plan_objective`` on the full
  matrix at the full matrix's tau: ``(full - shortlist) / full`` (negative: the shortlist plan scores
  higher, e.g. where the full problem is too large for the exact MILP and the heuristic plans it).
  Agreement of the groups: adjusted Rand index of the two partitions (singletons as their own
  clusters) and the share of the full plan's groups found identically. Also at a tight threshold
  (``--tight-quantile``) and with the full tau handed to the shortlist plan.
* ``beetle_shortlist`` (``--beetle-fleet DIR``, repeatable): the same check on real features, the
  flow's clouds of a built Beetle fold fleet (47 items, 19-76 answers each: all 1,081 pairs).
* ``flow_seconds_n200`` and ``growth_exponents``: the flow's cost curve, measured by
  ``bench/flow_scale.py`` (tiny scorers at N = 25...200 through the real flow on a 3-node Ray cluster
  and moto's S3 server; about an hour) and read here from its result file (``--flow-result``), with
  the commit it was measured at; ``--run-flow`` runs it first (with the product's defaults).

Prints one JSON object as the last line.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep (set before torch loads)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, MutableMapping  # noqa: E402
from pathlib import Path  # noqa: E402

import _util  # noqa: E402,F401  (puts the repository on sys.path)
import numpy as np  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from _util import emit, machine, set_threads, timed  # noqa: E402
from gw.candidates import DEFAULT_CANDIDATES, shortlist_gw, shortlist_tau  # noqa: E402
from gw.matrix import gw_matrix  # noqa: E402
from gw.plan import DEFAULT_TAU_QUANTILE, Plan, plan_objective, solve_plan  # noqa: E402
from gw.result import GWResult  # noqa: E402
from gw.synthetic import planted_fleet  # noqa: E402


class JsonlCache(MutableMapping):
    """GW results by cache key, appended one JSON line at a time (a torn last line is ignored)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._data: dict[str, GWResult] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self._data[row["key"]] = GWResult.from_dict(row["result"])
        self._file = path.open("a")

    def __getitem__(self, key: str) -> GWResult:
        return self._data[key]

    def __setitem__(self, key: str, value: GWResult) -> None:
        self._data[key] = value
        self._file.write(json.dumps({"key": key, "result": value.to_dict()}) + "\n")
        self._file.flush()

    def __delitem__(self, key: str) -> None:
        raise TypeError("append-only cache")

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def fleet(n_scorers: int, family_size: int, n_points: int, seed: int):
    if n_scorers % family_size:
        raise SystemExit(f"--family-size {family_size} must divide the number of scorers {n_scorers}")
    return planted_fleet(n_families=n_scorers // family_size, models_per_family=family_size, n_points=n_points,
                         dim=384, seed=seed)


def plan_500(args, work: Path) -> dict:
    """The shortlist pipeline on the large fleet, timed from the features."""
    drawn = fleet(args.scorers, args.family_size, args.points, args.seed)
    name = f"large-{args.scorers}x{args.points}-f{args.family_size}-m{args.m}-s{args.seed}"
    cache = JsonlCache(work / f"{name}.jsonl")
    resumed_keys = set(cache)
    stages: dict[str, float] = {}
    last = [time.perf_counter()]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - last[0]
        last[0] = now
        if stage == "pairs" and (done == total or done % 200 < args.batch_size):
            print(f"  pairs {done}/{total} ({stages['pairs']:.0f} s)", flush=True)

    with timed() as t:
        short = shortlist_gw(drawn.features, args.m, cache=cache, progress=progress, batch_size=args.batch_size)
        with timed() as t_plan:
            tau = shortlist_tau(short.graph, short.values, args.tau_quantile)
            plan = solve_plan(short.values, short.ids, tau=tau, k=3)
    # pairs read from an earlier, interrupted run: add what they took then
    resumed = [r for key, r in cache.items() if key in resumed_keys]
    resumed_seconds = sum(r.seconds for r in resumed)
    n = len(short.ids)
    return {
        "plan_500_seconds": round(t.wall + resumed_seconds, 1),
        "scorers": n, "points": args.points, "dim": 384, "family_size": args.family_size, "m": args.m,
        "pairs_solved": len(short.graph.pairs), "pairs_all": n * (n - 1) // 2,
        "resumed_pairs": short.n_cached, "resumed_pairs_seconds": round(resumed_seconds, 1),
        "cpu_s": round(t.cpu, 1), "wall_s_this_run": round(t.wall, 1),
        "stage_wall_s": {k: round(v, 1) for k, v in stages.items()} | {"plan": round(t_plan.wall, 1)},
        "plan": {"method": plan.method, "tau": plan.tau, "groups": len(plan.groups), "singletons": len(plan.singletons),
                 "objective": plan.objective, **planted_agreement(plan, drawn.family)},
        "seconds_per_pair": round((stages.get("pairs", 0.0) + resumed_seconds) / max(1, len(short.graph.pairs)), 4),
    }


def labels(plan: Plan, ids) -> list[int]:
    """Cluster label per id: its group's index, or a label of its own for a singleton."""
    label = {m: g for g, group in enumerate(plan.groups) for m in group}
    own = iter(range(len(plan.groups), len(plan.groups) + len(ids)))
    return [label[i] if i in label else next(own) for i in ids]


def planted_agreement(plan: Plan, family: dict) -> dict:
    pure = sum(len({family[m] for m in g}) == 1 for g in plan.groups)
    return {"groups_within_one_family": pure}


def compare(full_values, short, ids, quantile: float) -> dict:
    """Both plans scored on the full matrix at the full matrix's tau."""
    full_plan = solve_plan(full_values, ids, tau_quantile=quantile, k=3)
    tau = full_plan.tau
    out = {"tau_full": tau}
    variants = {"own_tau": shortlist_tau(short.graph, short.values, quantile), "full_tau": tau}
    for name, short_tau in variants.items():
        plan = solve_plan(short.values, ids, tau=short_tau, k=3)
        scored = plan_objective(plan.groups, full_values, ids, tau)
        same = len(set(plan.groups) & set(full_plan.groups))
        out[name] = {
            "tau": short_tau, "method": plan.method, "objective_on_full": scored,
            "gap": (full_plan.objective - scored) / abs(full_plan.objective) if full_plan.objective else 0.0,
            "adjusted_rand": adjusted_rand_score(labels(full_plan, ids), labels(plan, ids)),
            "identical_groups_fraction": same / max(1, len(full_plan.groups)),
            "groups": len(plan.groups),
        }
    out["full_plan"] = {"method": full_plan.method, "objective": full_plan.objective, "groups": len(full_plan.groups)}
    mask = short.graph.mask
    index = {s: n for n, s in enumerate(ids)}
    grouped_pairs = [(index[a], index[b]) for g in full_plan.groups for x, a in enumerate(g) for b in g[x + 1:]]
    out["full_plan_pairs_among_candidates"] = sum(mask[p] for p in grouped_pairs) / max(1, len(grouped_pairs))
    return out


def shortlist_check(args, work: Path) -> dict:
    """The full matrix and the shortlist on the planted check fleet."""
    drawn = fleet(args.check_scorers, args.family_size, args.check_points, args.seed + 1)
    name = f"check-{args.check_scorers}x{args.check_points}-f{args.family_size}-s{args.seed + 1}"
    return full_against_shortlist(drawn.features, args, work / f"{name}.jsonl")


def beetle_features(fleet_dir: Path) -> dict[str, np.ndarray]:
    """The flow's feature clouds of a built Beetle fold fleet (bench/mergeability.py builds them), one
    per item (``features/<item>/<key>.parquet``), read and checked by the product's reader."""
    from infra.storage import open_store
    from workers.extract import FeatureRef, feature_metadata, read_features

    store = open_store(str(fleet_dir))
    features = {}
    for item in sorted(p for p in (fleet_dir / "features").iterdir() if p.is_dir()):
        files = sorted(item.glob("*.parquet"))
        if len(files) != 1:
            raise SystemExit(f"{item}: expected one feature file, found {len(files)}")
        key = f"features/{item.name}/{files[0].name}"
        meta = feature_metadata(store, key)
        ref = FeatureRef(item.name, key, int(meta["n"]), int(meta["dim"]), meta["checkpoint_hash"],
                         meta["data_hash"], meta["config_hash"])
        features[item.name] = read_features(store, ref)[1]
    return features


def full_against_shortlist(features: dict, args, cache_path: Path) -> dict:
    """Both plans on one fleet's features (cached pairs shared by the full matrix and the shortlist)."""
    cache = JsonlCache(cache_path)
    before = len(cache)
    n = len(features)

    def progress(done: int, _total: int) -> None:
        if done % 500 < args.batch_size or done == _total:
            print(f"  full matrix {done}/{_total}", flush=True)

    with timed() as t_full:
        full = gw_matrix(features, cache=cache, progress=progress, batch_size=args.batch_size)
    short = shortlist_gw(features, args.m, cache=cache)  # every pair is cached by now
    ids = list(full.ids)
    return {
        "scorers": n, "points": [min(map(len, features.values())), max(map(len, features.values()))], "m": args.m,
        "pairs_all": n * (n - 1) // 2, "pairs_shortlisted": len(short.graph.pairs),
        "full_matrix": {"computed_now": full.n_computed, "cached_before": before, **t_full.as_dict()},
        "default_quantile": {"quantile": args.tau_quantile, **compare(full.values, short, ids, args.tau_quantile)},
        "tight_quantile": {"quantile": args.tight_quantile, **compare(full.values, short, ids, args.tight_quantile)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scorers", type=int, default=500)
    parser.add_argument("--points", type=int, default=1000)
    parser.add_argument("--check-scorers", type=int, default=150)
    parser.add_argument("--check-points", type=int, default=128)
    parser.add_argument("--family-size", type=int, default=5)
    parser.add_argument("--m", type=int, default=DEFAULT_CANDIDATES, help="candidate partners per scorer")
    parser.add_argument("--tau-quantile", type=float, default=DEFAULT_TAU_QUANTILE)
    parser.add_argument("--tight-quantile", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="threads for torch and BLAS (0: every core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=".fleetmerge/bench/scale", help="cache directory (resumable)")
    parser.add_argument("--skip-large", action="store_true", help="only the shortlist check")
    parser.add_argument("--skip-check", action="store_true", help="only the large fleet")
    parser.add_argument("--quick", action="store_true", help="smoke run at toy sizes")
    parser.add_argument("--flow-result", default=str(_util._ROOT / "docs" / "results" / "flow_scale.json"),
                        help="bench/flow_scale.py's result file, whose figures are quoted")
    parser.add_argument("--beetle-fleet", action="append", default=[], metavar="DIR",
                        help="also the real-feature check on a built Beetle fold fleet, e.g. "
                             ".fleetmerge/beetle/fold1of3/fleet (repeatable)")
    parser.add_argument("--run-flow", action="store_true",
                        help="run bench/flow_scale.py first, with the product's defaults (about 40 min)")
    args = parser.parse_args()
    if args.run_flow:
        import subprocess
        import sys

        # the flow with the product's defaults (its shortlist size chosen by the fleet's size)
        subprocess.run([sys.executable, str(_util._ROOT / "bench" / "flow_scale.py"), "--out", args.flow_result],
                       check=True)
    if args.quick:
        args.scorers, args.points, args.check_scorers, args.check_points = 40, 64, 30, 48
        args.work = str(Path(args.work) / "quick")
    threads = set_threads(args.threads or None)
    work = Path(args.work)
    result: dict = {}
    if not args.skip_large:
        print(f"large fleet: {args.scorers} x {args.points} x 384, m = {args.m}", flush=True)
        large = plan_500(args, work)
        result["plan_500_seconds"] = large["plan_500_seconds"]
    if not args.skip_check:
        print(f"check fleet: {args.check_scorers} x {args.check_points} x 384", flush=True)
        check = shortlist_check(args, work)
        default = check["default_quantile"]["own_tau"]
        result |= {"shortlist_objective_gap": round(default["gap"], 5),
                   "shortlist_adjusted_rand": round(default["adjusted_rand"], 4),
                   "shortlist_identical_groups_fraction": round(default["identical_groups_fraction"], 4)}
    for fleet_dir in map(Path, args.beetle_fleet):
        print(f"Beetle features: {fleet_dir}", flush=True)
        real = full_against_shortlist(beetle_features(fleet_dir), args, work / f"beetle-{fleet_dir.parent.name}.jsonl")
        default = real["default_quantile"]["own_tau"]
        result.setdefault("beetle_shortlist", {})[fleet_dir.parent.name] = {
            "objective_gap": round(default["gap"], 5), "adjusted_rand": round(default["adjusted_rand"], 4),
            "identical_groups_fraction": round(default["identical_groups_fraction"], 4),
            "tight_quantile_gap": round(real["tight_quantile"]["own_tau"]["gap"], 5), "detail": real}
    flow = Path(args.flow_result)
    if flow.is_file() and not args.quick:
        curve = json.loads(flow.read_text())
        largest = max(curve["sizes"])
        result |= {f"flow_seconds_n{largest}": curve[f"flow_seconds_n{largest}"],
                   "growth_exponents": curve["growth_exponents"],
                   "flow_source": {"file": str(flow), "commit": curve.get("commit"),
                                   "config": curve.get("config")}}
    if not args.skip_large:
        result["large"] = large
    if not args.skip_check:
        result["check"] = check
    emit({**result, "threads": threads, "quick": args.quick, "machine": machine()})


if __name__ == "__main__":
    main()
