"""Similarities between scorers other than GW, used by the baseline plans (docs/architecture.md §4.3).

* :func:`cosine_similarity_matrix`: cosine between rows, e.g. embeddings of item descriptions (the
  offline stand-in for the GW-SMM paper's GPT-o1 grouping; the embedding is computed elsewhere).
* :func:`task_vector_cosine`: cosine between task vectors ``theta_i - theta_0``, streamed over the
  state-dict keys and over column chunks, so no model-sized concatenation is ever built.
* :func:`sketch_task_vector`: a count sketch of one task vector (a few hundred kilobytes), whose
  cosines estimate the task vectors' own; one per scorer, so a fleet of any size is compared without
  holding more than one model.
* :func:`linear_cka` and :func:`cka_matrix`: linear CKA (Kornblith et al., ICML 2019) between the
  features of a shared probe set through each model.
* :func:`similarity_to_distance`: turns any of these into distances for the planners.

Pure math on numpy arrays and torch tensors; no I/O.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

# Elements per column chunk when streaming task vectors (n models x chunk, float64 on the device).
_STREAM_CHUNK_ELEMENTS = 1 << 24
# Entries of one tensor hashed at once by sketch_task_vector (its bucket and sign draws).
_SKETCH_CHUNK = 1 << 20
DEFAULT_SKETCH_DIM = 1 << 16
# Elements of centred Gram matrices held at once by cka_matrix (float64).
_CKA_BLOCK_ELEMENTS = 1 << 25


def _as_float64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def cosine_similarity_matrix(vectors: Any) -> np.ndarray:
    """[n, n] cosine similarity between the rows of an [n, d] array (numpy or torch).

    A zero row has no direction: its row and column are NaN ("unknown"), its diagonal too.
    """
    X = _as_float64(vectors)
    if X.ndim != 2:
        raise ValueError(f"vectors must be a 2-D [n, d] array, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("vectors contain NaN or inf")
    norms = np.linalg.norm(X, axis=1)
    return _gram_to_cosine(X @ X.T, norms)


def _gram_to_cosine(gram: np.ndarray, norms: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        S = gram / np.outer(norms, norms)
    S = np.clip(S, -1.0, 1.0)
    zero = norms == 0
    S[zero, :] = np.nan
    S[:, zero] = np.nan
    nonzero = np.flatnonzero(~zero)
    S[nonzero, nonzero] = 1.0
    return (S + S.T) / 2.0  # exact symmetry despite rounding


def task_vector_cosine(
    task_vectors: Sequence[Mapping[str, torch.Tensor]] | np.ndarray | torch.Tensor,
    *,
    keys: Iterable[str] | None = None,
) -> np.ndarray:
    """[n, n] cosine similarity between task vectors.

    Args:
        task_vectors: either n state dicts of deltas (``theta_i - theta_0``; same keys and shapes in
            each), or an [n, p] array of flattened task vectors.
        keys: for state dicts, the keys to use (e.g. only the encoder, not the heads); default all.

    The Gram matrix ``<tau_i, tau_j>`` is accumulated key by key and, inside large tensors, chunk by
    chunk of columns, in float64 on the tensors' device. A task vector that is all zeros has no
    direction: its row and column are NaN.
    """
    if isinstance(task_vectors, (np.ndarray, torch.Tensor)):
        return cosine_similarity_matrix(task_vectors)
    deltas = list(task_vectors)
    if not deltas:
        raise ValueError("task_vectors is empty")
    names = sorted(deltas[0]) if keys is None else list(keys)
    if not names:
        raise ValueError("no state-dict keys to compare")
    for i, delta in enumerate(deltas):
        missing = [key for key in names if key not in delta]
        if missing:
            raise ValueError(f"task vector {i} lacks keys {missing[:5]}")
        if keys is None and set(delta) != set(names):
            extra = sorted(set(delta) ^ set(names))[:5]
            raise ValueError(f"task vector {i} has different keys from task vector 0 (e.g. {extra}); pass keys=")
    n = len(deltas)
    device = deltas[0][names[0]].device
    gram = torch.zeros((n, n), dtype=torch.float64, device=device)
    for key in names:
        shape = deltas[0][key].shape
        for i, delta in enumerate(deltas):
            if delta[key].shape != shape:
                raise ValueError(
                    f"key {key!r}: task vector {i} has shape {tuple(delta[key].shape)}, expected {tuple(shape)}"
                )
        flat = [delta[key].detach().reshape(-1) for delta in deltas]
        size = flat[0].numel()
        chunk = max(1, _STREAM_CHUNK_ELEMENTS // n)
        for start in range(0, size, chunk):
            block = torch.stack([f[start : start + chunk].to(device, torch.float64) for f in flat])
            if not torch.isfinite(block).all():
                raise ValueError(f"key {key!r} holds NaN or inf in some task vector")
            gram += block @ block.T
    gram_np = gram.cpu().numpy()
    norms = np.sqrt(np.clip(np.diag(gram_np), 0.0, None))
    return _gram_to_cosine(gram_np, norms)


def sketch_task_vector(task_vector: Mapping[str, torch.Tensor], dim: int = DEFAULT_SKETCH_DIM, *,
                       seed: int = 0) -> np.ndarray:
    """A count sketch of a task vector: entry j of key k goes to bucket h(k, j) with sign s(k, j).

    The hash is a random draw seeded by (seed, key, chunk), the same for every scorer, so the sketches
    of a fleet are comparable: <sketch(a), sketch(b)> is an unbiased estimate of <a, b> with standard
    deviation about ‖a‖‖b‖/sqrt(dim), i.e. cosines within ~1/sqrt(dim) (0.004 at the default 2^16).
    Linear in the task vector; keys are read in sorted order, one chunk at a time.
    """
    if dim < 1:
        raise ValueError(f"sketch dim must be >= 1, got {dim}")
    out = torch.zeros(dim, dtype=torch.float64)
    for key in sorted(task_vector):
        flat = task_vector[key].detach().reshape(-1).to("cpu", torch.float64)
        if not torch.isfinite(flat).all():
            raise ValueError(f"key {key!r} of the task vector holds NaN or inf")
        for start in range(0, flat.numel(), _SKETCH_CHUNK):
            block = flat[start:start + _SKETCH_CHUNK]
            digest = hashlib.blake2b(f"{seed}|{key}|{start}".encode(), digest_size=8).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
            buckets = torch.randint(dim, (block.numel(),), generator=g)
            signs = torch.randint(2, (block.numel(),), generator=g, dtype=torch.float64).mul_(2).sub_(1)
            out.index_add_(0, buckets, block * signs)
    return out.numpy()


def _centred(X: np.ndarray) -> np.ndarray:
    return X - X.mean(axis=0, keepdims=True)


def linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA between two feature matrices of the same n probe inputs ([n, d1] and [n, d2]).

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred features; invariant to
    orthogonal transforms and isotropic scaling of either side, 1 for identical features.
    """
    X = _as_float64(X)
    Y = _as_float64(Y)
    for name, M in (("X", X), ("Y", Y)):
        if M.ndim != 2:
            raise ValueError(f"{name} must be a 2-D [n, d] array, got shape {M.shape}")
        if not np.isfinite(M).all():
            raise ValueError(f"{name} contains NaN or inf")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must describe the same probe inputs: {X.shape[0]} vs {Y.shape[0]} rows")
    if X.shape[0] < 2:
        raise ValueError("linear CKA needs at least 2 probe inputs")
    Xc, Yc = _centred(X), _centred(Y)
    n, d1, d2 = X.shape[0], X.shape[1], Y.shape[1]
    if n < max(d1, d2):
        # Gram form: <Kc, Lc> with Kc = Xc Xc^T; cheaper when there are fewer inputs than features.
        K, L = Xc @ Xc.T, Yc @ Yc.T
        cross, norm_x, norm_y = float((K * L).sum()), float(np.linalg.norm(K)), float(np.linalg.norm(L))
    else:
        cross = float(np.linalg.norm(Yc.T @ Xc) ** 2)
        norm_x, norm_y = float(np.linalg.norm(Xc.T @ Xc)), float(np.linalg.norm(Yc.T @ Yc))
    if norm_x == 0 or norm_y == 0:
        raise ValueError("linear CKA is undefined for constant features (zero variance over the probe set)")
    return cross / (norm_x * norm_y)


def cka_matrix(features: Mapping[str, Any]) -> np.ndarray:
    """[m, m] linear CKA between every two models' features of the same probe inputs.

    ``features`` maps model id -> [n, d_id] features; rows and columns follow the mapping's order.
    Each model's centred, normalised Gram matrix is computed once per block of models, so memory
    stays near ``_CKA_BLOCK_ELEMENTS`` float64 values whatever the fleet size.
    """
    names = list(features)
    if not names:
        raise ValueError("features is empty")
    mats = [_as_float64(features[name]) for name in names]
    n = mats[0].shape[0] if mats[0].ndim == 2 else -1
    for name, M in zip(names, mats):
        if M.ndim != 2:
            raise ValueError(f"features[{name!r}] must be a 2-D [n, d] array, got shape {M.shape}")
        if M.shape[0] != n:
            raise ValueError(f"features[{name!r}] has {M.shape[0]} rows; every model needs the same {n} probe inputs")
        if not np.isfinite(M).all():
            raise ValueError(f"features[{name!r}] contains NaN or inf")
    if n < 2:
        raise ValueError("CKA needs at least 2 probe inputs")

    def normalised_gram(index: int) -> np.ndarray:
        Xc = _centred(mats[index])
        K = Xc @ Xc.T
        norm = np.linalg.norm(K)
        if norm == 0:
            raise ValueError(f"features[{names[index]!r}] are constant over the probe set; CKA is undefined")
        return (K / norm).reshape(-1)

    m = len(names)
    block = max(1, _CKA_BLOCK_ELEMENTS // (2 * n * n))
    S = np.eye(m)
    starts = list(range(0, m, block))
    for a_start in starts:
        a_idx = list(range(a_start, min(m, a_start + block)))
        A = np.stack([normalised_gram(i) for i in a_idx])
        S[np.ix_(a_idx, a_idx)] = A @ A.T
        for b_start in starts:
            if b_start <= a_start:
                continue
            b_idx = list(range(b_start, min(m, b_start + block)))
            B = np.stack([normalised_gram(i) for i in b_idx])
            cross = A @ B.T
            S[np.ix_(a_idx, b_idx)] = cross
            S[np.ix_(b_idx, a_idx)] = cross.T
    np.fill_diagonal(S, 1.0)
    return (S + S.T) / 2.0


def similarity_to_distance(S: Any) -> np.ndarray:
    """Distances for the planners from a symmetric similarity matrix: ``max_offdiag(S) - S``.

    Only the order of the pairs matters to the planners (average linkage is unchanged by this shift);
    NaN stays NaN ("unknown, never group"); the diagonal is set to 0.
    """
    S = _as_float64(S)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"S must be a square 2-D matrix, got shape {S.shape}")
    off = ~np.eye(S.shape[0], dtype=bool)
    values = S[off]
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    D = np.where(np.isfinite(S), top - S, np.nan)
    D = np.clip(D, 0.0, None)
    np.fill_diagonal(D, 0.0)
    return D
