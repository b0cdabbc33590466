"""Stabilised, over-relaxed Sinkhorn for a batch of pairs: batched and pair after pair, one stopping rule."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .options import EntropicOptions
from .products import _aligned, _aligned_batch_like, _exp, _logsumexp, _per_pair, _Products

_LOG_SCALING_LIMIT = 30.0  # absorb scalings into the potentials beyond e^+-30 (float32-safe)
_TINY = 1e-35  # floor for a row/column sum before its log (a normal float32)
_CHECK_EVERY = 5  # Sinkhorn iterations between marginal-error checks
_PLAIN_WARMUP = 10  # plain Sinkhorn iterations before over-relaxing (big early steps overshoot)
_DIVERGENCE_FACTOR = 100.0  # error growth since relaxation started that reverts a pair to plain
_STALL_WINDOW = 50  # Sinkhorn iterations over which progress is measured...
_STALL_PROGRESS = 0.9  # ...a pair whose error did not fall below this fraction has stalled

# (kernel or coupling, lu, lv, f, g, err, iterations, stalled): what both loops return
_SinkhornOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     torch.Tensor, torch.Tensor]


@contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """Flush float32 denormals on CPU while solving; restores the default (off) afterwards."""
    enabled = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def _matvec(kernel: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K v`` for a batch. Batched: ``bmm`` on CUDA; on CPU (small kernels: large ones go through :func:`_sinkhorn_pairwise`) a broadcast product and a row sum,
    whose bits do not depend on the batch (a CPU ``bmm`` does, and is slow for vectors)."""
    if kernel.is_cuda:
        return torch.bmm(kernel, v.unsqueeze(2)).squeeze(2)
    return (kernel * v[:, None, :]).sum(2)


def _vecmat(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``K^T u`` for a batch (as :func:`_matvec`)."""
    if kernel.is_cuda:
        return torch.bmm(u.unsqueeze(1), kernel).squeeze(1)
    return (u[:, :, None] * kernel).sum(1)


def _lse(x: torch.Tensor, dim: int, batched: bool) -> torch.Tensor:
    """log-sum-exp over ``dim`` of a [B, N, M] tensor (pair by pair unless batched)."""
    if batched:
        return torch.logsumexp(x, dim=dim)
    return _per_pair(lambda t: _logsumexp(t, dim - 1), x)


def _is_check(it: int, max_inner: int) -> bool:
    """Whether the marginal error is measured after iteration ``it`` (0-based)."""
    return it % _CHECK_EVERY == _CHECK_EVERY - 1 or it == max_inner - 1


def _not_finite(x: Any) -> Any:
    return ~torch.isfinite(x) if isinstance(x, torch.Tensor) else not math.isfinite(x)


def _stopping_rule(it: int, err: Any, tol: Any, at_switch: Any, reference: Any, stalled: Any,
                   active: Any = True) -> tuple[Any, Any, Any, Any, Any]:
    """The stopping rule of both Sinkhorn loops at a check after iteration ``it`` (0-based).

    One pair (floats, bools) or a batch (tensors, with ``active`` the pairs still running).
    ``at_switch`` is the error when over-relaxation started (``_PLAIN_WARMUP``); an error
    ``_DIVERGENCE_FACTOR`` times above it, or not finite, has diverged (the caller reverts the pair to
    plain Sinkhorn and sets ``at_switch`` to inf). Every ``_STALL_WINDOW`` iterations a pair whose error
    did not fall below ``_STALL_PROGRESS`` of ``reference`` (the error at the window's start) has
    stalled. A pair is done at ``err <= tol`` or once stalled.

    Returns ``(done, diverged, at_switch, reference, stalled)``.
    """
    if it + 1 == _PLAIN_WARMUP:
        at_switch = err
    diverged = active & ((err > _DIVERGENCE_FACTOR * at_switch) | _not_finite(err))
    if (it + 1) % _STALL_WINDOW == 0:
        # crawling (the slow inter-cluster mode): more iterations buy little; stop here
        stalled = stalled | (active & (err > _STALL_PROGRESS * reference))
        reference = err
    done = active & ((err <= tol) | stalled)
    return done, diverged, at_switch, reference, stalled


def _sinkhorn(
    grad: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    marg: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    opts: EntropicOptions,
    tol: torch.Tensor,
) -> _SinkhornOut:
    """Stabilised, over-relaxed Sinkhorn for a batch, warm started from potentials ``f``, ``g``.

    The coupling is ``diag(e^lu) K diag(e^lv)`` with ``K = exp((f + g - grad) / eps)``; a pair stops
    once its marginal error is at most its entry of ``tol``. ``marg = (p, q, log p, log q)``.
    A pair also stops when it stalled (:func:`_stopping_rule`).
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
        kv = _matvec(K, lv.exp())
        lu.lerp_(logp - kv.clamp_min(_TINY).log(), weight)
        eu = lu.exp()
        ktu = _vecmat(eu, K)
        if _is_check(it, max_inner):
            # marginals of the current (lu, lv): rows from kv, columns from ktu
            new_err = ((eu * kv - p).abs().sum(1) + (lv.exp() * ktu - q).abs().sum(1)).double()
            err = torch.where(active, new_err, err)
            done, diverged, err_at_switch, reference, stalled = _stopping_rule(
                it, err, tol, err_at_switch, reference, stalled, active)
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
) -> _SinkhornOut:
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
        # K = exp(log_k - top): the potentials behind K are (f, g - eps top). (With + here g doubled
        # every outer iteration; in float32 the kernel then lost its precision and collapsed to p q^T.)
        fb, gb = f[b], g[b] - eps * top
        pb, qb, logpb, logqb = _aligned(p[b]), _aligned(q[b]), _aligned(logp[b]), _aligned(logq[b])
        # scalings in one buffer (one overflow test for both); lv starts at log q - log colsum
        luv = torch.empty(n_rows + n_cols, dtype=p.dtype)
        lub, lvb = luv[:n_rows], luv[n_rows:]
        lub.zero_()
        torch.sub(logqb, k.sum(dim=0).clamp_min_(_TINY).log_(), out=lvb)
        evb = torch.exp(lvb)
        weight = 1.0
        e_b, e_switch, reference = math.inf, math.inf, math.inf
        stop = stalled_b = False
        n = 0
        for it in range(max_inner):
            kv = torch.mv(k, evb)
            lub.lerp_(logpb - kv.clamp_min(_TINY).log_(), weight)
            eu = torch.exp(lub)
            ktu = torch.mv(kt, eu)
            n += 1
            if _is_check(it, max_inner):
                e_b = float((eu * kv - pb).abs_().sum() + (evb * ktu - qb).abs_().sum())
                stop, diverged, e_switch, reference, stalled_b = _stopping_rule(
                    it, e_b, tols[b], e_switch, reference, stalled_b)
                if stop:
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
        stalled[b] = stalled_b or not stop  # not stopped: still short of the tolerance at max_inner
        k.mul_(torch.exp(lub)[:, None]).mul_(evb[None, :])  # the coupling, in place, while in cache
        err[b], iterations[b] = e_b, n
        f[b], g[b], lu[b], lv[b] = fb, gb, lub, lvb
    return coupling, lu, lv, f, g, err, iterations, stalled

