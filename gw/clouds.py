"""Feature clouds as metric-measure spaces, prepared once for many GW pairs.

A feature cloud ``X`` ([N, d], one row per response) with weights ``p`` (uniform by default) is the
metric-measure space whose cost is the squared Euclidean distance ``C_ik = |x_i - x_k|^2``. The cost
is normalised so that scales compare across models:

* ``"mean"`` (the default): ``C / sum_ik p_i p_k C_ik``, i.e. the normalised costs have mean 1
  under ``p (x) p``. It costs O(N d), and a single outlier response barely moves it.
* ``"max"``: ``C / max C``, normalised costs in [0, 1]. It costs O(N^2 d) and follows outliers.

:func:`prepare` does that once per cloud (weighted centring, scaling, squared norms) so a cloud is
reused across its n - 1 pairs. Because the cost is squared Euclidean, it never has to be
materialised: ``C = a 1^T + 1 a^T - 2 X X^T`` with ``a_i = |x_i|^2``, and the solvers use that factored
form (see :mod:`gw.entropic`). Preparation runs in float64 (centring before scaling, so clouds far from
the origin or with huge norms lose nothing), then stores the solver dtype.

GW of two clouds may mix dimensions (``d != d'``): GW compares intra-cloud costs only.

Pure math: numpy and torch; no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .keys import content_key

Normalisation = Literal["mean", "max"]
NORMALISATIONS: tuple[str, ...] = ("mean", "max")
DEFAULT_NORMALISATION: Normalisation = "mean"

_MAX_BLOCK_ELEMENTS = 1 << 24  # rows x N of a cost block computed at once (64 MiB in float32)


@dataclass(frozen=True, eq=False)
class PreparedCloud:
    """A cloud centred and scaled so that its normalised cost is ``a 1^T + 1 a^T - 2 X X^T``.

    Attributes:
        points: [N, d] centred, scaled points (solver dtype, on the solver device).
        sq_norms: [N] ``|points_i|^2``.
        weights: [N] probability weights (sum 1), same dtype and device.
        scale: the normaliser, in the squared units of the original features (costs were divided by it).
        normalisation: ``"mean"`` or ``"max"``.
        key: an optional content key (e.g. :func:`feature_key` of the raw features).
        dense_costs: the [N, N] normalised cost matrix when it was asked for (small clouds only).
        coarse: its k-means :class:`Coarsening` when asked for (the solver's multiscale start).
        principal: ``(tol, coordinates)`` when asked for: see :meth:`with_principal`.
        sq_costs: the [N, N] float64 squared normalised costs ``C * C`` when asked for: see
            :meth:`with_sq_costs`.
    """

    points: torch.Tensor
    sq_norms: torch.Tensor
    weights: torch.Tensor
    scale: float
    normalisation: str
    key: str | None = None
    uniform: bool = True
    dense_costs: torch.Tensor | None = field(default=None, repr=False)
    coarse: "Coarsening | None" = field(default=None, repr=False)
    principal: "tuple[float, torch.Tensor] | None" = field(default=None, repr=False)
    sq_costs: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    @property
    def device(self) -> torch.device:
        return self.points.device

    @property
    def dtype(self) -> torch.dtype:
        return self.points.dtype

    def costs(self) -> torch.Tensor:
        """The [N, N] normalised cost matrix (materialised; O(N^2 d))."""
        if self.dense_costs is not None:
            return self.dense_costs
        return pairwise_costs(self.points, self.sq_norms)

    def with_dense_costs(self) -> "PreparedCloud":
        """A copy that carries its dense cost matrix (for solvers that use it on small clouds)."""
        if self.dense_costs is not None:
            return self
        return dataclasses.replace(self, dense_costs=pairwise_costs(self.points, self.sq_norms))

    def with_principal(self, tol: float) -> "PreparedCloud":
        """A copy that carries its leading principal coordinates ([N, r], r <= d).

        r is the smallest rank whose Gram matrix ``X_r X_r^T`` keeps all but ``tol`` of the
        squared Frobenius norm of ``X X^T`` (sum of sigma^4): the rest of the cost is
        ``-2 X_perp X_perp^T``, small when the spectrum decays, as it does for model features.
        """
        if self.principal is not None and self.principal[0] == tol:
            return self
        return dataclasses.replace(self, principal=(tol, principal_coordinates(self.points, tol)))

    def with_sq_costs(self) -> "PreparedCloud":
        """A copy that carries ``C * C`` ([N, N] float64, 8 N^2 bytes): ``sum_ik r_i r_k C_ik^2`` is
        then one O(N^2) product instead of O(N d^2) (the solver's exact value, once per pair)."""
        if self.sq_costs is not None:
            return self
        c = self.costs().double()
        return dataclasses.replace(self, sq_costs=c * c)

    def with_coarse(self, n_clusters: int | None = None) -> "PreparedCloud":
        """A copy that carries its k-means coarsening (for the solver's multiscale start)."""
        if self.coarse is not None and (n_clusters is None or self.coarse.n_clusters == n_clusters):
            return self
        return dataclasses.replace(self, coarse=coarsen(self, n_clusters))


def pairwise_costs(points: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """``|x_i - x_k|^2`` for all pairs, from the factored form; clamped at 0, exact 0 on the diagonal."""
    costs = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (points @ points.T)
    costs.clamp_(min=0.0)
    costs.fill_diagonal_(0.0)
    return costs


def principal_coordinates(points: torch.Tensor, tol: float) -> torch.Tensor:
    """Coordinates of centred ``points`` on their leading principal axes (see
    :meth:`PreparedCloud.with_principal`); all of them when ``tol <= 0``."""
    if tol <= 0:
        return points
    # Eigendecomposition of the smaller Gram matrix (about half the cost of an SVD; only the
    # leading components are kept, and those the squared condition number does not disturb).
    x = points.double()
    n, d = x.shape
    evals, evecs = torch.linalg.eigh(x.T @ x if d <= n else x @ x.T)
    evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)  # descending: sigma^2
    energy = evals ** 2
    kept = torch.cumsum(energy, 0) / energy.sum().clamp_min(torch.finfo(torch.float64).tiny)
    rank = min(int((kept < 1.0 - tol).sum()) + 1, evals.numel())
    coords = x @ evecs[:, :rank] if d <= n else evecs[:, :rank] * evals[:rank].sqrt()
    return coords.to(points.dtype).contiguous()


def check_cloud(X: Any, name: str = "X") -> np.ndarray | torch.Tensor:
    """Validate a feature cloud: a 2-D array of finite numbers with at least 2 rows and 1 column.

    Returns the input as a numpy array or a torch tensor (unchanged otherwise).
    Raises:
        ValueError: with a message naming ``name`` and what is wrong.
    """
    if isinstance(X, torch.Tensor):
        arr: np.ndarray | torch.Tensor = X.detach()
        shape = tuple(arr.shape)
        is_float = arr.is_floating_point()
        if not is_float and arr.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    else:
        try:
            arr = np.asarray(X)
        except Exception as exc:  # ragged lists and the like
            raise ValueError(f"{name}: cannot be read as an array ({exc})") from exc
        shape = arr.shape
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D array [n_points, dim], got shape {shape}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{name}: empty cloud, shape {shape}")
    if shape[0] < 2:
        raise ValueError(f"{name}: GW needs at least 2 points, got {shape[0]}")
    finite = torch.isfinite(arr).all() if isinstance(arr, torch.Tensor) else np.isfinite(arr).all()
    if not bool(finite):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return arr


def _check_weights(weights: Any, n: int, name: str) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{name}: weights must have shape ({n},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name}: weights must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{name}: weights sum to zero")
    if (w > 0).sum() < 2:
        raise ValueError(f"{name}: GW needs at least 2 points with positive weight")
    return w / total


def resolve_device(device: str | torch.device | None, like: Any = None) -> torch.device:
    """The device to compute on: explicit, else the input tensor's, else CUDA when available."""
    if device is not None:
        return torch.device(device)
    if isinstance(like, torch.Tensor):
        return like.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare(
    X: Any,
    weights: Any = None,
    *,
    normalisation: Normalisation = DEFAULT_NORMALISATION,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    key: str | None = None,
    dense_costs: bool = False,
    name: str = "X",
) -> PreparedCloud:
    """Centre and normalise a feature cloud once, for use in many GW pairs.

    Args:
        X: [N, d] features (numpy array or torch tensor), N >= 2, finite.
        weights: optional [N] non-negative weights (normalised to sum 1); uniform when None.
            Points of weight 0 are dropped (they do not change GW).
        normalisation: ``"mean"`` (costs divided by their p(x)p mean; the default) or ``"max"``.
        device: where the prepared tensors live; default: X's device if a tensor, else CUDA if
            available, else CPU.
        dtype: the solver dtype (float32 by default; float64 for reference checks).
        key: an optional content key carried along (see :func:`feature_key`).
        dense_costs: also materialise the [N, N] normalised cost matrix (cheaper products when
            N is below about 1.6 d; the solvers pick it up when present).
        name: how error messages refer to this cloud.

    Raises:
        ValueError: on a malformed cloud (see :func:`check_cloud`), bad weights, an unknown
            normalisation, or a cloud whose points all coincide (zero costs cannot be normalised).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    arr = check_cloud(X, name)
    target = resolve_device(device, X)
    w_np = _check_weights(weights, int(arr.shape[0]), name)
    # float64 on the target device: centring before scaling keeps far-off or huge clouds exact.
    x64 = (arr if isinstance(arr, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(arr)))
    x64 = x64.to(device=target, dtype=torch.float64)
    if w_np is not None and (w_np <= 0).any():
        keep = w_np > 0  # zero-weight points change nothing in GW; dropping them keeps logs finite
        x64 = x64[torch.from_numpy(keep).to(target)]
        w_np = w_np[keep]
    n = x64.shape[0]
    if w_np is None:
        w64 = torch.full((n,), 1.0 / n, dtype=torch.float64, device=target)
    else:
        w64 = torch.from_numpy(w_np).to(target)
    centred = x64 - w64 @ x64
    sq = (centred * centred).sum(dim=1)
    if normalisation == "mean":
        scale = float(2.0 * (w64 @ sq))  # sum_ik p_i p_k |x_i - x_k|^2 once centred
    else:
        scale = _max_cost(centred, sq)
    if not np.isfinite(scale):
        raise ValueError(f"{name}: squared distances overflow float64; rescale the features")
    if scale <= np.finfo(np.float64).tiny:
        raise ValueError(f"{name}: all points coincide (zero spread); the cost cannot be normalised")
    points = (centred / np.sqrt(scale)).to(dtype)
    sq_norms = (sq / scale).to(dtype)
    cloud = PreparedCloud(
        points=points, sq_norms=sq_norms, weights=w64.to(dtype), scale=scale,
        normalisation=normalisation, key=key, uniform=w_np is None,
    )
    return cloud.with_dense_costs() if dense_costs else cloud


def _max_cost(points: torch.Tensor, sq_norms: torch.Tensor) -> float:
    """max_ik |x_i - x_k|^2 in row blocks (never the whole N x N matrix at once)."""
    n = points.shape[0]
    rows = max(1, _MAX_BLOCK_ELEMENTS // n)
    best = 0.0
    for start in range(0, n, rows):
        block = sq_norms[start:start + rows, None] + sq_norms[None, :] - 2.0 * (points[start:start + rows] @ points.T)
        best = max(best, float(block.max()))
    return best


def feature_key(X: Any) -> str:
    """A deterministic content hash of a feature array (sha256 hex, 32 characters).

    Hashes the shape and the values as little-endian float32 (the feature storage format), so the
    same features give the same key whether passed as float32/float64 numpy arrays or torch tensors,
    on any machine.
    """
    if isinstance(X, torch.Tensor):
        arr = X.detach().to("cpu", torch.float32).contiguous().numpy()
    else:
        arr = np.asarray(X)
        if arr.dtype == object:
            raise ValueError("feature_key: expected a numeric array")
        arr = arr.astype("<f4", copy=False)
    arr = np.ascontiguousarray(arr, dtype="<f4")
    return content_key(f"float32{arr.shape}", arr.tobytes(), length=32)


# --------------------------------------------------------------------------------------------------
# Coarsening (k-means), for a multiscale start of the GW solver
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Coarsening:
    """A cloud quantised by weighted k-means.

    Attributes:
        cloud: the centroids as a cloud: weights = cluster masses, ``dense_costs`` = block-average
            costs ``mean_{i in a, k in b} C_ik = |c_a - c_b|^2 + v_a + v_b`` (``v`` the clusters'
            variances), so the coarse GW objective of a coupling of clusters equals the fine
            objective of the block-constant coupling it lifts to, up to a constant.
        labels: [N] cluster of each point.
        share: [N] ``p_i / m_{labels_i}``, each point's share of its cluster's mass.
    """

    cloud: PreparedCloud
    labels: torch.Tensor
    share: torch.Tensor

    @property
    def n_clusters(self) -> int:
        return self.cloud.n_points


def default_clusters(n_points: int) -> int:
    """Clusters of the coarse cloud: about 2 sqrt(N), between 8 and 128."""
    return int(min(128, max(8, round(2 * math.sqrt(n_points)))))


def coarsen(
    cloud: PreparedCloud, n_clusters: int | None = None, *, seed: int = 0, iterations: int = 10,
) -> Coarsening | None:
    """Weighted k-means (k-means++ start, seeded, ``iterations`` Lloyd steps) of a prepared cloud.

    Returns None when the cloud has too few distinct points for ``n_clusters`` non-empty clusters.
    """
    k = default_clusters(cloud.n_points) if n_clusters is None else int(n_clusters)
    x, w = cloud.points, cloud.weights
    n = cloud.n_points
    if k < 2 or k > n:
        return None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sq = cloud.sq_norms
    first = int(torch.multinomial(w.double().cpu(), 1, generator=gen))
    centres = [first]
    nearest = (sq + sq[first] - 2.0 * (x @ x[first])).clamp_(min=0.0)
    for _ in range(k - 1):
        score = (nearest * w).double().cpu()
        if float(score.sum()) <= 0.0:
            return None  # fewer than k distinct points
        nxt = int(torch.multinomial(score, 1, generator=gen))
        centres.append(nxt)
        nearest = torch.minimum(nearest, (sq + sq[nxt] - 2.0 * (x @ x[nxt])).clamp_(min=0.0))
    cent = x[centres].clone()
    for _ in range(iterations):
        dist = sq[:, None] + (cent * cent).sum(1)[None, :] - 2.0 * (x @ cent.T)
        labels = dist.argmin(1)
        mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, w)
        if bool((mass <= 0).any()):
            # re-seed empty clusters with the points farthest from their centroid
            far = dist.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
            empty = (mass <= 0).nonzero().squeeze(1)
            cent[empty] = x[far[: empty.numel()]]
            continue
        cent = torch.zeros_like(cent).index_add_(0, labels, x * w[:, None]) / mass[:, None]
    dist = sq[:, None] + (cent * cent).sum(1)[None, :] - 2.0 * (x @ cent.T)
    labels = dist.argmin(1)
    mass = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, w)
    if bool((mass <= 0).any()):
        return None
    cent = torch.zeros_like(cent).index_add_(0, labels, x * w[:, None]) / mass[:, None]
    spread = ((x - cent[labels]) ** 2).sum(1)
    variance = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, w * spread) / mass
    centred = cent - mass @ cent
    c_sq = (centred * centred).sum(1)
    block = (pairwise_costs(centred, c_sq) + variance[:, None] + variance[None, :])
    coarse = PreparedCloud(points=centred, sq_norms=c_sq, weights=mass / mass.sum(), scale=cloud.scale,
                           normalisation=cloud.normalisation, key=None, uniform=False, dense_costs=block)
    return Coarsening(cloud=coarse, labels=labels, share=w / mass[labels])
