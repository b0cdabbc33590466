"""The merge plan: which scorers share an encoder (DESIGN §5, "Plan").

Given a symmetric distance matrix ``D`` between scorers, a threshold ``tau`` and a maximum group size
``k``, choose disjoint groups that are cliques under ``tau`` (every pair inside a group has
``D < tau``) and maximise ``sum_groups sum_{i<j in g} (tau - D_ij)``. Every pair's weight is positive,
so the solver always prefers grouping when it can; the threshold decides what "compatible" means.

Rules, and the choices made where the issue left them open:

* ``NaN`` / ``inf`` distances mean "unknown, never group".
* Scorers with different base models never share a group (``base_models``: id -> base).
* ``forbidden`` pairs never share a group.
* ``pinned`` pairs must end in the same group; pins are transitive, so pinned pairs form pinned
  components that always stay together. A pin overrides the threshold for the pairs inside its
  component (a person's explicit decision beats ``D >= tau``; those pairs then add ``tau - D``, possibly
  negative, to the objective). A pin is an error when it cannot be honoured: a component larger than
  ``k``, two bases, a forbidden pair, or a non-finite distance inside the component (its objective
  would be undefined; provide a distance).

Solvers (recorded in :attr:`Plan.method`):

* ``"matching"``: ``k == 2`` is a maximum-weight matching (networkx's blossom algorithm, per
  connected component, on integer-scaled weights so it runs in exact arithmetic). Always exact;
  it costs O(V^3): about 13 s for 500 scorers and 2 min for 1,000 on one core here.
* ``"milp"``: otherwise, exact set packing over every candidate group (the cliques of size <= k)
  with ``scipy.optimize.milp`` (HiGHS), while the candidates number at most ``max_candidates``.
  When HiGHS hits ``milp_time_limit``, the better of its incumbent and the heuristic is used and
  the method reads ``"milp(time-limit)"``.
* ``"greedy+local"``: beyond that (or when asked), greedy agglomeration, local search (relocate,
  swap and two-step chain moves), then a large-neighbourhood search that re-solves groups of about
  16 scorers exactly with the MILP. On n = 30..100 it reached 93-100 % of the exact objective
  (uniformly random D is the hard case; clustered D, like GW distances between model families, gave
  98-100 %); 1,000 scorers take about 3-10 s.

All solvers are deterministic (the same inputs give the same plan), except that where HiGHS stops at
its time limit the outcome depends on the machine's speed; the method then says so.

Pure math: numpy, scipy, networkx; no I/O.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_MAX_CANDIDATES = 10_000
"""Largest number of candidate groups handed to the exact set-packing MILP."""

DEFAULT_MILP_TIME_LIMIT = 30.0
"""Seconds HiGHS may spend on one MILP before the heuristic result is used instead."""

DEFAULT_TAU_QUANTILE = 1.0
"""When no tau is given, tau is this quantile of the distances (the one default: the flow and the CLI read it).

1.0 (every pair but the farthest may share a group): on 3-fold Beetle, gated, quantile 0.3 against 1.0
was +0.0014 test macro F1 (95 % CI [−0.0087, +0.0111], paired over item × fold: not told apart) at
1.95x against 2.23x storage, and the GW plan was not told apart from a random one either; so the gate,
not the threshold, is what keeps quality (docs/results/defaults.md)."""

_SOLVER_METHODS = ("auto", "matching", "milp", "greedy")

# How many of a unit's best target groups the local search's chain move tries.
_CHAIN_BRANCHING = 3

# Large-neighbourhood search: units re-solved together exactly, candidate cap and rounds.
_LNS_NEIGHBOURHOOD = 16
_LNS_MAX_CANDIDATES = 2_000
_LNS_MAX_ROUNDS = 3

# Weights of the matching are scaled to integers below this bound (networkx's blossom algorithm is
# exact on integers; floats may cost a slightly suboptimal matching).
_MATCHING_INT_SCALE = 2**40


# --------------------------------------------------------------------------------------------------
# The plan object
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A grouping of scorers: disjoint groups of size >= 2, plus the ids left on their own.

    Normalised on construction: ids sorted inside each group, groups sorted, singletons sorted, and
    ``stability`` keyed by those sorted groups.
    """

    groups: tuple[tuple[str, ...], ...]
    singletons: tuple[str, ...]
    method: str
    tau: float | None = None
    objective: float | None = None
    stability: Mapping[tuple[str, ...], float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        groups = tuple(sorted(tuple(sorted(str(i) for i in g)) for g in self.groups))
        singletons = tuple(sorted(str(i) for i in self.singletons))
        for group in groups:
            if len(group) < 2:
                raise ValueError(f"Plan group {group!r} has fewer than 2 members; list it in singletons")
        seen: set[str] = set()
        for member in [m for g in groups for m in g] + list(singletons):
            if member in seen:
                raise ValueError(f"Plan lists id {member!r} more than once")
            seen.add(member)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "singletons", singletons)
        object.__setattr__(self, "method", str(self.method))
        if self.tau is not None:
            object.__setattr__(self, "tau", float(self.tau))
        if self.objective is not None:
            object.__setattr__(self, "objective", float(self.objective))
        if self.stability is not None:
            stability = {tuple(sorted(str(i) for i in g)): float(s) for g, s in self.stability.items()}
            unknown = set(stability) - set(groups)
            if unknown:
                raise ValueError(f"Plan stability names groups that are not in the plan: {sorted(unknown)}")
            for group, share in stability.items():
                if not 0.0 <= share <= 1.0:
                    raise ValueError(f"Plan stability of {group!r} is {share}; expected a share in [0, 1]")
            object.__setattr__(self, "stability", stability)

    @property
    def ids(self) -> tuple[str, ...]:
        """Every id the plan covers, sorted."""
        return tuple(sorted([m for g in self.groups for m in g] + list(self.singletons)))

    @property
    def n_groups(self) -> int:
        """Number of multi-member groups."""
        return len(self.groups)

    def group_of(self, scorer_id: str) -> tuple[str, ...]:
        """The group holding ``scorer_id`` (a 1-tuple for a singleton)."""
        for group in self.groups:
            if scorer_id in group:
                return group
        if scorer_id in self.singletons:
            return (scorer_id,)
        raise KeyError(f"id {scorer_id!r} is not in the plan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists and plain floats; stability as a list of {group, share})."""
        return {
            "groups": [list(g) for g in self.groups],
            "singletons": list(self.singletons),
            "method": self.method,
            "tau": self.tau,
            "objective": self.objective,
            "stability": (
                None
                if self.stability is None
                else [{"group": list(g), "share": s} for g, s in sorted(self.stability.items())]
            ),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        missing = {"groups", "singletons", "method"} - set(d)
        if missing:
            raise ValueError(f"Plan dict lacks keys {sorted(missing)}")
        stability = d.get("stability")
        return cls(
            groups=tuple(tuple(g) for g in d["groups"]),
            singletons=tuple(d["singletons"]),
            method=d["method"],
            tau=d.get("tau"),
            objective=d.get("objective"),
            stability=None if stability is None else {tuple(e["group"]): e["share"] for e in stability},
        )


def plan_from_groups(
    groups: Iterable[Iterable[str]],
    ids: Sequence[str],
    method: str,
    *,
    D: np.ndarray | None = None,
    tau: float | None = None,
) -> Plan:
    """A :class:`Plan` over ``ids`` from its multi-member groups (everyone else a singleton).

    With ``D`` and ``tau`` the objective is filled in.
    """
    ids = _check_ids(ids)
    groups = [tuple(g) for g in groups if len(tuple(g)) >= 2]
    known = set(ids)
    for group in groups:
        for member in group:
            if member not in known:
                raise ValueError(f"group {group!r} names id {member!r}, which is not among the ids")
    grouped = {m for g in groups for m in g}
    singletons = tuple(i for i in ids if i not in grouped)
    objective = None
    if D is not None and tau is not None:
        objective = plan_objective(groups, D, ids, tau)
    return Plan(tuple(groups), singletons, method, tau=tau, objective=objective)


# --------------------------------------------------------------------------------------------------
# Input checks and the threshold
# --------------------------------------------------------------------------------------------------


def _check_ids(ids: Sequence[str]) -> tuple[str, ...]:
    ids = tuple(str(i) for i in ids)
    if len(set(ids)) != len(ids):
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"ids contain duplicates: {duplicates}")
    return ids


def check_distance_matrix(D: np.ndarray, ids: Sequence[str] | None = None, *, name: str = "D") -> np.ndarray:
    """Validate a distance matrix and return it as float64.

    Square, 2-D, symmetric (NaN where its mirror is NaN), no negative entries; ``NaN`` and ``+inf``
    are allowed and mean "unknown / never group". The diagonal is ignored.
    """
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {D.shape}")
    if ids is not None and len(ids) != D.shape[0]:
        raise ValueError(f"{name} is {D.shape[0]}x{D.shape[1]} but {len(ids)} ids were given")
    off = ~np.eye(D.shape[0], dtype=bool)
    values = D[off]
    if np.any(values[~np.isnan(values)] < 0):
        raise ValueError(f"{name} has negative off-diagonal entries; distances must be >= 0 (NaN/inf = unknown)")
    same = (D == D.T) | (np.isnan(D) & np.isnan(D.T))
    finite = np.isfinite(D) & np.isfinite(D.T)
    close = np.isclose(D, D.T, rtol=1e-6, atol=1e-9) & finite
    asymmetric = off & ~(same | close)
    if asymmetric.any():
        i, j = map(int, np.argwhere(asymmetric)[0])
        raise ValueError(f"{name} is not symmetric: {name}[{i},{j}]={D[i, j]!r} but {name}[{j},{i}]={D[j, i]!r}")
    return D


def threshold_from_quantile(D: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the finite off-diagonal distances (each unordered pair counted once)."""
    if not 0.0 <= quantile <= 1.0 or math.isnan(quantile):
        raise ValueError(f"tau_quantile must be in [0, 1], got {quantile}")
    D = check_distance_matrix(D)
    upper = D[np.triu_indices(D.shape[0], k=1)]
    finite = upper[np.isfinite(upper)]
    if finite.size == 0:
        raise ValueError("cannot take a quantile threshold: D has no finite off-diagonal distance")
    return float(np.quantile(finite, quantile))


def _resolve_tau(D: np.ndarray, tau: float | None, tau_quantile: float) -> float | None:
    if tau is not None:
        tau = float(tau)
        if math.isnan(tau):
            raise ValueError("tau is NaN")
        return tau
    upper = D[np.triu_indices(D.shape[0], k=1)]
    if not np.isfinite(upper).any():
        return None  # nothing can be grouped anyway
    return threshold_from_quantile(D, tau_quantile)


# --------------------------------------------------------------------------------------------------
# The problem on "units": pinned components that always travel together
# --------------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    ids: tuple[str, ...]
    k: int
    units: list[tuple[int, ...]]  # indices into ids; pinned components and singletons
    unit_size: np.ndarray  # [U] ints
    unit_weight: np.ndarray  # [U, U] sum of (tau - D) across two units; 0 on the diagonal
    unit_allowed: np.ndarray  # [U, U] bool: the two units may share a group; False on the diagonal


def _pair_index(ids: tuple[str, ...], pairs: Iterable[tuple[str, str]], what: str) -> list[tuple[int, int]]:
    position = {s: i for i, s in enumerate(ids)}
    out = []
    for pair in pairs:
        pair = tuple(pair)
        if len(pair) != 2:
            raise ValueError(f"{what} pair {pair!r} must have exactly two ids")
        a, b = pair
        for member in (a, b):
            if member not in position:
                raise ValueError(f"{what} pair {pair!r} names unknown id {member!r}")
        if a == b:
            raise ValueError(f"{what} pair {pair!r} pairs an id with itself")
        out.append((position[a], position[b]))
    return out


def _components(n: int, edges: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return sorted(tuple(sorted(m)) for m in members.values())


def allowed_pairs(
    D: np.ndarray,
    ids: Sequence[str],
    tau: float | None,
    *,
    base_models: Mapping[str, str] | None = None,
    forbidden: Iterable[tuple[str, str]] = (),
) -> np.ndarray:
    """Boolean [n, n]: pairs that may share a group (finite ``D < tau``, same base, not forbidden)."""
    ids = _check_ids(ids)
    D = check_distance_matrix(D, ids)
    n = len(ids)
    with np.errstate(invalid="ignore"):
        allowed = np.isfinite(D) & (D < tau) if tau is not None else np.zeros((n, n), dtype=bool)
    allowed &= _same_base(ids, base_models)
    for a, b in _pair_index(ids, forbidden, "forbidden"):
        allowed[a, b] = allowed[b, a] = False
    np.fill_diagonal(allowed, False)
    return allowed


def _same_base(ids: tuple[str, ...], base_models: Mapping[str, str] | None) -> np.ndarray:
    n = len(ids)
    if base_models is None:
        return np.ones((n, n), dtype=bool)
    missing = [i for i in ids if i not in base_models]
    if missing:
        raise ValueError(f"base_models has no entry for ids {missing}")
    bases = np.array([str(base_models[i]) for i in ids], dtype=object)
    return bases[:, None] == bases[None, :]


def _build_problem(
    D: np.ndarray,
    ids: tuple[str, ...],
    tau: float | None,
    k: int,
    base_models: Mapping[str, str] | None,
    pinned: Iterable[tuple[str, str]],
    forbidden: Iterable[tuple[str, str]],
) -> _Problem:
    n = len(ids)
    forbidden_idx = _pair_index(ids, forbidden, "forbidden")
    pinned_idx = _pair_index(ids, pinned, "pinned")
    allowed = allowed_pairs(D, ids, tau, base_models=base_models, forbidden=forbidden)
    same_base = _same_base(ids, base_models)
    forbidden_set = {frozenset(p) for p in forbidden_idx}

    units = _components(n, pinned_idx)
    for unit in units:
        if len(unit) < 2:
            continue
        names = [ids[i] for i in unit]
        if len(unit) > k:
            raise ValueError(f"pinned pairs join {names} into one group of {len(unit)} > k={k}")
        for x in range(len(unit)):
            for y in range(x + 1, len(unit)):
                a, b = unit[x], unit[y]
                if not same_base[a, b]:
                    raise ValueError(
                        f"pinned ids {ids[a]!r} and {ids[b]!r} (group {names}) have different base models"
                    )
                if frozenset((a, b)) in forbidden_set:
                    raise ValueError(f"ids {ids[a]!r} and {ids[b]!r} are both pinned (group {names}) and forbidden")
                if not np.isfinite(D[a, b]):
                    raise ValueError(
                        f"pinned ids {ids[a]!r} and {ids[b]!r} (group {names}) have unknown distance "
                        f"{D[a, b]}; give a finite distance to pin them"
                    )
                allowed[a, b] = allowed[b, a] = True  # the pin overrides the threshold

    weight = np.where(np.isfinite(D), (tau if tau is not None else 0.0) - D, 0.0)
    np.fill_diagonal(weight, 0.0)
    n_units = len(units)
    membership = np.zeros((n_units, n), dtype=np.float64)
    for u, unit in enumerate(units):
        membership[u, list(unit)] = 1.0
    unit_weight = membership @ weight @ membership.T
    blocked = membership @ (~allowed).astype(np.float64) @ membership.T
    unit_allowed = blocked == 0
    np.fill_diagonal(unit_weight, 0.0)
    np.fill_diagonal(unit_allowed, False)
    # Units too big to join anything stay alone.
    sizes = np.array([len(u) for u in units], dtype=np.int64)
    unit_allowed &= (sizes[:, None] + sizes[None, :]) <= k
    return _Problem(ids, k, units, sizes, unit_weight, unit_allowed)


# --------------------------------------------------------------------------------------------------
# Objective and validity
# --------------------------------------------------------------------------------------------------


def plan_objective(groups: Iterable[Iterable[str]], D: np.ndarray, ids: Sequence[str], tau: float) -> float:
    """``sum_groups sum_{i<j in g} (tau - D_ij)``; non-finite distances make it ``-inf``."""
    ids = _check_ids(ids)
    D = np.asarray(D, dtype=np.float64)
    position = {s: i for i, s in enumerate(ids)}
    total = 0.0
    for group in groups:
        index = [position[m] for m in group]
        for x in range(len(index)):
            for y in range(x + 1, len(index)):
                d = D[index[x], index[y]]
                total += float(tau - d) if np.isfinite(d) else -math.inf
    return total


def plan_violations(
    plan: Plan,
    D: np.ndarray,
    ids: Sequence[str],
    *,
    tau: float,
    k: int,
    base_models: Mapping[str, str] | None = None,
    pinned: Iterable[tuple[str, str]] = (),
    forbidden: Iterable[tuple[str, str]] = (),
) -> list[str]:
    """Human-readable reasons why ``plan`` breaks the rules of :func:`solve_plan` (empty when valid).

    Pairs inside a pinned component are exempt from the threshold, as in :func:`solve_plan`.
    """
    ids = _check_ids(ids)
    problems: list[str] = []
    if set(plan.ids) != set(ids):
        problems.append(f"plan covers {sorted(set(plan.ids) ^ set(ids))} differently from the ids")
    allowed = allowed_pairs(D, ids, tau, base_models=base_models, forbidden=forbidden)
    position = {s: i for i, s in enumerate(ids)}
    pinned_idx = _pair_index(ids, pinned, "pinned")
    component_of = {}
    for c, unit in enumerate(_components(len(ids), pinned_idx)):
        for i in unit:
            component_of[i] = c
    forbidden_set = {frozenset(p) for p in _pair_index(ids, forbidden, "forbidden")}
    for group in plan.groups:
        if len(group) > k:
            problems.append(f"group {group} has {len(group)} > k={k} members")
        index = [position[m] for m in group if m in position]
        for x in range(len(index)):
            for y in range(x + 1, len(index)):
                a, b = index[x], index[y]
                if allowed[a, b]:
                    continue
                if component_of[a] == component_of[b] and frozenset((a, b)) not in forbidden_set:
                    continue
                problems.append(f"group {group} joins {ids[a]!r} and {ids[b]!r}, which may not share a group")
    for a, b in pinned_idx:
        if plan.group_of(ids[a]) != plan.group_of(ids[b]):
            problems.append(f"pinned ids {ids[a]!r} and {ids[b]!r} are in different groups")
    return problems


# --------------------------------------------------------------------------------------------------
# Solvers on units. Each returns a list of groups, each a list of unit indices (size-1 groups allowed).
# --------------------------------------------------------------------------------------------------


def _solve_matching(problem: _Problem) -> list[list[int]]:
    import networkx as nx

    n_units = len(problem.units)
    free = [u for u in range(n_units) if problem.unit_size[u] == 1]
    graph = nx.Graph()
    graph.add_nodes_from(free)
    free_arr = np.array(free, dtype=np.int64)
    if free_arr.size:
        sub_allowed = problem.unit_allowed[np.ix_(free_arr, free_arr)]
        sub_weight = problem.unit_weight[np.ix_(free_arr, free_arr)]
        positive = sub_weight[sub_allowed]
        scale = _MATCHING_INT_SCALE / float(positive.max()) if positive.size else 1.0
        for x, y in zip(*np.nonzero(np.triu(sub_allowed, 1))):
            graph.add_edge(int(free_arr[x]), int(free_arr[y]), weight=max(1, int(round(sub_weight[x, y] * scale))))
    # Blossom costs O(V^3); components are independent, so solve each alone.
    matching: set[tuple[int, int]] = set()
    for component in nx.connected_components(graph):
        if len(component) >= 2:
            matching |= nx.max_weight_matching(graph.subgraph(component), maxcardinality=False, weight="weight")
    matched = {u for edge in matching for u in edge}
    groups = [sorted(edge) for edge in matching]
    groups += [[u] for u in range(n_units) if u not in matched]
    return groups


def _enumerate_candidates(problem: _Problem, limit: int) -> list[tuple[int, ...]] | None:
    """Every clique of units whose sizes sum to 2..k, or ``None`` once there are more than ``limit``."""
    k = problem.k
    sizes = problem.unit_size
    allowed = problem.unit_allowed
    neighbours = [np.flatnonzero(allowed[u]) for u in range(len(problem.units))]
    candidates: list[tuple[int, ...]] = []

    def extend(clique: tuple[int, ...], common: np.ndarray, size: int) -> bool:
        for v in common:
            v = int(v)
            if size + sizes[v] > k:
                continue
            grown = clique + (v,)
            candidates.append(grown)
            if len(candidates) > limit:
                return False
            later = common[common > v]
            later = later[allowed[v, later]]
            if later.size and not extend(grown, later, size + int(sizes[v])):
                return False
        return True

    for u in range(len(problem.units)):
        if sizes[u] >= 2:
            candidates.append((u,))  # a pinned component may stay as it is
        later = neighbours[u][neighbours[u] > u]
        if not extend((u,), later, int(sizes[u])):
            return None
        if len(candidates) > limit:
            return None
    return candidates


def _solve_milp(
    problem: _Problem, candidates: list[tuple[int, ...]], time_limit: float | None
) -> tuple[list[list[int]], bool]:
    """Exact set packing over ``candidates``; returns the groups and whether optimality was proven."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    n_units = len(problem.units)
    if not candidates:
        return [[u] for u in range(n_units)], True
    weights = np.array(
        [sum(problem.unit_weight[a, b] for i, a in enumerate(c) for b in c[i + 1 :]) for c in candidates]
    )
    rows = [u for c in candidates for u in c]
    cols = [j for j, c in enumerate(candidates) for _ in c]
    A = csr_array((np.ones(len(rows)), (rows, cols)), shape=(n_units, len(candidates)))
    # Pinned components must be covered exactly once; everybody else at most once.
    lower = (problem.unit_size >= 2).astype(np.float64)
    options: dict[str, Any] = {"mip_rel_gap": 0.0}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    result = milp(
        c=-weights,
        integrality=np.ones(len(candidates)),
        bounds=Bounds(0, 1),
        constraints=LinearConstraint(A, lower, np.ones(n_units)),
        options=options,
    )
    if result.x is None:
        return [], False
    chosen = [candidates[j] for j in np.flatnonzero(result.x > 0.5)]
    covered = {u for c in chosen for u in c}
    groups = [list(c) for c in chosen] + [[u] for u in range(n_units) if u not in covered]
    return groups, bool(result.status == 0)


def _solve_greedy(problem: _Problem) -> list[list[int]]:
    """Agglomerate: repeatedly merge the two clusters whose union gains the most weight."""
    n_units = len(problem.units)
    k = problem.k
    gain = problem.unit_weight.copy()
    compatible = problem.unit_allowed.copy()
    size = problem.unit_size.astype(np.int64).copy()
    members: list[list[int]] = [[u] for u in range(n_units)]
    alive = np.ones(n_units, dtype=bool)
    # Max-heap of (-gain, a, b, version_a, version_b); stale entries are skipped on pop.
    version = np.zeros(n_units, dtype=np.int64)
    heap: list[tuple[float, int, int, int, int]] = []
    for a, b in zip(*np.nonzero(np.triu(compatible, 1))):
        heap.append((-float(gain[a, b]), int(a), int(b), 0, 0))
    heapq.heapify(heap)
    while heap:
        neg, a, b, va, vb = heapq.heappop(heap)
        if not (alive[a] and alive[b]) or version[a] != va or version[b] != vb:
            continue
        if size[a] + size[b] > k or not compatible[a, b] or -neg <= 0:
            continue
        # Merge b into a.
        members[a] += members[b]
        members[b] = []
        alive[b] = False
        size[a] += size[b]
        gain[a] += gain[b]
        gain[:, a] = gain[a]
        compatible[a] &= compatible[b]
        compatible[:, a] = compatible[a]
        compatible[b] = False
        compatible[:, b] = False
        version[a] += 1
        if size[a] >= k:
            continue
        partners = np.flatnonzero(compatible[a] & alive & (size + size[a] <= k))
        for c in partners:
            c = int(c)
            x, y = (a, c) if a < c else (c, a)
            heapq.heappush(heap, (-float(gain[a, c]), x, y, int(version[x]), int(version[y])))
    return [members[u] for u in range(n_units) if alive[u]]


def _local_search(problem: _Problem, groups: list[list[int]], max_passes: int = 50) -> list[list[int]]:
    """Improve a valid grouping by relocating one unit or swapping two units between groups.

    Every accepted move strictly raises the objective, so the search ends; ``max_passes`` bounds it.
    """
    n_units = len(problem.units)
    k = problem.k
    W = problem.unit_weight
    blocked = (~problem.unit_allowed).astype(np.int64)
    np.fill_diagonal(blocked, 0)
    size = problem.unit_size.astype(np.int64)
    # Group labels live in 0..n_units-1; there are never more groups than units, so a unit that
    # leaves a group always finds an empty label to live under.
    label = np.empty(n_units, dtype=np.int64)
    for g, group in enumerate(groups):
        label[group] = g
    group_size = np.bincount(label, weights=size, minlength=n_units).astype(np.int64)
    same = label[:, None] == label[None, :]
    current = (W * same).sum(axis=1)  # each unit's weight to the rest of its group
    eps = 1e-12 * max(1.0, float(np.abs(W).max(initial=0.0)))

    def move(u: int, target: int) -> None:
        old = int(label[u])
        in_old = label == old
        in_old[u] = False
        current[in_old] -= W[in_old, u]
        in_new = label == target
        current[in_new] += W[in_new, u]
        current[u] = W[u, in_new].sum()
        label[u] = target
        group_size[old] -= size[u]
        group_size[target] += size[u]

    def best_relocation(u: int) -> tuple[float, int]:
        """The best gain from moving u elsewhere (another group, or alone), and its target label."""
        g = int(label[u])
        to_group = np.bincount(label, weights=W[u], minlength=n_units)
        conflicts = np.bincount(label, weights=blocked[u], minlength=n_units)
        feasible = (conflicts == 0) & (group_size + size[u] <= k) & (group_size > 0)
        feasible[g] = False
        delta = np.where(feasible, to_group - current[u], -np.inf)
        best = int(np.argmax(delta))
        if group_size[g] > size[u] and -current[u] > delta[best]:
            return float(-current[u]), int(np.flatnonzero(group_size == 0)[0])
        return float(delta[best]), best

    for _ in range(max_passes):
        improved = False
        for u in range(n_units):
            g = int(label[u])
            gain, target = best_relocation(u)
            if gain > eps:
                move(u, target)
                improved = True
                continue
            # Swap u (in g) with v (in another group h): both relocations may be infeasible alone.
            to_group = np.bincount(label, weights=W[u], minlength=n_units)
            conflicts = np.bincount(label, weights=blocked[u], minlength=n_units)
            others = np.flatnonzero(label != g)
            if others.size == 0:
                continue
            h = label[others]
            mates = np.flatnonzero(label == g)
            mates = mates[mates != u]
            v_to_g = W[np.ix_(others, mates)].sum(axis=1)
            v_conflicts_g = blocked[np.ix_(others, mates)].sum(axis=1)
            u_to_h = to_group[h] - W[u, others]
            u_conflicts_h = conflicts[h] - blocked[u, others]
            fits = (group_size[h] - size[others] + size[u] <= k) & (group_size[g] - size[u] + size[others] <= k)
            ok = fits & (v_conflicts_g == 0) & (u_conflicts_h == 0)
            ok &= (group_size[h] > size[others]) | (group_size[g] > size[u])  # two lone units: no-op
            swap_delta = np.where(ok, u_to_h + v_to_g - current[u] - current[others], -np.inf)
            j = int(np.argmax(swap_delta))
            if swap_delta[j] > eps:
                v = int(others[j])
                hv = int(label[v])
                move(u, hv)
                move(v, g)
                improved = True
                continue
            # Chain: u moves to one of its best groups at a loss, then a former mate moves on at a gain.
            if mates.size == 0:
                continue
            feasible = (conflicts == 0) & (group_size + size[u] <= k) & (group_size > 0)
            feasible[g] = False
            targets = np.flatnonzero(feasible)
            first_gain = to_group[targets] - current[u]
            for target in targets[np.argsort(-first_gain, kind="stable")[:_CHAIN_BRANCHING]]:
                target = int(target)
                loss = float(to_group[target] - current[u])
                move(u, target)
                chained = max(((*best_relocation(int(w)), int(w)) for w in mates), key=lambda t: t[0])
                if loss + chained[0] > eps:
                    move(chained[2], chained[1])
                    improved = True
                    break
                move(u, g)
        if not improved:
            break
    out: dict[int, list[int]] = {}
    for u in range(n_units):
        out.setdefault(int(label[u]), []).append(u)
    return list(out.values())


def _subproblem(problem: _Problem, units: np.ndarray) -> _Problem:
    return _Problem(
        ids=problem.ids,
        k=problem.k,
        units=[problem.units[u] for u in units],
        unit_size=problem.unit_size[units],
        unit_weight=problem.unit_weight[np.ix_(units, units)],
        unit_allowed=problem.unit_allowed[np.ix_(units, units)],
    )


def _improve_by_neighbourhoods(
    problem: _Problem,
    groups: list[list[int]],
    neighbourhood: int | None = None,
    max_rounds: int | None = None,
) -> list[list[int]]:
    """Large-neighbourhood search: re-solve small neighbourhoods exactly, keep what improves.

    Around each seed unit not yet covered in this round, grow a neighbourhood of about
    ``neighbourhood`` units by adding whole groups, the one with the strongest compatible tie
    first, and re-partition those units optimally with the MILP (everything else fixed). Rounds
    visit the seeds in a fresh (fixed-seed) order and stop after two rounds without a change, or
    after ``max_rounds``.
    """
    neighbourhood = _LNS_NEIGHBOURHOOD if neighbourhood is None else neighbourhood
    max_rounds = _LNS_MAX_ROUNDS if max_rounds is None else max_rounds
    n_units = len(problem.units)
    W = problem.unit_weight
    label = np.empty(n_units, dtype=np.int64)
    for g, group in enumerate(groups):
        label[group] = g
    next_label = len(groups)
    has_partner = problem.unit_allowed.any(axis=1)
    eps = 1e-12 * max(1.0, float(np.abs(W).max(initial=0.0)))
    order = np.flatnonzero(has_partner)
    rng = np.random.default_rng(0)  # fixed: the plan must not depend on anything but its inputs
    quiet_rounds = 0
    settled: set[tuple[bytes, bytes]] = set()
    for _ in range(max_rounds):
        improved = False
        covered = np.zeros(n_units, dtype=bool)
        for seed in order:
            if covered[seed]:
                continue
            # Grow from the seed's group: always add the whole group of the outside unit with the
            # strongest compatible tie to the units taken so far.
            inside = label == label[seed]
            tie = np.where(problem.unit_allowed[inside], W[inside], -np.inf).max(axis=0)
            while inside.sum() < neighbourhood:
                tie[inside] = -np.inf
                best = int(np.argmax(tie))
                if not np.isfinite(tie[best]):
                    break
                joining = label == label[best]
                inside |= joining
                joined_ties = np.where(problem.unit_allowed[joining], W[joining], -np.inf).max(axis=0)
                tie = np.maximum(tie, joined_ties)
            members = np.flatnonzero(inside).tolist()
            units = np.array(sorted(members), dtype=np.int64)
            covered[units] = True
            # The same units grouped the same way were already found optimal: nothing to gain.
            _, canonical = np.unique(label[units], return_inverse=True)
            key = (units.tobytes(), canonical.tobytes())
            if key in settled:
                continue
            before = float(np.triu(W[np.ix_(units, units)] * (label[units, None] == label[None, units]), 1).sum())
            sub = _subproblem(problem, units)
            candidates = _enumerate_candidates(sub, _LNS_MAX_CANDIDATES)
            if candidates is None:
                continue
            solved, optimal = _solve_milp(sub, candidates, None)
            if not solved:
                continue
            if _groups_objective(sub, solved) > before + eps:
                for group in solved:
                    label[units[group]] = next_label
                    next_label += 1
                improved = True
            else:
                settled.add(key)
        # A round that changes nothing may still be followed by one with other neighbourhoods.
        quiet_rounds = 0 if improved else quiet_rounds + 1
        if quiet_rounds >= 2:
            break
        order = rng.permutation(order)
    out: dict[int, list[int]] = {}
    for u in range(n_units):
        out.setdefault(int(label[u]), []).append(u)
    return list(out.values())


def _solve_heuristic(problem: _Problem) -> list[list[int]]:
    """Greedy agglomeration, local search, then exact re-solves of small neighbourhoods."""
    groups = _local_search(problem, _solve_greedy(problem))
    return _local_search(problem, _improve_by_neighbourhoods(problem, groups))


def _groups_objective(problem: _Problem, groups: list[list[int]]) -> float:
    return float(sum(problem.unit_weight[np.ix_(g, g)].sum() / 2.0 for g in groups))


# --------------------------------------------------------------------------------------------------
# The public solver
# --------------------------------------------------------------------------------------------------


def solve_plan(
    D: np.ndarray,
    ids: Sequence[str],
    *,
    tau: float | None = None,
    tau_quantile: float = DEFAULT_TAU_QUANTILE,
    k: int = 3,
    base_models: Mapping[str, str] | None = None,
    pinned: Iterable[tuple[str, str]] = (),
    forbidden: Iterable[tuple[str, str]] = (),
    method: str = "auto",
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    milp_time_limit: float | None = DEFAULT_MILP_TIME_LIMIT,
) -> Plan:
    """Group scorers into cliques of size <= ``k`` under ``tau`` that maximise the total margin.

    Args:
        D: symmetric [n, n] distances (NaN / inf = unknown, never group); the diagonal is ignored.
        ids: the n scorer ids, in the order of D's rows.
        tau: explicit threshold; pairs with ``D >= tau`` never share a group (unless pinned).
        tau_quantile: used when ``tau`` is None: tau is this quantile of the finite off-diagonal
            distances (each pair once, across bases too).
        k: maximum group size (>= 2).
        base_models: id -> base model; ids with different bases never share a group.
        pinned: pairs that must share a group (transitive; override the threshold; see module doc).
        forbidden: pairs that must not share a group.
        method: ``"auto"`` (matching for k = 2, else MILP while the candidates fit, else greedy),
            or force ``"matching"`` (k = 2 only), ``"milp"`` (error if over ``max_candidates``) or
            ``"greedy"`` (greedy + local search).
        max_candidates: the largest number of candidate groups handed to the MILP.
        milp_time_limit: seconds for HiGHS; when hit, the better of its incumbent and greedy + local
            search is used and the method reads ``"milp(time-limit)"``.

    Returns:
        A :class:`Plan` with ``method`` naming the solver that produced it, ``tau`` and ``objective``.
    """
    ids = _check_ids(ids)
    D = check_distance_matrix(D, ids)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    k = int(k)
    if method not in _SOLVER_METHODS:
        raise ValueError(f"method must be one of {_SOLVER_METHODS}, got {method!r}")
    if method == "matching" and k != 2:
        raise ValueError(f"method='matching' needs k=2, got k={k}")
    if max_candidates < 0:
        raise ValueError(f"max_candidates must be >= 0, got {max_candidates}")
    tau = _resolve_tau(D, tau, tau_quantile)
    problem = _build_problem(D, ids, tau, k, base_models, list(pinned), list(forbidden))

    if method == "greedy":
        groups, used = _solve_heuristic(problem), "greedy+local"
    elif k == 2 and method in ("auto", "matching"):
        groups, used = _solve_matching(problem), "matching"
    else:
        candidates = _enumerate_candidates(problem, max_candidates)
        if candidates is None:
            if method == "milp":
                raise ValueError(
                    f"more than max_candidates={max_candidates} candidate groups; raise the limit or use "
                    "method='greedy'"
                )
            groups, used = _solve_heuristic(problem), "greedy+local"
        else:
            groups, optimal = _solve_milp(problem, candidates, milp_time_limit)
            used = "milp"
            if not optimal:
                heuristic = _solve_heuristic(problem)
                if not groups or _groups_objective(problem, heuristic) > _groups_objective(problem, groups):
                    groups = heuristic
                used = "milp(time-limit)"

    id_groups = [tuple(problem.ids[i] for u in g for i in problem.units[u]) for g in groups]
    multi = [g for g in id_groups if len(g) >= 2]
    grouped = {m for g in multi for m in g}
    singletons = tuple(i for i in ids if i not in grouped)
    objective = plan_objective(multi, D, ids, tau) if tau is not None else 0.0
    return Plan(tuple(multi), singletons, used, tau=tau, objective=objective)
