"""Planted-cluster feature clouds: fleets whose "models" come in families, for tests and benchmarks.

Each family has its own structure: a number of clusters, their weights, where their centres sit (in
a random low-dimensional subspace), how wide and how anisotropic each cluster is. A family's base
cloud is drawn once; each model of the family sees that cloud through its own random rotation,
translation and scale (all invisible to GW), plus a small perturbation. So models of one family are
close in GW and models of different families are far apart, and the families are known.

Pure math: numpy only, seeded; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PlantedFleet:
    """A synthetic fleet.

    Attributes:
        features: model id -> [n_points, dim] float32 features.
        family: model id -> family index.
    """

    features: dict[str, np.ndarray]
    family: dict[str, int]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self.features)

    def members(self, family: int) -> tuple[str, ...]:
        return tuple(i for i, f in self.family.items() if f == family)


def random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal [dim, dim] matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def family_cloud(
    n_points: int,
    dim: int,
    rng: np.random.Generator,
    *,
    n_clusters: int,
    subspace_dim: int = 16,
    noise: float = 0.15,
) -> np.ndarray:
    """One family's base cloud: a mixture of anisotropic clusters in a random subspace, plus noise."""
    subspace_dim = min(subspace_dim, dim)
    basis = random_rotation(dim, rng)[:, :subspace_dim]  # [dim, r] orthonormal columns
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    centres = rng.standard_normal((n_clusters, subspace_dim)) * rng.uniform(1.0, 3.0)
    labels = rng.choice(n_clusters, size=n_points, p=weights)
    # Cluster shapes: a random linear map per cluster (anisotropic, of varying width).
    shapes = rng.standard_normal((n_clusters, subspace_dim, subspace_dim)) / np.sqrt(subspace_dim)
    shapes *= rng.uniform(0.2, 0.8, size=(n_clusters, 1, 1))
    local = np.einsum("nr,nrs->ns", rng.standard_normal((n_points, subspace_dim)), shapes[labels])
    inside = (centres[labels] + local) @ basis.T
    return inside + noise * rng.standard_normal((n_points, dim)) / np.sqrt(dim) * np.sqrt(subspace_dim)


def planted_fleet(
    n_families: int = 4,
    models_per_family: int = 3,
    n_points: int = 500,
    dim: int = 384,
    *,
    seed: int = 0,
    perturbation: float = 0.05,
    clusters: tuple[int, int] = (2, 7),
) -> PlantedFleet:
    """A fleet of ``n_families * models_per_family`` feature clouds with planted families.

    Args:
        n_families: number of families (distinct structures).
        models_per_family: models per family.
        n_points: points (responses) per model.
        dim: feature dimension (384 like MiniLM).
        seed: everything is drawn from ``numpy.random.default_rng(seed)``.
        perturbation: per-model noise, relative to the cloud's RMS radius.
        clusters: inclusive range of the number of clusters of a family.

    Returns:
        A :class:`PlantedFleet`; ids are ``"f{family}_m{member}"``.
    """
    if n_families < 1 or models_per_family < 1:
        raise ValueError("n_families and models_per_family must be >= 1")
    if n_points < 2 or dim < 1:
        raise ValueError("n_points must be >= 2 and dim >= 1")
    lo, hi = clusters
    if not 1 <= lo <= hi:
        raise ValueError(f"clusters must be a range (lo, hi) with 1 <= lo <= hi, got {clusters}")
    rng = np.random.default_rng(seed)
    features: dict[str, np.ndarray] = {}
    family: dict[str, int] = {}
    for f in range(n_families):
        k = int(rng.integers(lo, hi + 1))
        base = family_cloud(n_points, dim, rng, n_clusters=k)
        radius = np.sqrt(((base - base.mean(0)) ** 2).sum(1).mean())
        for m in range(models_per_family):
            jitter = perturbation * radius / np.sqrt(dim) * rng.standard_normal(base.shape)
            rotated = (base + jitter) @ random_rotation(dim, rng)
            scale = rng.uniform(0.5, 2.0)
            shift = rng.standard_normal(dim) * radius
            model_id = f"f{f}_m{m}"
            features[model_id] = (scale * rotated + shift).astype(np.float32)
            family[model_id] = f
    return PlantedFleet(features=features, family=family)
