"""The merge plan: which scorers share an encoder (docs/architecture.md §4.3).

Given a symmetric distance matrix ``D`` between scorers, a threshold ``tau`` and a maximum group size
``k``, choose disjoint groups that are cliques under ``tau`` (every pair inside a group has
``D < tau``) and maximise ``sum_groups sum_{i<j in g} (tau - D_ij)``. Every pair's weight is positive,
so the solver always prefers grouping when it can; the threshold decides what "compatible" means.

Rules, and the choices made where the issue left them open:

* ``NaN`` / ``inf`` distances mean "unknown, never group".
* A fleet has one base model (the manifest's ``base_model``), so every pair may share a group as far
  as the base goes; there are no pinned or forbidden pairs (neither the CLI nor the manifest has a way
  to say them).

Solvers (recorded in :attr:`Plan.method`):

* ``"matching"``: ``k == 2`` is a maximum-weight matching (networkx's blossom algorithm, per
  connected component, on integer-scaled weights so it runs in exact arithmetic). Always exact;
  it costs O(V^3) in the scorers of a component (timings: docs/performance.md).
* ``"milp"``: otherwise, exact set packing over every candidate group (the cliques of size <= k)
  with ``scipy.optimize.milp`` (HiGHS), while the candidates number at most ``max_candidates``.
  When HiGHS hits ``milp_time_limit``, the better of its incumbent and the heuristic is used and
  the method reads ``"milp(time-limit)"``.
* ``"greedy+local"``: beyond that (or when asked), greedy agglomeration, local search (relocate,
  swap and two-step chain moves), then a large-neighbourhood search that re-solves groups of about
  16 scorers exactly with the MILP. On n = 30..100 it reached 93-100 % of the exact objective
  (uniformly random D is the hard case; clustered D, like GW distances between model families, gave
  98-100 %).

All solvers are deterministic (the same inputs give the same plan), except that where HiGHS stops at
its time limit the outcome depends on the machine's speed; the method then says so.

Modules: ``types`` (:class:`Plan`), ``problem`` (input checks, the threshold, the problem on units,
objective and rule checks), ``exact`` (matching, set-packing MILP), ``heuristic`` (greedy,
local and neighbourhood search), ``solve`` (:func:`solve_plan`).

Pure math: numpy, scipy, networkx; no I/O.
"""

from .problem import (
    _check_ids,  # gw.baselines checks ids the same way
    allowed_pairs,
    check_distance_matrix,
    plan_from_groups,
    plan_objective,
    plan_violations,
    threshold_from_quantile,
)
from .solve import DEFAULT_MAX_CANDIDATES, DEFAULT_MILP_TIME_LIMIT, DEFAULT_TAU_QUANTILE, solve_plan
from .types import Plan

__all__ = [
    "DEFAULT_MAX_CANDIDATES",
    "DEFAULT_MILP_TIME_LIMIT",
    "DEFAULT_TAU_QUANTILE",
    "Plan",
    "allowed_pairs",
    "check_distance_matrix",
    "plan_from_groups",
    "plan_objective",
    "plan_violations",
    "solve_plan",
    "threshold_from_quantile",
]
