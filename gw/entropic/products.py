"""Products for a batch of pairs: ``C1 T C2`` (dense or factored), ``<C1 T C2, T>``, and exact self terms."""

from __future__ import annotations

from typing import Sequence

import torch

from ..clouds import PreparedCloud

_EXP_FLOOR = -87.0  # kernel exponents are floored here: e^-87 is still a normal float32 (see _exp)


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

    A CPU ``exp`` whose result underflows float32's normal range takes a slow path;
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
        d = self.d
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

