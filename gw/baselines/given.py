"""Random (seeded) plans, a person's grouping, and curriculum modules split into groups of at most k."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from gw.plan import Plan, _check_ids, check_distance_matrix, plan_from_groups

from ._checks import _check_k, _check_n_groups

__all__ = ["default_group_sizes", "given_plan", "module_plan", "partition_modules", "random_plan", "sized_plan"]


def default_group_sizes(n: int, n_groups: int, k: int) -> list[int]:
    """Sizes for ``n_groups`` groups over ``n`` ids: all ``k`` when they fit, else as even as possible."""
    k = _check_k(k)
    n_groups = _check_n_groups(n_groups, n)
    if n_groups == 0:
        return []
    per_group = min(k, n // n_groups)
    sizes = [per_group] * n_groups
    spare = min(n - per_group * n_groups, n_groups * (k - per_group))
    for g in range(spare):
        sizes[g] += 1
    return sizes


def random_plan(
    ids: Sequence[str],
    n_groups: int,
    k: int = 3,
    seed: int = 0,
    *,
    sizes: Sequence[int] | None = None,
    base_models: Mapping[str, str] | None = None,
) -> Plan:
    """``n_groups`` random groups, the rest singletons; the same seed gives the same plan.

    Group sizes are ``sizes`` when given (e.g. those of a reference plan, for a fair comparison), else
    :func:`default_group_sizes`. With ``base_models``, each group is drawn inside one base model.
    """
    ids = _check_ids(ids)
    k = _check_k(k)
    n_groups = _check_n_groups(n_groups, len(ids))
    if sizes is None:
        sizes = default_group_sizes(len(ids), n_groups, k)
    sizes = [int(s) for s in sizes]
    if len(sizes) != n_groups:
        raise ValueError(f"sizes has {len(sizes)} entries for n_groups={n_groups}")
    if any(s < 2 or s > k for s in sizes):
        raise ValueError(f"every group size must be in [2, k={k}], got {sizes}")
    if sum(sizes) > len(ids):
        raise ValueError(f"group sizes {sizes} need {sum(sizes)} ids, only {len(ids)} given")
    rng = np.random.default_rng(seed)
    if base_models is None:
        order = [ids[i] for i in rng.permutation(len(ids))]
        groups, start = [], 0
        for s in sizes:
            groups.append(order[start : start + s])
            start += s
        return plan_from_groups(groups, ids, "random")
    missing = [i for i in ids if i not in base_models]
    if missing:
        raise ValueError(f"base_models has no entry for ids {missing}")
    pools: dict[str, list[str]] = {}
    for i in ids:
        pools.setdefault(str(base_models[i]), []).append(i)
    for base in pools:
        pools[base] = [pools[base][j] for j in rng.permutation(len(pools[base]))]
    groups = []
    for s in sorted(sizes, reverse=True):  # biggest first: they are the hardest to place
        bases = sorted(b for b, pool in pools.items() if len(pool) >= s)
        if not bases:
            raise ValueError(f"cannot draw a group of {s} inside one base model; sizes {sizes} do not fit")
        base = bases[int(rng.integers(len(bases)))]
        groups.append(pools[base][:s])
        pools[base] = pools[base][s:]
    return plan_from_groups(groups, ids, "random")


def given_plan(
    groups: Iterable[Iterable[str]],
    ids: Sequence[str] | None = None,
    *,
    k: int | None = None,
    method: str = "given",
) -> Plan:
    """A person's plan from its groups (e.g. read from a plan file by the caller).

    ``ids``: every id of the fleet (those in no group become singletons; default: just the grouped
    ids). ``k``: when given, a group larger than ``k`` is an error; split modules with
    :func:`partition_modules` first.
    """
    groups = [tuple(str(m) for m in g) for g in groups]
    if k is not None:
        k = _check_k(k)
        for group in groups:
            if len(group) > k:
                raise ValueError(
                    f"given group {group!r} has {len(group)} > k={k} members; split it (partition_modules)"
                )
    if ids is None:
        ids = [m for g in groups for m in g]
    return plan_from_groups(groups, ids, method)


def partition_modules(
    modules: Mapping[str, str],
    k: int = 3,
    *,
    D: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    base_models: Mapping[str, str] | None = None,
) -> list[tuple[str, ...]]:
    """Split labelled modules (id -> module label) into groups of at most ``k``.

    A module of m members becomes ``ceil(m / k)`` groups with sizes as even as possible (4 with k=3
    gives 2 + 2, not 3 + 1); a one-member module stays a singleton and is not returned. With
    ``base_models``, a module is split by base model first. Without ``D``, members are chunked in
    sorted order; with ``D`` (rows in the order of ``ids``) each chunk is seeded by the closest
    remaining pair and grown by smallest mean distance, then pairwise swaps between chunks lower the
    total within-chunk distance (unknown distances count as the largest known one, plus one).
    """
    k = _check_k(k)
    position: dict[str, int] = {}
    if D is not None:
        if ids is None:
            raise ValueError("partition_modules needs ids with D (the order of D's rows)")
        ids = _check_ids(ids)
        D = check_distance_matrix(D, ids)
        position = {s: i for i, s in enumerate(ids)}
        unknown = [m for m in modules if m not in position]
        if unknown:
            raise ValueError(f"modules name ids that are not in ids: {sorted(unknown)[:5]}")
        finite = D[np.isfinite(D)]
        D = np.where(np.isfinite(D), D, (finite.max() if finite.size else 0.0) + 1.0)
    if base_models is not None:
        missing = [m for m in modules if m not in base_models]
        if missing:
            raise ValueError(f"base_models has no entry for ids {sorted(missing)[:5]}")
    by_module: dict[tuple[str, str], list[str]] = {}
    for member, label in modules.items():
        base = "" if base_models is None else str(base_models[member])
        by_module.setdefault((str(label), base), []).append(str(member))
    groups: list[tuple[str, ...]] = []
    for key in sorted(by_module):
        members = sorted(by_module[key])
        if len(members) < 2:
            continue
        n_chunks = math.ceil(len(members) / k)
        sizes = [len(members) // n_chunks + (1 if c < len(members) % n_chunks else 0) for c in range(n_chunks)]
        if D is None:
            start = 0
            for s in sizes:
                groups.append(tuple(members[start : start + s]))
                start += s
        else:
            index = np.array([position[m] for m in members])
            chunks = _chunk_by_distance(D[np.ix_(index, index)], sizes)
            groups += [tuple(members[i] for i in chunk) for chunk in chunks]
    return sorted(tuple(sorted(g)) for g in groups)


def _chunk_by_distance(D: np.ndarray, sizes: list[int]) -> list[list[int]]:
    """Partition range(len(D)) into chunks of the given sizes with a small total within-chunk D."""
    free = list(range(len(D)))
    chunks: list[list[int]] = []
    for s in sorted(sizes, reverse=True):
        if s == len(free):
            chunk = list(free)
        else:
            # Grow a chunk from every free pair (by smallest mean distance) and keep the tightest: seeding
            # only from the closest pair can strand a large chunk among far members.
            chunk, best = [], np.inf
            for a, b in zip(*np.triu_indices(len(free), k=1)):
                grown = [free[a], free[b]]
                while len(grown) < s:
                    rest = [i for i in free if i not in grown]
                    grown.append(rest[int(np.argmin(D[np.ix_(rest, grown)].mean(axis=1)))])
                total = D[np.ix_(grown, grown)].sum()
                if total < best - 1e-12:
                    chunk, best = grown, total
        chunks.append(chunk)
        free = [i for i in free if i not in chunk]
    # Swap pairs between chunks while that lowers the total within-chunk distance.
    improved = True
    while improved:
        improved = False
        for x in range(len(chunks)):
            for y in range(x + 1, len(chunks)):
                for i in list(chunks[x]):
                    for j in list(chunks[y]):
                        rest_x = [m for m in chunks[x] if m != i]
                        rest_y = [m for m in chunks[y] if m != j]
                        delta = (D[j, rest_x].sum() + D[i, rest_y].sum()) - (D[i, rest_x].sum() + D[j, rest_y].sum())
                        if delta < -1e-12:
                            chunks[x] = rest_x + [j]
                            chunks[y] = rest_y + [i]
                            improved = True
                            break
                    if improved:
                        break
    return chunks


def sized_plan(D: np.ndarray, ids: Sequence[str], sizes: Sequence[int], *, method: str = "sized") -> Plan:
    """Groups of exactly the given sizes with a small total within-group distance D (greedy seeding by the
    closest free pair, growth by mean distance, then swaps between groups that lower the total), so plans
    from different signals compare at equal group sizes. Unknown distances count as the largest known
    one, plus one."""
    ids = _check_ids(ids)
    D = check_distance_matrix(D, ids)
    sizes = [int(s) for s in sizes]
    if any(s < 2 for s in sizes) or sum(sizes) > len(ids):
        raise ValueError(f"group sizes {sorted(sizes)} need sizes >= 2 and at most {len(ids)} ids in all")
    finite = D[np.isfinite(D)]
    D = np.where(np.isfinite(D), D, (finite.max() if finite.size else 0.0) + 1.0)
    groups = [tuple(sorted(ids[i] for i in chunk)) for chunk in _chunk_by_distance(D, sizes)]
    return plan_from_groups(sorted(groups), ids, method)


def module_plan(modules: Mapping[str, str], sizes: Sequence[int], *, ids: Sequence[str] | None = None) -> Plan:
    """A person's plan by module at given group sizes (e.g. those of a GW plan, to compare at equal size).

    Each module, its members in sorted order, is cut into groups of the largest sizes still unused that
    fit; the members left over in every module (a module of 19 with sizes of 3 leaves one) then fill
    the remaining sizes in order, across modules. Ids in no group are singletons.
    """
    ids = _check_ids(list(modules) if ids is None else ids)
    unknown = sorted(set(modules) - set(ids))
    if unknown:
        raise ValueError(f"modules name ids that are not in ids: {unknown[:5]}")
    remaining = sorted((int(s) for s in sizes), reverse=True)
    if any(s < 2 for s in remaining) or sum(remaining) > len(ids):
        raise ValueError(f"group sizes {remaining} need sizes >= 2 and at most {len(ids)} ids in all")
    groups: list[list[str]] = []
    leftovers: list[str] = []
    for module in sorted({str(m) for m in modules.values()}):
        pool = sorted(i for i in modules if str(modules[i]) == module)
        while pool and any(s <= len(pool) for s in remaining):
            size = max(s for s in remaining if s <= len(pool))
            remaining.remove(size)
            groups.append(pool[:size])
            pool = pool[size:]
        leftovers += pool
    for size in remaining:
        if len(leftovers) >= size:
            groups.append(leftovers[:size])
            leftovers = leftovers[size:]
    return plan_from_groups(groups, ids, "module")
