"""The GW-SMM paper's method: agglomerative clustering on D, capped at ``k`` members a group."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from gw.plan import Plan, _check_ids, allowed_pairs, check_distance_matrix, plan_from_groups

from ._checks import Linkage, _check_k, _check_n_groups

__all__ = ["linkage_plan"]


def linkage_plan(
    D: np.ndarray,
    ids: Sequence[str],
    n_groups: int | None = None,
    *,
    k: int = 3,
    linkage: Linkage = "average",
    tau: float | None = None,
    fill: bool = False,
    method: str = "linkage",
) -> Plan:
    """Agglomerative clustering on D where no cluster grows past ``k`` members.

    Starting from singletons, repeatedly merge the two clusters with the smallest linkage distance
    (``average``: mean of D over the cross pairs, as in GW-SMM; or ``complete`` / ``single``) among
    those whose union has at most ``k`` members, with no unknown (NaN / inf) cross pair, and, if
    ``tau`` is given, whose linkage distance is below ``tau``. Ties go to the lowest indices, so the result is deterministic.

    Stops when ``n_groups`` multi-member groups exist, or when nothing can merge (``n_groups=None``
    merges as long as anything can). So that ``n_groups`` stays reachable, a merge that would leave
    too few singletons to form the missing groups is skipped (with every pair compatible, exactly
    ``n_groups`` groups come out whenever ``2 * n_groups <= n``). With ``fill=True``, after
    ``n_groups`` is reached merging goes on, but only singletons into existing groups, so the groups
    fill up towards ``k`` while their number stays ``n_groups``.
    """
    ids = _check_ids(ids)
    D = check_distance_matrix(D, ids)
    k = _check_k(k)
    n = len(ids)
    n_groups = _check_n_groups(n_groups, n)
    if linkage not in ("average", "complete", "single"):
        raise ValueError(f"linkage must be 'average', 'complete' or 'single', got {linkage!r}")
    # Pairs that may ever share a cluster: known distance.
    compatible = allowed_pairs(D, ids, math.inf)
    finite_D = np.where(np.isfinite(D), D, 0.0)

    members: list[list[int]] = [[i] for i in range(n)]
    alive = np.ones(n, dtype=bool)
    size = np.ones(n, dtype=np.int64)
    # Cluster-level statistics, merged in place: sum / max / min of D over cross pairs.
    total = finite_D.copy()
    largest = finite_D.copy()
    smallest = finite_D.copy()
    ok = compatible.copy()
    upper = np.triu(np.ones((n, n), dtype=bool), 1)
    n_multi = 0
    while n_groups is None or n_multi < n_groups or fill:
        pair_count = np.outer(size, size)
        if linkage == "average":
            dist = total / pair_count
        elif linkage == "complete":
            dist = largest
        else:
            dist = smallest
        feasible = ok & alive[:, None] & alive[None, :] & (size[:, None] + size[None, :] <= k)
        feasible &= upper
        if tau is not None:
            feasible &= dist < tau
        if n_groups is not None:
            multi = (size >= 2) & alive
            if n_multi >= n_groups:
                # Filling: a singleton joins an existing group, which keeps the count.
                feasible &= multi[:, None] ^ multi[None, :]
            else:
                # Keep n_groups reachable: each missing group still needs two singletons.
                missing = n_groups - n_multi
                spare = int((alive & (size == 1)).sum()) - 2 * missing
                if spare < 1:
                    feasible &= ~multi[:, None] & ~multi[None, :]  # only two singletons may merge
                if spare < 2:
                    feasible &= ~(multi[:, None] & multi[None, :])  # two groups merging lose one
        if not feasible.any():
            break
        masked = np.where(feasible, dist, np.inf)
        a, b = map(int, np.unravel_index(int(np.argmin(masked)), masked.shape))
        n_multi += 1 - int(size[a] >= 2) - int(size[b] >= 2)
        members[a] += members[b]
        members[b] = []
        alive[b] = False
        size[a] += size[b]
        total[a] += total[b]
        total[:, a] = total[a]
        largest[a] = np.maximum(largest[a], largest[b])
        largest[:, a] = largest[a]
        smallest[a] = np.minimum(smallest[a], smallest[b])
        smallest[:, a] = smallest[a]
        ok[a] &= ok[b]
        ok[:, a] = ok[a]
    groups = [[ids[i] for i in members[c]] for c in range(n) if alive[c] and size[c] >= 2]
    return plan_from_groups(groups, ids, method, D=D if tau is not None else None, tau=tau)
