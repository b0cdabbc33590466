"""Gromov-Wasserstein solvers on prepared feature clouds (see :mod:`gw.clouds`).

Both solvers report the square-loss GW objective of the coupling they return,

    value = sum_{ijkl} (C1_ik - C2_jl)^2 T_ij T_kl        (no entropy term, no square root),

on the normalised costs of the prepared clouds, so their values compare directly.

* ``"exact"``: POT's conditional-gradient solver (``ot.gromov.gromov_wasserstein2``, square loss,
  float64, dense costs). The reference; each iteration solves an exact transport problem, O(N^3).
* ``"entropic"``: ours (entropic GW, Peyré, Cuturi & Solomon 2016, the same projected-gradient
  iteration as POT's ``entropic_gromov_wasserstein``: ``T <- Sinkhorn(p, q, 2 L(C1, C2) (x) T, eps)``)
  in torch, float32 by default, CPU or CUDA:

  - products ``C1 T C2`` on the factored squared-Euclidean cost ``C = a 1^T + 1 a^T - 2 X X^T``:
    O(N M d) per iteration instead of O(N^2 M); rank-one terms ``u 1^T`` / ``1 v^T`` of the
    gradient are dropped because Sinkhorn absorbs them into its potentials. For clouds smaller than
    about 1.6 d the dense product is cheaper and is used instead (``representation="auto"``);
  - Sinkhorn in scaling form with log-domain stabilisation (potentials absorbed whenever the
    scalings leave [e^-30, e^30], rows renormalised with a log-sum-exp; Schmitzer 2019), warm
    started from the previous iteration's potentials, over-relaxed (Thibault et al. 2017) with a
    fall-back to plain Sinkhorn for a pair whose marginal error grows; the kernel never overflows,
    underflowed rows are recovered by absorption, so no NaN on real features;
  - stopping rule: the relative change of the objective between two outer iterations below
    ``tol`` (never before the second iteration, so it does not stop on the flat start at
    ``p q^T``), with the marginal error below ``marginal_tol``;
  - batches of pairs with equal shapes run as one batched computation (each pair keeps its own
    iteration counts and stopping, so its result does not depend on its batch mates).

Default ``epsilon`` and normalisation: costs divided by their mean (``normalisation="mean"``),
``epsilon = 0.02`` (see :data:`DEFAULT_EPSILON`). Smaller epsilon is closer to the exact objective
but needs more Sinkhorn iterations; the plan's mass is always checked (the marginal error is in
every result) instead of trusting a silent all-zero plan.

Pure math: numpy, torch and POT; no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

from .clouds import DEFAULT_NORMALISATION, Normalisation, PreparedCloud, pairwise_costs, prepare

DEFAULT_EPSILON = 0.1
"""Entropic regularisation on mean-normalised costs (stable and within ~1% of exact GW here)."""

SOLVERS: tuple[str, ...] = ("entropic", "exact")

_LOG_SCALING_LIMIT = 30.0  # absorb scalings into the potentials beyond e^+-30 (float32 safe)
_TINY = 1e-35  # floor for a row/column sum before its log (a normal float32)
_CHECK_EVERY = 5  # Sinkhorn iterations between marginal-error checks
_PLAIN_WARMUP = 10  # plain Sinkhorn iterations before over-relaxing (big early steps overshoot)
_LOOSE_MARGINAL_TOL = 1e-2  # Sinkhorn tolerance while the objective still moves a lot
_INNER_TOL_FACTOR = 0.1  # Sinkhorn tolerance = this x the objective's last relative change
_DIVERGENCE_FACTOR = 100.0
_MIN_MULTISCALE_POINTS = 64  # below this, start from p q^T  # error growth (vs. the error when relaxation started) that reverts to plain


@dataclass(frozen=True)
class GWResult:
    """One GW computation.

    Attributes:
        value: the square-loss GW objective of the returned coupling (normalised costs, no entropy).
        solver: ``"entropic"`` or ``"exact"``.
        iterations: outer iterations (entropic: gradient steps; exact: conditional-gradient steps).
        converged: the stopping rule was met (and, for exact, POT raised no warning).
        marginal_error: ``|T 1 - p|_1 + |T^T 1 - q|_1`` of the returned coupling.
        n_a, n_b: number of points of the two clouds.
        epsilon: the entropic regularisation (None for exact).
        inner_iterations: total Sinkhorn iterations (0 for exact).
        seconds: wall time (for a batch, its time divided by the batch size).
        coupling: the [n_a, n_b] coupling when asked for (``return_coupling=True``), else None.
    """

    value: float
    solver: str
    iterations: int
    converged: bool
    marginal_error: float
    n_a: int
    n_b: int
    epsilon: float | None = None
    inner_iterations: int = 0
    seconds: float = field(default=0.0, compare=False)
    coupling: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (the coupling is left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "coupling"}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GWResult":
        names = {f.name for f in fields(cls)} - {"coupling"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def without_coupling(self) -> "GWResult":
        if self.coupling is None:
            return self
        kept = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "coupling"}
        return GWResult(**kept)


@dataclass(frozen=True)
class EntropicOptions:
    """Settings of the entropic solver (all part of the cache key of a pair).

    Attributes:
        epsilon: entropic regularisation on the normalised costs.
        tol: stop when the objective's relative change between outer iterations is below this.
        max_iter: cap on outer iterations.
        marginal_tol: Sinkhorn stops when ``|T 1 - p|_1 + |T^T 1 - q|_1`` is below this.
        max_inner: cap on Sinkhorn iterations per outer iteration.
        overrelaxation: Sinkhorn over-relaxation factor in [1, 2) (1 = plain Sinkhorn).
        representation: ``"auto"``, ``"factored"`` (O(N M d) products) or ``"dense"`` (O(N M (N + M))).
        init: ``"multiscale"`` (start from the lifted solution of the k-means-coarsened pair, with
            its potentials; far fewer outer iterations) or ``"product"`` (``p q^T``, as POT).
    """

    epsilon: float = DEFAULT_EPSILON
    tol: float = 1e-4
    max_iter: int = 100
    marginal_tol: float = 1e-4
    max_inner: int = 300
    overrelaxation: float = 1.8
    representation: Literal["auto", "factored", "dense"] = "auto"
    init: Literal["multiscale", "product"] = "multiscale"

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon!r}")
        if not (self.tol > 0 and self.marginal_tol > 0):
            raise ValueError("tol and marginal_tol must be positive")
        if int(self.max_iter) < 2 or int(self.max_inner) < 1:
            raise ValueError("max_iter must be >= 2 and max_inner >= 1")
        if not 1.0 <= self.overrelaxation < 2.0:
            raise ValueError(f"overrelaxation must be in [1, 2), got {self.overrelaxation}")
        if self.init not in ("multiscale", "product"):
            raise ValueError(f"init must be 'multiscale' or 'product', got {self.init!r}")
        if self.representation not in ("auto", "factored", "dense"):
            raise ValueError(f"representation must be 'auto', 'factored' or 'dense', got {self.representation!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


@contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, flush float32 denormals while solving (kernel tails otherwise slow matvecs ~2.5x).

    Restores the default (off) afterwards.
    """
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def _check_pair(a: PreparedCloud, b: PreparedCloud) -> None:
    if not isinstance(a, PreparedCloud) or not isinstance(b, PreparedCloud):
        raise TypeError("expected PreparedCloud inputs (see gw.clouds.prepare)")
    if a.normalisation != b.normalisation:
        raise ValueError(f"clouds were normalised differently: {a.normalisation!r} vs {b.normalisation!r}")
    if a.device != b.device or a.dtype != b.dtype:
        raise ValueError(f"clouds live on different devices/dtypes: {a.device}/{a.dtype} vs {b.device}/{b.dtype}")


def _self_cost_sq(cloud: PreparedCloud, r: torch.Tensor) -> torch.Tensor:
    """``sum_ik r_i r_k C_ik^2`` (float64 result; O(N^2) with dense costs, else O(N d^2))."""
    r64 = r.double()
    if cloud.dense_costs is not None:
        c = cloud.dense_costs.double()
        return r64 @ ((c * c) @ r64)
    x = cloud.points
    gram = ((x * r.to(x.dtype)[:, None]).T @ x).double()
    x = x.double()
    a = cloud.sq_norms.double()
    ra = r64 * a
    return (2.0 * r64.sum() * (ra * a).sum() + 2.0 * ra.sum() ** 2 + 4.0 * (gram * gram).sum()
            - 8.0 * (ra @ x) @ (r64 @ x))


def _use_dense(a: PreparedCloud, b: PreparedCloud, representation: str) -> bool:
    if representation != "auto":
        return representation == "dense"
    n, m, d, e = a.n_points, b.n_points, a.dim, b.dim
    factored = 2 * n * m * (e + 2) + n * (d + 2) * (e + 2) + n * (d + 1) * (e + 1)
    dense = n * m * (n + m)
    return dense < factored and max(n, m) <= 8192


# --------------------------------------------------------------------------------------------------
# The entropic solver, batched over pairs of equal shapes
# --------------------------------------------------------------------------------------------------


class _Products:
    """``C1 T C2`` and ``<C1 T C2, T>`` for a batch, factored or dense."""

    def __init__(self, clouds_a: Sequence[PreparedCloud], clouds_b: Sequence[PreparedCloud], dense: bool):
        self.dense = dense
        if dense:
            self.c1 = torch.stack([c.costs() for c in clouds_a])  # [B, N, N]
            self.c2 = torch.stack([c.costs() for c in clouds_b])  # [B, M, M]
        else:
            self.xa = torch.stack([_augmented(c) for c in clouds_a])  # [B, N, d + 2] = [X, a, 1]
            self.yb = torch.stack([_augmented(c) for c in clouds_b])  # [B, M, e + 2] = [Y, b, 1]
            self.d = clouds_a[0].dim
            self.e = clouds_b[0].dim

    def select(self, keep: torch.Tensor) -> None:
        for name in ("c1", "c2", "xa", "yb"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name)[keep])

    def state(self, kernel: torch.Tensor, eu: torch.Tensor, ev: torch.Tensor) -> Any:
        """The products' state for the coupling ``T = diag(eu) kernel diag(ev)``."""
        if self.dense:
            t = kernel * eu[:, :, None] * ev[:, None, :]
            h = torch.bmm(torch.bmm(self.c1, t), self.c2)  # C1 T C2
            return h, (h * t).sum(dim=(1, 2), dtype=torch.float64)
        ty = torch.bmm(kernel, self.yb * ev[:, :, None]) * eu[:, :, None]  # T [Y, b, 1]
        z = torch.bmm(self.xa.transpose(1, 2), ty)  # [X, a, 1]^T T [Y, b, 1]
        return z, self._inner_from_z(z)

    def state_block(self, coupling: torch.Tensor, lift_a: torch.Tensor, lift_b: torch.Tensor) -> Any:
        """The state for the block coupling ``T0 = lift_a P lift_b^T`` (``lift`` [B, N, k]: shares).

        Costs O(N k (N + M)) instead of a full product; T0 is never materialised.
        """
        if self.dense:
            left = torch.bmm(torch.bmm(self.c1, lift_a), coupling)  # C1 A P, [B, N, k']
            h = torch.bmm(left, torch.bmm(lift_b.transpose(1, 2), self.c2))  # C1 T0 C2
            blocks = torch.bmm(torch.bmm(lift_a.transpose(1, 2), h), lift_b)  # A^T H B, [B, k, k']
            return h, (blocks * coupling).sum(dim=(1, 2), dtype=torch.float64)
        xa = torch.bmm(self.xa.transpose(1, 2), lift_a)  # [B, d + 2, k]
        yb = torch.bmm(lift_b.transpose(1, 2), self.yb)  # [B, k', e + 2]
        z = torch.bmm(torch.bmm(xa, coupling), yb)
        return z, self._inner_from_z(z)

    def state_product(self, p: torch.Tensor, q: torch.Tensor) -> Any:
        """The products' state for ``T = p q^T`` (cheap: rank one)."""
        if self.dense:
            h = torch.bmm(self.c1, p[:, :, None]) * torch.bmm(q[:, None, :], self.c2)  # (C1 p)(C2 q)^T
            t_h = (torch.bmm(p[:, None, :], torch.bmm(self.c1, p[:, :, None])).squeeze()
                   * torch.bmm(q[:, None, :], torch.bmm(self.c2, q[:, :, None])).squeeze())
            return h, t_h.reshape(-1).double()
        z = torch.bmm(self.xa.transpose(1, 2), p[:, :, None]) * torch.bmm(q[:, None, :], self.yb)
        return z, self._inner_from_z(z)

    def _inner_from_z(self, z: torch.Tensor) -> torch.Tensor:
        """``<C1 T C2, T>`` from ``Z = [X, a, 1]^T T [Y, b, 1]`` (every term of the expansion)."""
        d, e = self.d, self.e
        z = z.double()
        k = z[:, :d, :e]
        x_r = z[:, :d, e + 1]  # X^T r
        y_c = z[:, d + 1, :e]  # Y^T c
        a_r = z[:, d, e + 1]  # a^T r
        b_c = z[:, d + 1, e]  # b^T c
        a_t_b = z[:, d, e]  # a^T T b
        a_t_y = z[:, d, :e]  # a^T T Y
        x_t_b = z[:, :d, e]  # X^T T b
        mass = z[:, d + 1, e + 1]
        return (2.0 * b_c * a_r + 2.0 * mass * a_t_b - 4.0 * (a_t_y * y_c).sum(1)
                - 4.0 * (x_t_b * x_r).sum(1) + 4.0 * (k * k).sum(dim=(1, 2)))

    def gradient(self, state: Any) -> torch.Tensor:
        """``-4 C1 T C2`` up to rank-one terms ``u 1^T + 1 v^T`` (Sinkhorn absorbs those)."""
        if self.dense:
            return state.mul(-4.0)
        d, e = self.d, self.e
        z = state
        middle = torch.empty(z.shape[0], d + 1, e + 1, dtype=z.dtype, device=z.device)
        middle[:, :d, :e] = 4.0 * z[:, :d, :e]
        middle[:, :d, e] = -2.0 * z[:, :d, e + 1]
        middle[:, d, :e] = -2.0 * z[:, d + 1, :e]
        middle[:, d, e] = z[:, d + 1, e + 1]
        left = torch.bmm(self.xa[:, :, : d + 1], middle.mul_(-4.0))
        return torch.bmm(left, self.yb[:, :, : e + 1].transpose(1, 2))


def _augmented(cloud: PreparedCloud) -> torch.Tensor:
    ones = torch.ones(cloud.n_points, 1, dtype=cloud.dtype, device=cloud.device)
    return torch.cat([cloud.points, cloud.sq_norms[:, None], ones], dim=1)


def _matvec(kernel: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K v`` per batch row. (CPU ``bmm`` of a batch of matrix-vector products is very slow.)"""
    if kernel.shape[0] == 1 or kernel.is_cuda:
        return torch.bmm(kernel, v.unsqueeze(2)).squeeze(2)
    return (kernel * v.unsqueeze(1)).sum(2)


def _vecmat(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``K^T u`` per batch row."""
    if kernel.shape[0] == 1 or kernel.is_cuda:
        return torch.bmm(u.unsqueeze(1), kernel).squeeze(1)
    return (kernel * u.unsqueeze(2)).sum(1)


def _sinkhorn(
    grad: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    logp: torch.Tensor,
    logq: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    opts: EntropicOptions,
    tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stabilised, over-relaxed Sinkhorn for a batch, warm started from potentials ``f``, ``g``.

    The coupling is ``T = diag(e^lu) K diag(e^lv)`` with ``K = exp((f + g - grad) / eps)``; each pair
    stops once its marginal error is below its entry of ``tol``. Returns
    ``(K, lu, lv, f, g, err, iterations)``; ``grad`` is overwritten (it becomes log K).
    """
    eps = opts.epsilon
    log_k = grad.neg_().add_(f[:, :, None]).add_(g[:, None, :]).div_(eps)
    # Columns first, in the log domain: every column then sums to q_j, so no entry overflows.
    shift = logq - torch.logsumexp(log_k, dim=1)
    log_k.add_(shift[:, None, :])
    g = g + eps * shift
    kernel = torch.exp(log_k)
    batch = log_k.shape[0]
    device = f.device
    lu = torch.zeros_like(f)
    lv = torch.zeros_like(g)
    # Per-pair relaxation weight; 0 freezes a pair that has converged (its batch mates go on).
    weight = torch.ones(batch, 1, dtype=f.dtype, device=device)
    relaxed = float(opts.overrelaxation)
    err = torch.full((batch,), math.inf, dtype=torch.float64, device=device)
    err_at_switch = err.clone()
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    for it in range(int(opts.max_inner)):
        kv = _matvec(kernel, lv.exp())
        lu.lerp_(logp - kv.clamp_min(_TINY).log(), weight)
        eu = lu.exp()
        ktu = _vecmat(eu, kernel)
        iterations += active
        if it % _CHECK_EVERY == _CHECK_EVERY - 1 or it == int(opts.max_inner) - 1:
            # Marginals of the current (lu, lv): rows from kv, columns from ktu.
            new_err = ((eu * kv - p).abs().sum(1) + (lv.exp() * ktu - q).abs().sum(1)).double()
            err = torch.where(active, new_err, err)
            if it + 1 == _PLAIN_WARMUP and relaxed != 1.0:
                err_at_switch = err.clone()
            # Over-relaxation is not globally convergent: a pair that blows up goes back to plain.
            diverged = active & ((err > _DIVERGENCE_FACTOR * err_at_switch) | ~torch.isfinite(err))
            active = active & ~(err <= tol)
            if not bool(active.any()):
                break
            if bool(diverged.any()):
                weight = torch.where(diverged[:, None], torch.ones_like(weight), weight)
                err_at_switch = torch.where(diverged, torch.full_like(err, math.inf), err_at_switch)
            weight = weight * active[:, None]
        if it + 1 == _PLAIN_WARMUP and relaxed != 1.0:
            weight = torch.where(weight > 0, torch.full_like(weight, relaxed), weight)
        lv.lerp_(logq - ktu.clamp_min(_TINY).log(), weight)
        if bool((lu.abs().amax() > _LOG_SCALING_LIMIT) | (lv.abs().amax() > _LOG_SCALING_LIMIT)):
            too_big = (lu.abs().amax(1) > _LOG_SCALING_LIMIT) | (lv.abs().amax(1) > _LOG_SCALING_LIMIT)
            idx = too_big.nonzero().squeeze(1)
            kernel, f, g, lu, lv = _absorb(idx, log_k, kernel, f, g, lu, lv, logp, eps)
    return kernel, lu, lv, f, g, err, iterations


def _absorb(idx, log_k, kernel, f, g, lu, lv, logp, eps):
    """Move the scalings of pairs ``idx`` into their potentials, renormalise rows, rebuild K."""
    sub = log_k[idx] + lu[idx].unsqueeze(2) + lv[idx].unsqueeze(1)
    shift = logp[idx] - torch.logsumexp(sub, dim=2)  # rows sum to p_i afterwards: no overflow
    sub.add_(shift.unsqueeze(2))
    log_k[idx] = sub
    kernel[idx] = torch.exp(sub)
    f, g, lu, lv = f.clone(), g.clone(), lu.clone(), lv.clone()
    f[idx] += eps * (lu[idx] + shift)
    g[idx] += eps * lv[idx]
    lu[idx] = 0.0
    lv[idx] = 0.0
    return kernel, f, g, lu, lv


def entropic_gw_batch(
    pairs: Sequence[tuple[PreparedCloud, PreparedCloud]],
    options: EntropicOptions | None = None,
    *,
    return_coupling: bool = False,
) -> list[GWResult]:
    """Entropic GW for several pairs at once; pairs of equal shapes share batched products.

    Args:
        pairs: ``(a, b)`` prepared clouds (same normalisation, device and dtype).
        options: solver settings (:class:`EntropicOptions`; defaults when None).
        return_coupling: attach each pair's coupling (numpy, [n_a, n_b]) to its result.

    Returns:
        One :class:`GWResult` per pair, in order.
    """
    opts = options or EntropicOptions()
    results: list[GWResult | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(pairs):
        _check_pair(a, b)
        dense = _use_dense(a, b, opts.representation)
        shape = (a.n_points, b.n_points, a.dim, b.dim, dense, a.device, a.dtype)
        groups.setdefault(shape, []).append(i)
    for (_, _, _, _, dense, device, _), members in groups.items():
        started = time.perf_counter()
        with torch.no_grad(), _flush_denormals(device):
            solved = _solve_group([pairs[i] for i in members], opts, dense, return_coupling)
        seconds = (time.perf_counter() - started) / len(members)
        for i, res in zip(members, solved):
            results[i] = GWResult(**{k: v for k, v in res.items() if not k.startswith("_")}, seconds=seconds)
    return results  # type: ignore[return-value]


def _solve_group(
    pairs: Sequence[tuple[PreparedCloud, PreparedCloud]],
    opts: EntropicOptions,
    dense: bool,
    return_coupling: bool,
    keep_state: bool = False,
) -> list[dict[str, Any]]:
    clouds_a = [a.with_dense_costs() if dense else a for a, _ in pairs]
    clouds_b = [b.with_dense_costs() if dense else b for _, b in pairs]
    products = _Products(clouds_a, clouds_b, dense)
    p = torch.stack([c.weights for c in clouds_a])
    q = torch.stack([c.weights for c in clouds_b])
    logp, logq = p.log(), q.log()
    const = torch.stack([_self_cost_sq(a, a.weights) + _self_cost_sq(b, b.weights)
                         for a, b in zip(clouds_a, clouds_b)])
    batch = len(pairs)
    start = _multiscale_start(clouds_a, clouds_b, opts) if opts.init == "multiscale" else None
    if start is None:
        f = torch.zeros_like(p)
        g = torch.zeros_like(q)
        state, inner = products.state_product(p, q)
    else:
        (coupling, lift_a, lift_b), f, g = start
        state, inner = products.state_block(coupling, lift_a, lift_b)
    prev_obj = const - 2.0 * inner
    index = torch.arange(batch, device=p.device)  # position of each active row in the original batch
    out: list[dict[str, Any] | None] = [None] * batch
    inner_total = torch.zeros(batch, dtype=torch.int64, device=p.device)
    inner_tol = torch.full((batch,), _LOOSE_MARGINAL_TOL, dtype=torch.float64, device=p.device)
    for it in range(1, int(opts.max_iter) + 1):
        grad = products.gradient(state)
        kernel, lu, lv, f, g, err, n_inner = _sinkhorn(grad, f, g, logp, logq, p, q, opts, inner_tol)
        inner_total[index] += n_inner
        eu, ev = lu.exp(), lv.exp()
        state, inner = products.state(kernel, eu, ev)
        obj = const - 2.0 * inner
        change = (obj - prev_obj).abs() / torch.maximum(obj.abs(), 1e-2 * const)
        prev_obj = obj
        # Loose Sinkhorn while the objective still moves, tight once it settles.
        # (never loosened again: a loose projection moves the objective, which would loosen it more)
        inner_tol = torch.minimum(inner_tol, (change * _INNER_TOL_FACTOR).clamp(min=opts.marginal_tol))
        feasible = err <= opts.marginal_tol
        stalled = n_inner >= int(opts.max_inner)  # Sinkhorn could not do better this time
        settled = (change <= opts.tol) & (feasible | stalled) & (it >= 2)  # not on the flat start
        done = settled | (it == int(opts.max_iter))
        if not bool(done.any()):
            continue
        for row in done.nonzero().squeeze(1).tolist():
            orig = int(index[row])
            t = kernel[row] * eu[row][:, None] * ev[row][None, :]
            converged = bool(settled[row] & feasible[row])
            out[orig] = _finish(t, clouds_a[orig], clouds_b[orig], float(inner[row]), it, converged,
                                int(inner_total[orig]), opts, return_coupling)
            if keep_state:  # for the multiscale start: the coupling and the final potentials
                eps = opts.epsilon
                out[orig].update(_coupling=t, _f=f[row] + eps * lu[row], _g=g[row] + eps * lv[row])
        keep = ~done
        if not bool(keep.any()):
            break
        products.select(keep)
        state = state[keep]
        p, q, logp, logq = p[keep], q[keep], logp[keep], logq[keep]
        f, g, const, prev_obj, index = f[keep], g[keep], const[keep], prev_obj[keep], index[keep]
        inner_tol = inner_tol[keep]
    return out  # type: ignore[return-value]


def _multiscale_start(
    clouds_a: Sequence[PreparedCloud], clouds_b: Sequence[PreparedCloud], opts: EntropicOptions,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """Coupling and potentials lifted from the coarsened pairs' solutions (None if not worth it).

    Each cloud is quantised by k-means (:func:`gw.clouds.coarsen`); the coarse pair is solved from
    ``p q^T`` with the same epsilon; its coupling ``P`` lifts to the block coupling
    ``T0_ij = share_i P_{a(i) b(j)} share_j`` (exact marginals) and its potentials to
    ``f_i = f_{a(i)} + eps log share_i`` (likewise ``g``), which already balance the mass between
    clusters: the slow mode of Sinkhorn on clustered clouds.
    """
    if min(clouds_a[0].n_points, clouds_b[0].n_points) < _MIN_MULTISCALE_POINTS:
        return None
    coarse_a = [c.with_coarse() for c in clouds_a]
    coarse_b = [c.with_coarse() for c in clouds_b]
    if any(c.coarse is None for c in coarse_a + coarse_b):
        return None
    if len({c.coarse.n_clusters for c in coarse_a}) > 1 or len({c.coarse.n_clusters for c in coarse_b}) > 1:
        return None
    coarse_opts = dataclasses.replace(opts, init="product")
    solved = _solve_group([(a.coarse.cloud, b.coarse.cloud) for a, b in zip(coarse_a, coarse_b)],
                          coarse_opts, dense=True, return_coupling=False, keep_state=True)
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


def _lift(coarse: Any) -> torch.Tensor:
    """[N, k] matrix with ``share_i`` at (i, label_i): maps a cluster coupling to a block coupling."""
    lift = torch.zeros(coarse.labels.shape[0], coarse.n_clusters, dtype=coarse.share.dtype, device=coarse.share.device)
    return lift.scatter_(1, coarse.labels[:, None], coarse.share[:, None])


def _finish(t: torch.Tensor, a: PreparedCloud, b: PreparedCloud, inner: float, iterations: int,
            converged: bool, n_inner: int, opts: EntropicOptions, return_coupling: bool) -> dict[str, Any]:
    """The result for one pair from its coupling ``t`` and ``<C1 t C2, t>``; checks mass and finiteness."""
    r = t.sum(1, dtype=torch.float64)
    c = t.sum(0, dtype=torch.float64)
    marginal_error = float((r - a.weights.double()).abs().sum() + (c - b.weights.double()).abs().sum())
    value = float(_self_cost_sq(a, r) + _self_cost_sq(b, c)) - 2.0 * inner
    if not math.isfinite(value) or not math.isfinite(marginal_error):
        raise FloatingPointError(
            f"entropic GW produced a non-finite result (value={value}, marginal error={marginal_error}) "
            f"for clouds of {a.n_points} and {b.n_points} points; try a larger epsilon")
    return dict(
        value=max(value, 0.0), solver="entropic", iterations=iterations, converged=converged,
        marginal_error=marginal_error, n_a=a.n_points, n_b=b.n_points, epsilon=float(opts.epsilon),
        inner_iterations=n_inner,
        coupling=t.double().cpu().numpy() if return_coupling else None,
    )


def entropic_gw(
    a: PreparedCloud,
    b: PreparedCloud,
    options: EntropicOptions | None = None,
    *,
    return_coupling: bool = False,
) -> GWResult:
    """Entropic GW between two prepared clouds (see the module docstring)."""
    return entropic_gw_batch([(a, b)], options, return_coupling=return_coupling)[0]


# --------------------------------------------------------------------------------------------------
# The exact reference (POT)
# --------------------------------------------------------------------------------------------------


def exact_gw(
    a: PreparedCloud,
    b: PreparedCloud,
    *,
    max_iter: int = 10_000,
    tol_rel: float = 1e-9,
    tol_abs: float = 1e-9,
    return_coupling: bool = False,
    **pot_kwargs: Any,
) -> GWResult:
    """POT's conditional-gradient GW (``ot.gromov.gromov_wasserstein2``, square loss, float64).

    Dense costs are built from the prepared clouds, so the value is on the same normalised costs as
    the entropic solver's. ``converged`` is False when POT warned (e.g. its transport step hit
    ``numItermaxEmd``) or the iteration cap was reached. Extra keywords go to POT.
    """
    import warnings

    import ot  # imported here: POT is only needed for the reference solver

    _check_pair(a, b)
    started = time.perf_counter()
    c1 = a.costs().double().cpu().numpy()
    c2 = b.costs().double().cpu().numpy()
    p = a.weights.double().cpu().numpy()
    q = b.weights.double().cpu().numpy()
    p, q = p / p.sum(), q / q.sum()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, log = ot.gromov.gromov_wasserstein2(
            c1, c2, p, q, loss_fun="square_loss", log=True, max_iter=max_iter,
            tol_rel=tol_rel, tol_abs=tol_abs, **pot_kwargs)
    coupling = np.asarray(log["T"])
    iterations = max(len(log.get("loss", [])) - 1, 0)
    warned = bool(caught) or bool(log.get("warning"))
    marginal_error = float(np.abs(coupling.sum(1) - p).sum() + np.abs(coupling.sum(0) - q).sum())
    return GWResult(
        value=float(value), solver="exact", iterations=iterations,
        converged=not warned and iterations < max_iter, marginal_error=marginal_error,
        n_a=a.n_points, n_b=b.n_points, epsilon=None, inner_iterations=0,
        seconds=time.perf_counter() - started, coupling=coupling if return_coupling else None,
    )


# --------------------------------------------------------------------------------------------------
# One entry point for a pair
# --------------------------------------------------------------------------------------------------


def gw_pair(
    a: PreparedCloud,
    b: PreparedCloud,
    *,
    solver: str = "entropic",
    options: EntropicOptions | None = None,
    return_coupling: bool = False,
) -> GWResult:
    """GW between two prepared clouds with the named solver (``"entropic"`` or ``"exact"``).

    This is the unit of work a distributed layer fans out: prepare each cloud once
    (:func:`gw.clouds.prepare`), then call this per pair.
    """
    if solver == "entropic":
        return entropic_gw(a, b, options, return_coupling=return_coupling)
    if solver == "exact":
        if options is not None:
            raise ValueError("options apply to the entropic solver only")
        return exact_gw(a, b, return_coupling=return_coupling)
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def gw_distance(
    X: Any,
    Y: Any,
    *,
    solver: str = "entropic",
    options: EntropicOptions | None = None,
    normalisation: Normalisation = DEFAULT_NORMALISATION,
    weights_x: Any = None,
    weights_y: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    return_coupling: bool = False,
) -> GWResult:
    """GW between two raw feature clouds ([N, d] and [M, d']; the dimensions may differ).

    Prepares both clouds (see :func:`gw.clouds.prepare`) and calls :func:`gw_pair`.
    """
    a = prepare(X, weights_x, normalisation=normalisation, device=device, dtype=dtype, name="X")
    b = prepare(Y, weights_y, normalisation=normalisation, device=a.device, dtype=dtype, name="Y")
    return gw_pair(a, b, solver=solver, options=options, return_coupling=return_coupling)
