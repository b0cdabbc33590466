"""Gromov-Wasserstein solvers on prepared feature clouds: one entry point per pair.

Both solvers report the square-loss GW objective of the coupling they return,

    value = sum_{ijkl} (C1_ik - C2_jl)^2 T_ij T_kl        (no entropy term, no square root),

on the normalised costs of the prepared clouds (:mod:`gw.clouds`), so their values compare directly.

* ``"exact"``: POT's conditional-gradient solver (``ot.gromov.gromov_wasserstein2``, square loss,
  float64, dense costs): the reference, O(N^3) per iteration (an exact transport step).
* ``"entropic"``: ours (:mod:`gw.entropic`): torch, float32 by default, CPU or CUDA, factored costs,
  stabilised Sinkhorn, a multiscale start; default ``epsilon`` :data:`~gw.entropic.DEFAULT_EPSILON`
  on mean-normalised costs. Every result carries its marginal error (the plan's mass is checked,
  never trusted).

GW compares intra-cloud costs only, so the two clouds may have different dimensions (``d != d'``) and
different numbers of points.

Pure math: numpy, torch, POT; no I/O.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import torch

from .clouds import DEFAULT_NORMALISATION, Normalisation, PreparedCloud, prepare
from .entropic import DEFAULT_EPSILON, EntropicOptions, check_pair, entropic_gw, entropic_gw_batch, use_dense
from .result import GWResult

__all__ = [
    "DEFAULT_EPSILON", "EntropicOptions", "GWResult", "SOLVERS", "entropic_gw", "entropic_gw_batch",
    "exact_gw", "gw_distance", "gw_pair", "use_dense",
]

SOLVERS: tuple[str, ...] = ("entropic", "exact")


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
    import ot  # only the reference solver needs POT

    check_pair(a, b)
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


def gw_pair(
    a: PreparedCloud,
    b: PreparedCloud,
    *,
    solver: str = "entropic",
    options: EntropicOptions | None = None,
    return_coupling: bool = False,
) -> GWResult:
    """GW between two prepared clouds with the named solver (``"entropic"`` or ``"exact"``).

    The unit of work a distributed layer fans out: prepare each cloud once
    (:func:`gw.clouds.prepare` or :func:`gw.matrix.prepare_fleet`), then call this per pair.
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
    """GW between two raw feature clouds ([N, d] and [M, d']; sizes and dimensions may differ).

    Validates and prepares both clouds (:func:`gw.clouds.prepare`), then calls :func:`gw_pair`.
    """
    a = prepare(X, weights_x, normalisation=normalisation, device=device, dtype=dtype, name="X")
    b = prepare(Y, weights_y, normalisation=normalisation, device=a.device, dtype=dtype, name="Y")
    return gw_pair(a, b, solver=solver, options=options, return_coupling=return_coupling)
