"""Our entropic GW solver: factored squared-Euclidean costs, stabilised Sinkhorn, torch, CPU or CUDA.

The iteration is POT's ``entropic_gromov_wasserstein`` (projected gradient; Peyré, Cuturi & Solomon
2016): ``T <- Sinkhorn(p, q, grad(T), epsilon)`` with ``grad(T) = 2 L(C1, C2) (x) T``, which for the
square loss is ``-4 C1 T C2`` plus terms of the form ``u 1^T + 1 v^T`` (Sinkhorn absorbs those into
its potentials, so they are dropped). Same epsilon, same fixed points, same reported objective.

Products. With ``C = a 1^T + 1 a^T - 2 X X^T`` (``a_i = |x_i|^2``, centred points), everything the
iteration needs comes from ``Z = [X, a, 1]^T T [Y, b, 1]`` ([d + 2, e + 2]): the next gradient is
``[X, a] M [Y, b]^T`` with a small M built from Z, and ``<C1 T C2, T>`` is a closed form in Z. Two
products of O(N M d) per iteration instead of O(N^2 M). For clouds smaller than about 1.6 d the dense
product ``C1 T C2`` is cheaper and is used instead (``representation="auto"``).

Sinkhorn. Scaling form (two matrix-vector products per iteration) with log-domain stabilisation:
each solve starts by normalising the columns of the log-kernel (so no entry overflows; on large CPU
pairs by each column's maximum, the first half-step then starting from ``log q - log colsum``;
exponents are floored at -87, where a CPU ``exp`` would otherwise take its slow underflow path); scalings that
leave [e^-30, e^30] are absorbed into the potentials and the rows renormalised by a log-sum-exp
(Schmitzer 2019), which also recovers rows that underflowed. Potentials are warm started from the
previous outer iteration. Over-relaxation (Thibault et al. 2017; weight 1.8 after 10 plain
iterations, back to plain for a pair whose marginal error blows up) cuts the iterations on
clustered clouds, where plain Sinkhorn crawls while mass moves between weakly coupled clusters.
A pair whose error falls by less than 10% over 50 iterations has stalled and stops there. CPU
float32 denormals are flushed during a solve (they slow the products ~2.5x). The exact value's
self terms ``sum C^2 r r`` come from a per-cloud ``C * C`` (clouds of at most 1024 points).

Start. ``init="multiscale"`` (the default for clouds of >= 64 points) quantises both clouds by
weighted k-means (about 2 sqrt(N) clusters, :func:`gw.clouds.coarsen`), solves the small pair with
block-averaged costs from ``p q^T``, and lifts its coupling and potentials to the full pair; the full
iteration then typically needs 2-4 steps instead of 6-15. ``init="product"`` starts from ``p q^T``
as POT does. Both converge to fixed points of the same iteration; on a non-convex problem they may
reach different ones (on the benchmark's planted clouds our values were within 0.3% of POT's
entropic solver at the same epsilon).

Stopping. Outer iterations stop when the objective's relative change is below ``tol`` (relative to
``max(|value|, 1% of sum C1^2 pp + sum C2^2 qq)`` so near-zero values stop too; the objective of
each coupling with its own marginals), the coupling moved less than ``coupling_tol`` in total
variation since the last or the second-to-last iteration (on plateaus the objective stalls while
the coupling still turns; inexact projections can make the iteration alternate between two nearby
couplings), and the marginal error is below ``marginal_tol`` (or Sinkhorn stalled: then
``converged`` is False, and ``marginal_error`` says by how much). Never on the first step.
Sinkhorn's own tolerance follows the objective: loose (1e-2) while it still moves, ``marginal_tol``
once it settles.

Batches. Pairs of equal shapes are solved together. On CPU, large pairs (>= 128 x 128) run their
Sinkhorn solves pair after pair, each kernel built by one product from the state and kept in
cache across the iterations of its solve (memory-bound: batch-wide sweeps streamed every kernel
twice per iteration); small pairs (the multiscale start's coarse problems) run batched, their
matrix-vector products as broadcast products and row sums, stopped pairs leaving the working set
once they are half of it. Other matrix products run pair by pair (a batched CPU ``bmm`` is slow
for vectors and its bits depend on the batch). On CUDA everything is batched. On CPU a pair's
result is bit-for-bit the same whatever its batch mates and position (per-pair slices are kept
64-byte aligned: CPU kernels round differently on unaligned data), which the exact-tau skipping
of :mod:`gw.matrix` relies on.

Threads. Many small solves on a shared CPU run best with ``OMP_WAIT_POLICY=PASSIVE`` in the
environment (set before torch loads): idle OpenMP workers then sleep instead of spinning, which
otherwise burns CPU and starves the main thread (3-5x slower here under load).

Pure math: torch; no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Sequence

import torch

from .clouds import Coarsening, PreparedCloud
from .result import GWResult

DEFAULT_EPSILON = 0.1
"""Default entropic regularisation, on mean-normalised costs (``normalisation="mean"``).

Chosen on planted-cluster clouds (d = 384, 60-2000 points) where Sinkhorn slows sharply below it:
mass has to move between weakly coupled clusters. The entropic value sits above the exact GW
objective by a blur that shrinks with epsilon and with the number of points (at 0.1: 1-5% on
500-2000 points, 10-20% on 60; a cloud against its own rotation reads ~0.04 instead of 0). For
max-normalised costs the same regime is ``epsilon * (mean / max)^2`` (the gradient scales with the
costs squared).
"""

_LOG_SCALING_LIMIT = 30.0  # absorb scalings into the potentials beyond e^+-30 (float32-safe)
_EXP_FLOOR = -87.0  # kernel exponents are floored here: e^-87 is still a normal float32 (see _exp)
_TINY = 1e-35  # floor for a row/column sum before its log (a normal float32)
_CHECK_EVERY = 5  # Sinkhorn iterations between marginal-error checks
_PLAIN_WARMUP = 10  # plain Sinkhorn iterations before over-relaxing (big early steps overshoot)
_DIVERGENCE_FACTOR = 100.0  # error growth since relaxation started that reverts a pair to plain
_STALL_WINDOW = 50  # Sinkhorn iterations over which progress is measured...
_STALL_PROGRESS = 0.9  # ...a pair whose error did not fall below this fraction has stalled
_LOOSE_MARGINAL_TOL = 1e-2  # Sinkhorn tolerance while the objective still moves a lot
_INNER_TOL_FACTOR = 0.1  # Sinkhorn tolerance = this x the objective's last relative change
_MIN_MULTISCALE_POINTS = 64  # below this, start from p q^T
SQ_COSTS_MAX_POINTS = 1024  # exact self terms from a cached C * C up to this many points (8 MiB)
_PAIRWISE_MIN_ENTRIES = 128 * 128  # CPU Sinkhorn pair after pair from this kernel size (cache-bound)


@dataclass(frozen=True)
class EntropicOptions:
    """Settings of the entropic solver (all of them are part of a pair's cache key).

    Attributes:
        epsilon: entropic regularisation on the normalised costs.
        tol: stop when the objective's relative change between outer iterations is below this...
        coupling_tol: ...and the coupling moved less than this (``|T_k - T_{k-1}|_1``, total mass 1).
        max_iter: cap on outer iterations.
        marginal_tol: Sinkhorn target for ``|T 1 - p|_1 + |T^T 1 - q|_1``.
        max_inner: cap on Sinkhorn iterations per outer iteration.
        overrelaxation: Sinkhorn over-relaxation weight in [1, 2) (1 = plain Sinkhorn).
        representation: ``"auto"``, ``"factored"`` (O(N M d) products) or ``"dense"`` (O(N M (N + M))).
        init: ``"multiscale"`` (lifted k-means-coarsened solution) or ``"product"`` (``p q^T``).
        rank_tol: iterate on the clouds' leading principal coordinates, keeping all but this
            share of each Gram matrix's squared Frobenius norm (``0``: full rank); the reported
            value is always the exact objective of the final coupling. With it, ``representation``
            is factored.
    """

    epsilon: float = DEFAULT_EPSILON
    tol: float = 1e-3
    coupling_tol: float = 5e-3
    max_iter: int = 100
    marginal_tol: float = 2e-3
    max_inner: int = 300
    overrelaxation: float = 1.8
    representation: Literal["auto", "factored", "dense"] = "auto"
    init: Literal["multiscale", "product"] = "multiscale"
    rank_tol: float = 1e-4

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon!r}")
        if not (self.tol > 0 and self.marginal_tol > 0 and self.coupling_tol > 0):
            raise ValueError("tol, coupling_tol and marginal_tol must be positive")
        if int(self.max_iter) < 2 or int(self.max_inner) < 1:
            raise ValueError("max_iter must be >= 2 and max_inner >= 1")
        if not 1.0 <= self.overrelaxation < 2.0:
            raise ValueError(f"overrelaxation must be in [1, 2), got {self.overrelaxation}")
        if self.representation not in ("auto", "factored", "dense"):
            raise ValueError(f"representation must be 'auto', 'factored' or 'dense', got {self.representation!r}")
        if not (isinstance(self.rank_tol, (int, float)) and 0.0 <= self.rank_tol < 1.0):
            raise ValueError(f"rank_tol must be in [0, 1), got {self.rank_tol!r}")
        if self.init not in ("multiscale", "product"):
            raise ValueError(f"init must be 'multiscale' or 'product', got {self.init!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Products for a batch of pairs
# --------------------------------------------------------------------------------------------------


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned copy: CPU kernels may round differently on unaligned data, which would
    make a pair's result depend on its position in a batch."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _aligned_batch_like(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, N, M] like ``x`` whose per-pair slices start on 64-byte boundaries (CPU)."""
    batch, n, m = x.shape
    per = n * m
    stride = -(-per // 16) * 16
    if x.is_cuda or stride == per:
        return torch.empty_like(x)
    return torch.empty(batch, stride, dtype=x.dtype, device=x.device)[:, :per].view(batch, n, m)


def _exp(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(x)`` with the arguments floored at ``_EXP_FLOOR`` (``x`` itself unchanged).

    A CPU ``exp`` whose result underflows float32's normal range takes a slow path (~25x slower);
    log-kernels have most entries far below -87, so unfloored they would dominate the solve. The
    floor puts ~1e-38 where the exact value is smaller (or 0 after underflow): at most
    ``N M 1e-38 e^60`` of mass even at the absorption limit of the scalings, nothing in practice.
    """
    out = torch.clamp(x, min=_EXP_FLOOR, out=out) if out is not None else x.clamp(min=_EXP_FLOOR)
    return out.exp_()


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logsumexp`` over ``dim`` without the slow underflowing ``exp`` (terms below e^-87 of the
    largest one are floored at it: a relative change of at most ``n 1e-38``)."""
    top = x.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return (top.squeeze(dim) + _exp(x - top).sum(dim=dim).log())


def _per_pair(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each pair's (aligned) slices, stacked: the same bits whatever the batch."""
    return torch.stack([fn(*(_aligned(t[i]) for t in tensors)) for i in range(tensors[0].shape[0])])


class _Products:
    """``C1 T C2`` (its state) and ``<C1 T C2, T>`` for a batch, dense or factored."""

    def __init__(self, clouds_a: Sequence[PreparedCloud], clouds_b: Sequence[PreparedCloud], dense: bool):
        self.dense = dense
        self.batched = clouds_a[0].device.type == "cuda"
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

    def _mm3(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.batched:
            return torch.bmm(torch.bmm(a, b), c)
        return _per_pair(lambda x, y, z: (x @ y) @ z, a, b, c)

    def _inner(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.batched:
            return (h * t).sum(dim=(1, 2), dtype=torch.float64)
        return _per_pair(lambda x, y: (x * y).sum(dtype=torch.float64), h, t)

    def state(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """State and ``<C1 T C2, T>`` for the coupling ``t`` [B, N, M]."""
        if self.dense:
            h = self._mm3(self.c1, t, self.c2)  # C1 T C2
            return h, self._inner(h, t)
        z = self._mm3(self.xa.transpose(1, 2), t, self.yb)  # Z = [X, a, 1]^T T [Y, b, 1]
        return z, self._inner_from_z(z)

    def state_product(self, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """State for ``T = p q^T`` (rank one: cheap)."""
        if self.dense:
            c1p = _per_pair(torch.mv, self.c1, p)
            c2q = _per_pair(torch.mv, self.c2, q)
            h = c1p[:, :, None] * c2q[:, None, :]
            return h, ((c1p * p).sum(1, dtype=torch.float64) * (c2q * q).sum(1, dtype=torch.float64))
        left = _per_pair(torch.mv, self.xa.transpose(1, 2), p)
        right = _per_pair(torch.mv, self.yb.transpose(1, 2), q)
        z = left[:, :, None] * right[:, None, :]
        return z, self._inner_from_z(z)

    def state_block(
        self, coupling: torch.Tensor, lift_a: torch.Tensor, lift_b: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """State for the block coupling ``T0 = lift_a P lift_b^T`` (never materialised; O(N k (N + M)))."""
        if self.dense:
            def block_state(c1, la, pp, lb, c2):
                h = ((c1 @ la) @ pp) @ (lb.T @ c2)  # C1 T0 C2
                return torch.cat([h.reshape(-1), ((la.T @ h) @ lb).reshape(-1)])

            stacked = _per_pair(block_state, self.c1, lift_a, coupling, lift_b, self.c2)
            n, m = self.c1.shape[1], self.c2.shape[1]
            h = stacked[:, : n * m].reshape(-1, n, m)
            blocks = stacked[:, n * m:].reshape(coupling.shape)
            return h, self._inner(blocks, coupling)
        z = _per_pair(lambda xa, la, pp, lb, yb: ((xa.T @ la) @ pp) @ (lb.T @ yb),
                      self.xa, lift_a, coupling, lift_b, self.yb)
        return z, self._inner_from_z(z)

    def _inner_from_z(self, z: torch.Tensor) -> torch.Tensor:
        return _inner_from_z(z, self.d, self.e)

    def _middle(self, z: torch.Tensor) -> torch.Tensor:
        """M with ``gradient = [X, a] M [Y, b]^T`` (up to rank-one terms), from ``Z`` ([B, ...])."""
        d, e = self.d, self.e
        middle = torch.empty(z.shape[0], d + 1, e + 1, dtype=z.dtype, device=z.device)
        middle[:, :d, :e] = 4.0 * z[:, :d, :e]
        middle[:, :d, e] = -2.0 * z[:, :d, e + 1]
        middle[:, d, :e] = -2.0 * z[:, d + 1, :e]
        middle[:, d, e] = z[:, d + 1, e + 1]
        return middle.mul_(-4.0)

    def gradient(self, state: torch.Tensor) -> torch.Tensor:
        """``-4 C1 T C2`` up to rank-one terms ``u 1^T + 1 v^T`` (a new tensor)."""
        if self.dense:
            return state.mul(-4.0)
        d, e = self.d, self.e
        return self._mm3(self.xa[:, :, : d + 1], self._middle(state), self.yb[:, :, : e + 1].transpose(1, 2))

    def log_kernels(self, state: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float):
        """Per pair (CPU), ``(f_i + g_j - gradient_ij) / eps`` as a new aligned [N, M] tensor: one
        product ``[X M', f / eps, 1] [Y, b, 1, g / eps]^T`` when factored (no passes over the
        gradient itself). A generator over the pairs of the batch, in order."""
        if self.dense:
            for b in range(state.shape[0]):
                yield (_aligned(state[b]) * (4.0 / eps)).add_(f[b][:, None] / eps).add_(g[b][None, :] / eps)
            return
        d, e = self.d, self.e
        middle = self._middle(state).div_(-eps)
        for b in range(state.shape[0]):
            xa, yb = _aligned(self.xa[b]), _aligned(self.yb[b])
            left = torch.cat([xa[:, : d + 1] @ middle[b], f[b][:, None] / eps, xa[:, d + 1:]], dim=1)
            right = torch.cat([yb, g[b][:, None] / eps], dim=1)
            yield left @ right.T


def _inner_from_z(z: torch.Tensor, d: int, e: int) -> torch.Tensor:
    """``<C1 T C2, T>`` from ``Z = [X, a, 1]^T T [Y, b, 1]`` (every term of the expansion)."""
    z = z.double()
    k = z[:, :d, :e]  # X^T T Y
    x_r, y_c = z[:, :d, e + 1], z[:, d + 1, :e]  # X^T r, Y^T c
    a_r, b_c, mass = z[:, d, e + 1], z[:, d + 1, e], z[:, d + 1, e + 1]
    a_t_b, a_t_y, x_t_b = z[:, d, e], z[:, d, :e], z[:, :d, e]
    return (2.0 * b_c * a_r + 2.0 * mass * a_t_b - 4.0 * (a_t_y * y_c).sum(1)
            - 4.0 * (x_t_b * x_r).sum(1) + 4.0 * (k * k).sum(dim=(1, 2)))


def _augmented(cloud: PreparedCloud) -> torch.Tensor:
    ones = torch.ones(cloud.n_points, 1, dtype=cloud.dtype, device=cloud.device)
    return torch.cat([cloud.points, cloud.sq_norms[:, None], ones], dim=1)


def self_cost_sq(cloud: PreparedCloud, r: torch.Tensor) -> torch.Tensor:
    """``sum_ik r_i r_k C_ik^2`` as a float64 scalar (O(N^2) with dense costs, else O(N d^2))."""
    r64 = r.double()
    if cloud.sq_costs is not None:
        return r64 @ (cloud.sq_costs @ r64)
    if cloud.dense_costs is not None:
        c = cloud.dense_costs.double()
        return r64 @ ((c * c) @ r64)
    x = cloud.points
    gram = ((x * r.to(x.dtype)[:, None]).T @ x).double()
    x64, a = x.double(), cloud.sq_norms.double()
    ra = r64 * a
    return (2.0 * r64.sum() * (ra * a).sum() + 2.0 * ra.sum() ** 2 + 4.0 * (gram * gram).sum()
            - 8.0 * (ra @ x64) @ (r64 @ x64))


# --------------------------------------------------------------------------------------------------
# Sinkhorn
# --------------------------------------------------------------------------------------------------


@contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """Flush float32 denormals on CPU while solving; restores the default (off) afterwards."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def _matvec(kernel: torch.Tensor, v: torch.Tensor, active: list[int]) -> torch.Tensor:
    """``K v`` (entries of inactive pairs are not used). Batched: ``bmm`` on CUDA; on CPU (small
    kernels: large ones go through :func:`_sinkhorn_pairwise`) a broadcast product and a row sum,
    whose bits do not depend on the batch (a CPU ``bmm`` does, and is slow for vectors)."""
    if kernel.is_cuda:
        return torch.bmm(kernel, v.unsqueeze(2)).squeeze(2)
    return (kernel * v[:, None, :]).sum(2)


def _vecmat(u: torch.Tensor, kernel: torch.Tensor, active: list[int]) -> torch.Tensor:
    """``K^T u`` (entries of inactive pairs are not used)."""
    if kernel.is_cuda:
        return torch.bmm(u.unsqueeze(1), kernel).squeeze(1)
    return (u[:, :, None] * kernel).sum(1)


def _lse(x: torch.Tensor, dim: int, batched: bool) -> torch.Tensor:
    """log-sum-exp over ``dim`` of a [B, N, M] tensor (pair by pair unless batched)."""
    if batched:
        return torch.logsumexp(x, dim=dim)
    return _per_pair(lambda t: _logsumexp(t, dim - 1), x)


def _sinkhorn(
    grad: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    marg: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    opts: EntropicOptions,
    tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stabilised, over-relaxed Sinkhorn for a batch, warm started from potentials ``f``, ``g``.

    The coupling is ``diag(e^lu) K diag(e^lv)`` with ``K = exp((f + g - grad) / eps)``; a pair stops
    once its marginal error is at most its entry of ``tol``. ``marg = (p, q, log p, log q)``.
    A pair also stops when its error fell by less than 10% over the last 50 iterations (stalled).
    Stopped pairs leave the working set once they are half of it (every operation is per pair, so
    that changes no bits). Returns ``(K, lu, lv, f, g, err, iterations, stalled)``; ``grad`` is
    overwritten (becomes log K).
    """
    p, q, logp, logq = marg
    eps = opts.epsilon
    batched = grad.is_cuda
    log_k = grad.neg_().add_(f[:, :, None]).add_(g[:, None, :]).div_(eps)
    # Columns first, in the log domain: each column then sums to q_j, so no entry overflows.
    shift = logq - _lse(log_k, 1, batched)
    log_k.add_(shift[:, None, :])
    g = g + eps * shift
    kernel = _exp(log_k, out=_aligned_batch_like(log_k))
    batch, n_rows = f.shape
    device = f.device
    # outputs, by original position
    out_f, out_g = f.clone(), g.clone()
    out_lu, out_lv = torch.zeros_like(f), torch.zeros_like(g)
    out_err = torch.full((batch,), math.inf, dtype=torch.float64, device=device)
    out_iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    out_stalled = torch.zeros(batch, dtype=torch.bool, device=device)
    # the working set
    rows = torch.arange(batch, device=device)
    K, LK, tol = kernel, log_k, tol.clone()
    luv = torch.zeros(batch, n_rows + g.shape[1], dtype=f.dtype, device=device)
    lu, lv = luv[:, :n_rows], luv[:, n_rows:]
    weight = torch.ones(batch, 1, dtype=f.dtype, device=device)  # 0 freezes a converged pair
    relaxed = float(opts.overrelaxation)
    err = torch.full((batch,), math.inf, dtype=torch.float64, device=device)
    err_at_switch = err.clone()
    iterations = torch.zeros(batch, dtype=torch.int64, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    stalled = torch.zeros(batch, dtype=torch.bool, device=device)
    reference = err.clone()  # error at the start of the current stall window
    compacted = False

    def finish(local: torch.Tensor) -> None:
        idx = rows[local]
        out_f[idx], out_g[idx], out_lu[idx], out_lv[idx] = f[local], g[local], lu[local], lv[local]
        out_err[idx], out_iterations[idx], out_stalled[idx] = err[local], iterations[local], stalled[local]
        if compacted:
            kernel[idx] = K[local]

    max_inner = int(opts.max_inner)
    for it in range(max_inner):
        kv = _matvec(K, lv.exp(), [])
        lu.lerp_(logp - kv.clamp_min(_TINY).log(), weight)
        eu = lu.exp()
        ktu = _vecmat(eu, K, [])
        if it % _CHECK_EVERY == _CHECK_EVERY - 1 or it == max_inner - 1:
            # marginals of the current (lu, lv): rows from kv, columns from ktu
            new_err = ((eu * kv - p).abs().sum(1) + (lv.exp() * ktu - q).abs().sum(1)).double()
            err = torch.where(active, new_err, err)
            if it + 1 == _PLAIN_WARMUP:
                err_at_switch = err.clone()
            diverged = active & ((err > _DIVERGENCE_FACTOR * err_at_switch) | ~torch.isfinite(err))
            if (it + 1) % _STALL_WINDOW == 0:
                # crawling (the slow inter-cluster mode): more iterations buy little; stop here
                stalled = stalled | (active & (err > _STALL_PROGRESS * reference))
                reference = err.clone()
            done = active & ((err <= tol) | stalled)
            iterations = torch.where(done, torch.full_like(iterations, it + 1), iterations)
            active = active & ~done
            n_active = int(active.sum())
            if n_active == 0:
                break
            if bool(diverged.any()):
                weight = torch.where(diverged[:, None], torch.ones_like(weight), weight)
                err_at_switch = torch.where(diverged, torch.full_like(err, math.inf), err_at_switch)
            weight = weight * active[:, None]
            if n_active <= rows.shape[0] // 2:
                finish((~active).nonzero().squeeze(1))
                keep = active.nonzero().squeeze(1)
                rows, K, LK, tol, luv, f, g = (x[keep] for x in (rows, K, LK, tol, luv, f, g))
                lu, lv = luv[:, :n_rows], luv[:, n_rows:]
                p, q, logp, logq = (x[keep] for x in (p, q, logp, logq))
                weight, err, err_at_switch, reference = (x[keep] for x in (weight, err, err_at_switch, reference))
                iterations, stalled, active = iterations[keep], stalled[keep], active[keep]
                ktu = ktu[keep]
                compacted = True
        if it + 1 == _PLAIN_WARMUP and relaxed != 1.0:
            weight = torch.where(weight > 0, torch.full_like(weight, relaxed), weight)
        lv.lerp_(logq - ktu.clamp_min(_TINY).log(), weight)
        if float(luv.abs().amax()) > _LOG_SCALING_LIMIT:
            too_big = luv.abs().amax(1) > _LOG_SCALING_LIMIT
            K, f, g, lu, lv = _absorb(too_big.nonzero().squeeze(1), LK, K, f, g, lu, lv, logp, eps)
            luv = torch.cat([lu, lv], dim=1)
            lu, lv = luv[:, :n_rows], luv[:, n_rows:]
    # still short of the tolerance at max_inner
    iterations = torch.where(active, torch.full_like(iterations, it + 1), iterations)
    stalled = stalled | active
    finish(torch.arange(rows.shape[0], device=device))
    return kernel, out_lu, out_lv, out_f, out_g, out_err, out_iterations, out_stalled


def _absorb(idx, log_k, kernel, f, g, lu, lv, logp, eps):
    """Move the scalings of pairs ``idx`` into their potentials, renormalise rows, rebuild K."""
    sub = log_k[idx] + lu[idx].unsqueeze(2) + lv[idx].unsqueeze(1)
    shift = logp[idx] - _lse(sub, 2, sub.is_cuda)  # rows sum to p_i afterwards: no overflow
    sub.add_(shift.unsqueeze(2))
    log_k[idx] = sub
    kernel[idx] = _exp(sub)
    f, g, lu, lv = f.clone(), g.clone(), lu.clone(), lv.clone()
    f[idx] += eps * (lu[idx] + shift)
    g[idx] += eps * lv[idx]
    lu[idx] = 0.0
    lv[idx] = 0.0
    return kernel, f, g, lu, lv


def _sinkhorn_pairwise(
    products: _Products,
    state: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    marg: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    opts: EntropicOptions,
    tol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_sinkhorn` pair after pair (CPU, large pairs): the same iteration and stopping rules.

    A pair's whole solve runs before the next one starts, so its kernel stays in cache across the
    two matrix-vector products of every iteration (batch-wide sweeps stream each kernel from memory
    twice per iteration), and no work is spent on pairs that already stopped. Each kernel is built
    from the state in one product (:meth:`_Products.log_kernels`), its columns normalised in the
    log domain by their maximum (the first half-step of Sinkhorn then starts from ``log q - log
    colsum``). Returns ``(T, lu, lv, f, g, err, iterations, stalled)`` with ``T`` the coupling.
    """
    p, q, logp, logq = marg
    eps = opts.epsilon
    batch, n_rows, n_cols = state.shape[0], p.shape[1], q.shape[1]
    coupling = torch.empty(batch, -(-n_rows * n_cols // 16) * 16, dtype=p.dtype)[:, : n_rows * n_cols]
    coupling = coupling.view(batch, n_rows, n_cols)
    f, g = f.clone(), g.clone()
    lu, lv = torch.zeros_like(f), torch.zeros_like(g)
    err = torch.full((batch,), math.inf, dtype=torch.float64)
    iterations = torch.zeros(batch, dtype=torch.int64)
    stalled = torch.zeros(batch, dtype=torch.bool)
    relaxed = float(opts.overrelaxation)
    max_inner = int(opts.max_inner)
    tols = tol.tolist()
    for b, log_k in enumerate(products.log_kernels(state, f, g, eps)):
        top = log_k.amax(dim=0)
        log_k.sub_(top[None, :])  # every column's largest entry is 0: no overflow
        k = coupling[b]
        _exp(log_k, out=k)
        kt = k.T
        fb, gb = f[b], g[b] + eps * top
        pb, qb, logpb, logqb = _aligned(p[b]), _aligned(q[b]), _aligned(logp[b]), _aligned(logq[b])
        # scalings in one buffer (one overflow test for both); lv starts at log q - log colsum
        luv = torch.empty(n_rows + n_cols, dtype=p.dtype)
        lub, lvb = luv[:n_rows], luv[n_rows:]
        lub.zero_()
        torch.sub(logqb, k.sum(dim=0).clamp_min_(_TINY).log_(), out=lvb)
        evb = torch.exp(lvb)
        weight = 1.0
        e_b, e_switch, reference = math.inf, math.inf, math.inf
        stop = False
        n = 0
        for it in range(max_inner):
            kv = torch.mv(k, evb)
            lub.lerp_(logpb - kv.clamp_min(_TINY).log_(), weight)
            eu = torch.exp(lub)
            ktu = torch.mv(kt, eu)
            n += 1
            if it % _CHECK_EVERY == _CHECK_EVERY - 1 or it == max_inner - 1:
                e_b = float((eu * kv - pb).abs_().sum() + (evb * ktu - qb).abs_().sum())
                if it + 1 == _PLAIN_WARMUP:
                    e_switch = e_b
                diverged = e_b > _DIVERGENCE_FACTOR * e_switch or not math.isfinite(e_b)
                if (it + 1) % _STALL_WINDOW == 0:
                    if e_b > _STALL_PROGRESS * reference:
                        stalled[b] = True
                        stop = True
                    reference = e_b
                if e_b <= tols[b] or stop:
                    stop = True
                    break
                if diverged:
                    weight, e_switch = 1.0, math.inf
            if it + 1 == _PLAIN_WARMUP and relaxed != 1.0:
                weight = relaxed
            lvb.lerp_(logqb - ktu.clamp_min_(_TINY).log_(), weight)
            low, high = torch.aminmax(luv)
            if max(float(high), -float(low)) > _LOG_SCALING_LIMIT:
                # absorb the scalings into the potentials, renormalise the rows (no overflow)
                log_k.add_(lub[:, None]).add_(lvb[None, :])
                row_shift = logpb - _logsumexp(log_k, 1)
                log_k.add_(row_shift[:, None])
                _exp(log_k, out=k)
                fb = fb + eps * (lub + row_shift)
                gb = gb + eps * lvb
                luv.zero_()
            evb = torch.exp(lvb)
        if not stop:
            stalled[b] = True  # still short of the tolerance at max_inner
        k.mul_(torch.exp(lub)[:, None]).mul_(evb[None, :])  # the coupling, in place, while in cache
        err[b], iterations[b] = e_b, n
        f[b], g[b], lu[b], lv[b] = fb, gb, lub, lvb
    return coupling, lu, lv, f, g, err, iterations, stalled


# --------------------------------------------------------------------------------------------------
# The outer iteration
# --------------------------------------------------------------------------------------------------


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
    # one fused pass per pair (a float64 sum of |x - y| costs ~4x more; float32 cascade sums are
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
