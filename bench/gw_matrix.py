"""Benchmark: the fleet's GW matrix (ours, with lower-bound skipping) against POT's exact solver.

    python bench/gw_matrix.py            # 60 models x 500 points, d = 384
    python bench/gw_matrix.py --quick    # smoke run (12 models x 100 points)

Fleet: the planted-cluster generator (gw/synthetic.py), ``--families`` x ``--per-family`` models.

* ours: ``gw.matrix.gw_matrix(features, skip_tau_quantile=0.25)``, timed end to end from the raw
  features (validation, hashing, preparation once per cloud, lower bounds, batched solves).
* POT exact (``ot.gromov.gromov_wasserstein2`` on the same normalised costs) on a seeded sample of
  pairs (it would take hours for all of them); its pairs per second are extrapolated from the sample.
* ``plan_unchanged``: the same matrix without skipping is computed too (timed, but not used for the
  ratio); the plans from ``gw.plan.solve_plan`` (tau = 0.25-quantile, k = 3) of both matrices must
  be identical, and the skipping run's tau must equal the full matrix's quantile.

Ratios on CPU seconds (time.process_time, all threads of this process), with the same thread
count for torch and BLAS (``--threads``, default 1: on this shared 2-core machine, idle worker
threads spin and inflate CPU seconds depending on the neighbours' load); wall seconds are reported
too. Prints one JSON object as the last line.
"""

from __future__ import annotations

import os

# Idle OpenMP workers must sleep, not spin: spinning threads burn CPU and starve the main thread on
# a shared machine (set before torch loads; POT's side runs on OpenBLAS threads, unaffected).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import warnings  # noqa: E402

import _util  # noqa: E402,F401  (puts the repository on sys.path)
import numpy as np  # noqa: E402

from _util import add_threads_argument, emit, machine, ratio, set_threads, timed  # noqa: E402
from gw.clouds import prepare  # noqa: E402
from gw.matrix import gw_matrix  # noqa: E402
from gw.plan import solve_plan  # noqa: E402
from gw.solvers import exact_gw  # noqa: E402
from gw.synthetic import planted_fleet  # noqa: E402

QUANTILE = 0.25


def pot_sample(features: dict, n_pairs: int, seed: int) -> dict:
    """POT exact on a seeded sample of pairs, from raw features like ours."""
    ids = sorted(features)
    all_pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    rng = np.random.default_rng(seed)
    sample = [all_pairs[k] for k in rng.choice(len(all_pairs), size=min(n_pairs, len(all_pairs)), replace=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with timed() as t:
            for a, b in sample:
                exact_gw(prepare(features[a], device="cpu"), prepare(features[b], device="cpu"))
    return {"pairs": len(sample), **t.as_dict(),
            "pairs_per_second_cpu": len(sample) / t.cpu, "pairs_per_second_wall": len(sample) / t.wall}


def warm_up() -> None:
    """One tiny solve per side, so no import or first-call cost lands in a timing."""
    fleet = planted_fleet(2, 1, 70, dim=8, seed=99)
    gw_matrix(fleet.features)
    a, b = (prepare(x, device="cpu") for x in fleet.features.values())
    exact_gw(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", type=int, default=20)
    parser.add_argument("--per-family", type=int, default=3)
    parser.add_argument("--n-points", type=int, default=500)
    parser.add_argument("--pot-pairs", type=int, default=24)
    add_threads_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    if args.quick:
        args.families, args.per_family, args.n_points, args.pot_pairs = 4, 3, 100, 6
    threads = set_threads(args.threads)
    warm_up()
    fleet = planted_fleet(args.families, args.per_family, args.n_points, dim=384, seed=args.seed)
    n_models = len(fleet.ids)
    n_pairs = n_models * (n_models - 1) // 2

    with timed() as t_ours:
        skipped = gw_matrix(fleet.features, skip_tau_quantile=QUANTILE)
    with timed() as t_full:
        full = gw_matrix(fleet.features)
    pot = pot_sample(fleet.features, args.pot_pairs, args.seed)

    plan_skip = solve_plan(skipped.values, skipped.ids, tau_quantile=QUANTILE)
    plan_skip_tau = solve_plan(skipped.values, skipped.ids, tau=skipped.tau)
    plan_full = solve_plan(full.values, full.ids, tau_quantile=QUANTILE)
    tau_full = float(np.quantile(full.values[np.triu_indices(n_models, 1)], QUANTILE))
    planted = {tuple(sorted(fleet.members(f))) for f in range(args.families)}
    ours_pps = n_pairs / t_ours.cpu
    results = list(full.results.values())
    emit({
        "pairs_per_second": round(ours_pps, 2),
        "speedup_vs_pot_exact": ratio(ours_pps, pot["pairs_per_second_cpu"]),
        "skipped_fraction": round(skipped.skipped_fraction, 4),
        "plan_unchanged": plan_skip.groups == plan_full.groups and plan_skip_tau.groups == plan_full.groups,
        "timing_basis": "cpu seconds (time.process_time); pairs per second = all pairs of the matrix / our time",
        "pairs_per_second_wall": round(n_pairs / t_ours.wall, 2),
        "speedup_vs_pot_exact_wall": ratio(n_pairs / t_ours.wall, pot["pairs_per_second_wall"]),
        "speedup_without_skipping": ratio(n_pairs / t_full.cpu, pot["pairs_per_second_cpu"]),
        "tau": skipped.tau,
        "tau_equals_full_quantile": skipped.tau == tau_full,
        "plan_recovers_planted_families": set(plan_full.groups) == planted,
        "models": n_models,
        "pairs": n_pairs,
        "pairs_computed": skipped.n_computed,
        "n_points": args.n_points,
        "dim": 384,
        "ours": t_ours.as_dict(),
        "ours_without_skipping": t_full.as_dict(),
        "pot_exact_sample": pot,
        "entropic_converged_fraction": round(float(np.mean([r.converged for r in results])), 4),
        "entropic_max_marginal_error": max(r.marginal_error for r in results),
        "entropic_mean_iterations": round(float(np.mean([r.iterations for r in results])), 2),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
