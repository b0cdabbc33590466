"""The entropic GW solve: entry points, the outer (projected-gradient) iteration and the multiscale start."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import torch

from ..clouds import Coarsening, PreparedCloud
from ..result import GWResult
from .options import EntropicOptions
from .products import _aligned, _augmented, _inner_from_z, _per_pair, _Products, self_cost_sq
from .sinkhorn import _flush_denormals, _sinkhorn, _sinkhorn_pairwise

_LOOSE_MARGINAL_TOL = 1e-2  # Sinkhorn tolerance while the objective still moves a lot
_INNER_TOL_FACTOR = 0.1  # Sinkhorn tolerance = this x the objective's last relative change
_MIN_MULTISCALE_POINTS = 64  # below this, start from p q^T
SQ_COSTS_MAX_POINTS = 1024  # exact self terms from a cached C * C up to this many points (8 MiB)
_PAIRWISE_MIN_ENTRIES = 128 * 128  # CPU Sinkhorn pair after pair from this kernel size (cache-bound)


def entropic_gw(
    a: PreparedCloud, b: PreparedCloud, options: EntropicOptions | None = None, *, return_coupling: bool = False,
) -> GWResult:
    """Entropic GW between two prepared clouds (see the module docstring)."""
    return entropic_gw_batch([(a, b)], options, return_coupling=return_coupling)[0]


def entropic_gw_batch(
    pairs: Sequence[tuple[PreparedCloud, PreparedCloud]],
    options: EntropicOptions | None = None,
    *,
    return_coupling: bool = False,
) -> list[GWResult]:
    """Entropic GW for several pairs; pairs of equal shapes are solved together.

    Args:
        pairs: ``(a, b)`` prepared clouds (same normalisation, device and dtype within a pair).
        options: solver settings (defaults when None).
        return_coupling: attach each pair's coupling (numpy, [n_a, n_b]) to its result.

    Returns:
        One :class:`~gw.result.GWResult` per pair, in order.
    """
    opts = options or EntropicOptions()
    groups: dict[tuple, list[int]] = {}
    pairs = list(pairs)
    ready: dict[int, PreparedCloud] = {}  # per-cloud work once per call (clouds recur across pairs)

    def per_cloud(cloud: PreparedCloud) -> PreparedCloud:
        out = ready.get(id(cloud))
        if out is None:
            # principal coordinates; C * C for the exact value's self terms (O(N^2) a pair then);
            # the k-means coarsening of the multiscale start. All cached by prepare_fleet.
            out = _with_sq_costs(cloud.with_principal(opts.rank_tol))
            if opts.init == "multiscale" and out.n_points >= _MIN_MULTISCALE_POINTS:
                out = out.with_coarse()
            ready[id(cloud)] = out
        return out

    for i, (a, b) in enumerate(pairs):
        check_pair(a, b)
        if opts.rank_tol > 0:
            # factored on principal coordinates, zero-padded to a multiple of 16: a pair's shapes
            # (hence its bits) never depend on its batch mates
            a, b = per_cloud(a), per_cloud(b)
            pairs[i] = (a, b)
            widths = (_padded_rank(a), _padded_rank(b))
            key = (a.n_points, b.n_points, ("principal", widths), a.device, a.dtype)
        else:
            key = (a.n_points, b.n_points, (a.dim, b.dim, use_dense(a, b, opts.representation)), a.device, a.dtype)
        groups.setdefault(key, []).append(i)
    results: list[GWResult | None] = [None] * len(pairs)
    for (_, _, kind, device, _), members in groups.items():
        started = time.perf_counter()
        group = [pairs[i] for i in members]
        with torch.no_grad(), _flush_denormals(device):
            if kind[0] == "principal":
                solved = _solve_group(_principal_twins(group, opts), opts, False, return_coupling, exact=group)
            else:
                solved = _solve_group(group, opts, kind[2], return_coupling)
        seconds = (time.perf_counter() - started) / len(members)
        for i, res in zip(members, solved):
            results[i] = GWResult(**{k: v for k, v in res.items() if not k.startswith("_")}, seconds=seconds)
    return results  # type: ignore[return-value]


def check_pair(a: PreparedCloud, b: PreparedCloud) -> None:
    """Both clouds prepared alike (normalisation, device, dtype); raises ValueError otherwise."""
    if not isinstance(a, PreparedCloud) or not isinstance(b, PreparedCloud):
        raise TypeError("expected PreparedCloud inputs (see gw.clouds.prepare)")
    if a.normalisation != b.normalisation:
        raise ValueError(f"clouds were normalised differently: {a.normalisation!r} vs {b.normalisation!r}")
    if a.device != b.device or a.dtype != b.dtype:
        raise ValueError(f"clouds live on different devices/dtypes: {a.device}/{a.dtype} vs {b.device}/{b.dtype}")


def use_dense(a: PreparedCloud, b: PreparedCloud, representation: str = "auto") -> bool:
    """Whether the dense product ``C1 T C2`` is cheaper than the factored one for this pair."""
    if representation != "auto":
        return representation == "dense"
    n, m, d, e = a.n_points, b.n_points, a.dim, b.dim
    factored = 2 * n * m * (e + 2) + n * (d + 2) * (e + 2) + n * (d + 1) * (e + 1)
    return n * m * (n + m) < factored and max(n, m) <= 8192


def _solve_group(
    pairs: Sequence[tuple[PreparedCloud, PreparedCloud]],
    opts: EntropicOptions,
    dense: bool,
    return_coupling: bool,
    keep_state: bool = False,
    exact: Sequence[tuple[PreparedCloud, PreparedCloud]] | None = None,
) -> list[dict[str, Any]]:
    """Solve pairs of equal shapes; returns the fields of each :class:`GWResult` (plus, with
    ``keep_state``, ``_coupling`` / ``_f`` / ``_g`` for the multiscale start). With ``exact``
    (the original pairs when ``pairs`` are their principal twins), values are recomputed with the
    exact costs."""
    clouds_a = [a.with_dense_costs() if dense else a for a, _ in pairs]
    clouds_b = [b.with_dense_costs() if dense else b for _, b in pairs]
    products = _Products(clouds_a, clouds_b, dense)
    p = torch.stack([c.weights for c in clouds_a])
    q = torch.stack([c.weights for c in clouds_b])
    marg = (p, q, p.log(), q.log())
    const = torch.stack([self_cost_sq(a, a.weights) + self_cost_sq(b, b.weights) for a, b in zip(clouds_a, clouds_b)])
    batch = len(pairs)
    pairwise = p.device.type == "cpu" and p.shape[1] * q.shape[1] >= _PAIRWISE_MIN_ENTRIES
    start = _multiscale_start(clouds_a, clouds_b, opts) if opts.init == "multiscale" else None
    if start is None:
        f, g = torch.zeros_like(p), torch.zeros_like(q)
        state, inner = products.state_product(p, q)
    else:
        (coupling, lift_a, lift_b), f, g = start
        state, inner = products.state_block(coupling, lift_a, lift_b)
    prev_obj = const - 2.0 * inner
    prev_t = prev_t2 = None
    index = torch.arange(batch, device=p.device)  # original position of each row still running
    out: list[dict[str, Any] | None] = [None] * batch
    inner_total = torch.zeros(batch, dtype=torch.int64, device=p.device)
    inner_tol = torch.full((batch,), _LOOSE_MARGINAL_TOL, dtype=torch.float64, device=p.device)
    max_iter = int(opts.max_iter)
    for it in range(1, max_iter + 1):
        if pairwise:
            t, lu, lv, f, g, err, n_inner, stalled = _sinkhorn_pairwise(products, state, f, g, marg, opts, inner_tol)
        else:
            grad = products.gradient(state)
            kernel, lu, lv, f, g, err, n_inner, stalled = _sinkhorn(grad, f, g, marg, opts, inner_tol)
            del grad
            t = kernel.mul_(lu.exp()[:, :, None]).mul_(lv.exp()[:, None, :])  # the coupling, in place
            del kernel
        inner_total[index] += n_inner
        state, inner = products.state(t)
        # the objective of t itself, with its actual marginals (with p and q instead, a marginal
        # error of 1e-3 shifts it by ~0.5%: more than the stopping tolerance)
        obj = torch.stack([_self_cost_of(clouds_a[k], clouds_b[k], _aligned(t[row]))
                           for row, k in enumerate(index.tolist())]) - 2.0 * inner
        change = (obj - prev_obj).abs() / torch.maximum(obj.abs(), 1e-2 * const)
        moved = _distance(t, prev_t, change)
        # ...or from two steps back: Sinkhorn solves that stop just inside their tolerance can
        # leave the iteration alternating between two nearby couplings
        moved = torch.minimum(moved, _distance(t, prev_t2, change))
        prev_obj, prev_t, prev_t2 = obj, t, prev_t
        # Loose Sinkhorn while the objective moves, tight once it settles; never loosened again
        # (a loose projection moves the objective, which would loosen it further: a cycle).
        inner_tol = torch.minimum(inner_tol, (change * _INNER_TOL_FACTOR).clamp(min=opts.marginal_tol))
        feasible = err <= opts.marginal_tol
        # The coupling test keeps it going on plateaus, where the objective barely moves while
        # the coupling still turns (slow escapes from saddles).
        settled = (change <= opts.tol) & (moved <= opts.coupling_tol) & (feasible | stalled) & (it >= 2)
        done = settled | (it == max_iter)
        if not bool(done.any()):
            continue
        for row in done.nonzero().squeeze(1).tolist():
            orig = int(index[row])
            a, b = exact[orig] if exact is not None else (clouds_a[orig], clouds_b[orig])
            pair_inner = _exact_inner(a, b, t[row]) if exact is not None else float(inner[row])
            out[orig] = _finish(t[row], a, b, pair_inner, it, bool(settled[row] & feasible[row]),
                                int(inner_total[orig]), opts, return_coupling)
            if keep_state:
                eps = opts.epsilon
                out[orig].update(_coupling=t[row], _f=f[row] + eps * lu[row], _g=g[row] + eps * lv[row])
        keep = ~done
        if not bool(keep.any()):
            break
        products.select(keep)
        state, f, g, const, prev_obj, index, inner_tol = (
            x[keep] for x in (state, f, g, const, prev_obj, index, inner_tol))
        prev_t, prev_t2 = (None if x is None else x[keep] for x in (prev_t, prev_t2))
        marg = tuple(x[keep] for x in marg)
    return out  # type: ignore[return-value]


def _self_cost_of(a: PreparedCloud, b: PreparedCloud, t: torch.Tensor) -> torch.Tensor:
    """``sum C1^2 r r + sum C2^2 c c`` with ``r``, ``c`` the marginals of the coupling ``t``."""
    return self_cost_sq(a, t.sum(1)) + self_cost_sq(b, t.sum(0))


def _distance(t: torch.Tensor, other: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``|t - other|_1`` per pair (inf without ``other``)."""
    if other is None:
        return torch.full_like(like, math.inf)
    if t.is_cuda:
        return (t - other).abs().sum(dim=(1, 2), dtype=torch.float64)
    # one fused pass per pair (a float64 sum of |x - y| costs more; float32 cascade sums are
    # accurate to ~1e-6 here, far below coupling_tol)
    return _per_pair(lambda x, y: torch.nn.functional.l1_loss(x, y, reduction="sum"), t, other).double()


def _principal_twins(
    pairs: Sequence[tuple[PreparedCloud, PreparedCloud]], opts: EntropicOptions,
) -> list[tuple[PreparedCloud, PreparedCloud]]:
    """Each pair's clouds on their principal coordinates (exact squared norms kept), zero-padded to
    a multiple of 16 (the group shares the widths); coarsenings carried over."""
    multiscale = opts.init == "multiscale" and min(pairs[0][0].n_points, pairs[0][1].n_points) >= _MIN_MULTISCALE_POINTS
    sides = []
    for side in (0, 1):
        clouds = [p[side].with_principal(opts.rank_tol) for p in pairs]
        if multiscale:
            clouds = [c.with_coarse() for c in clouds]
        rank = _padded_rank(clouds[0])
        twins = []
        for c in clouds:
            coords = c.principal[1]
            if coords.shape[1] < rank:
                coords = torch.nn.functional.pad(coords, (0, rank - coords.shape[1]))
            twins.append(PreparedCloud(points=coords, sq_norms=c.sq_norms, weights=c.weights, scale=c.scale,
                                       normalisation=c.normalisation, key=c.key, uniform=c.uniform,
                                       coarse=c.coarse))
        sides.append(twins)
    return list(zip(*sides))


def _with_sq_costs(cloud: PreparedCloud) -> PreparedCloud:
    """``cloud`` carrying ``C * C`` when it is small enough (a rule on the cloud alone, so a pair's
    bits never depend on whether a fleet cached it)."""
    return cloud.with_sq_costs() if cloud.n_points <= SQ_COSTS_MAX_POINTS else cloud


def _padded_rank(cloud: PreparedCloud) -> int:
    rank = cloud.principal[1].shape[1]
    return min(-(-rank // 16) * 16, max(rank, cloud.dim))


def _exact_inner(a: PreparedCloud, b: PreparedCloud, t: torch.Tensor) -> float:
    """``<C1 t C2, t>`` with the clouds' exact costs (one O(N M d) product)."""
    z = _aligned(_augmented(a)).T @ _aligned(t) @ _augmented(b)
    return float(_inner_from_z(z[None], a.dim, b.dim)[0])


def _multiscale_start(
    clouds_a: Sequence[PreparedCloud], clouds_b: Sequence[PreparedCloud], opts: EntropicOptions,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """Coupling (as ``P``, lifts) and potentials lifted from the coarsened pairs (None: not used).

    The coarse pair (k-means clusters, block-averaged costs) is solved from ``p q^T`` at the same
    epsilon; its coupling ``P`` lifts to the block coupling ``T0_ij = s_i P_{a(i) b(j)} s_j`` (``s``:
    each point's share of its cluster; exact marginals) and its potentials to
    ``f_i = f_{a(i)} + eps log s_i`` (likewise g), which already balance mass between clusters.
    """
    if min(clouds_a[0].n_points, clouds_b[0].n_points) < _MIN_MULTISCALE_POINTS:
        return None
    coarse_a = [c.with_coarse() for c in clouds_a]
    coarse_b = [c.with_coarse() for c in clouds_b]
    if any(c.coarse is None for c in coarse_a + coarse_b):
        return None
    if len({c.coarse.n_clusters for c in coarse_a}) > 1 or len({c.coarse.n_clusters for c in coarse_b}) > 1:
        return None
    solved = _solve_group([(a.coarse.cloud, b.coarse.cloud) for a, b in zip(coarse_a, coarse_b)],
                          dataclasses.replace(opts, init="product"), dense=True, return_coupling=False,
                          keep_state=True)
    eps = opts.epsilon
    couplings, lifts_a, lifts_b, fs, gs = [], [], [], [], []
    for a, b, res in zip(coarse_a, coarse_b, solved):
        ca, cb = a.coarse, b.coarse
        couplings.append(res["_coupling"])
        lifts_a.append(_lift(ca))
        lifts_b.append(_lift(cb))
        fs.append(res["_f"][ca.labels] + eps * ca.share.log())
        gs.append(res["_g"][cb.labels] + eps * cb.share.log())
    return (torch.stack(couplings), torch.stack(lifts_a), torch.stack(lifts_b)), torch.stack(fs), torch.stack(gs)


def _lift(coarse: Coarsening) -> torch.Tensor:
    """[N, k] with ``share_i`` at (i, label_i): maps a cluster coupling to a block coupling."""
    lift = torch.zeros(coarse.labels.shape[0], coarse.n_clusters, dtype=coarse.share.dtype, device=coarse.share.device)
    return lift.scatter_(1, coarse.labels[:, None], coarse.share[:, None])


def _finish(t: torch.Tensor, a: PreparedCloud, b: PreparedCloud, inner: float, iterations: int,
            converged: bool, n_inner: int, opts: EntropicOptions, return_coupling: bool) -> dict[str, Any]:
    """A pair's result from its coupling ``t`` and ``<C1 t C2, t>``: value with t's actual
    marginals, mass check, no NaN."""
    r = t.sum(1, dtype=torch.float64)
    c = t.sum(0, dtype=torch.float64)
    marginal_error = float((r - a.weights.double()).abs().sum() + (c - b.weights.double()).abs().sum())
    value = float(self_cost_sq(a, r) + self_cost_sq(b, c)) - 2.0 * inner
    if not math.isfinite(value) or not math.isfinite(marginal_error):
        raise FloatingPointError(
            f"entropic GW produced a non-finite result (value={value}, marginal error={marginal_error}) "
            f"for clouds of {a.n_points} and {b.n_points} points; try a larger epsilon")
    return dict(
        value=max(value, 0.0), solver="entropic", iterations=iterations, converged=converged,
        marginal_error=marginal_error, n_a=a.n_points, n_b=b.n_points, epsilon=float(opts.epsilon),
        inner_iterations=n_inner, coupling=t.double().cpu().numpy() if return_coupling else None,
    )
