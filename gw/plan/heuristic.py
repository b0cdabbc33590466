"""Heuristic solver on units: greedy agglomeration, local search and a large-neighbourhood search."""

from __future__ import annotations

import heapq

import numpy as np

from .exact import _enumerate_candidates, _solve_milp
from .problem import _groups_objective, _Problem, _subproblem

# How many of a unit's best target groups the local search's chain move tries.
_CHAIN_BRANCHING = 3

# Large-neighbourhood search: units re-solved together exactly, candidate cap and rounds.
_LNS_NEIGHBOURHOOD = 16
_LNS_MAX_CANDIDATES = 2_000
_LNS_MAX_ROUNDS = 3


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
