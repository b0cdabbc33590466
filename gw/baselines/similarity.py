"""Plans from other similarities: capped linkage on ``max(S) - S`` (descriptions, task vectors, CKA)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from gw.plan import Plan
from gw.similarity import cka_matrix, cosine_similarity_matrix, similarity_to_distance, task_vector_cosine

from ._checks import Linkage
from .linkage import linkage_plan

__all__ = ["cka_plan", "description_plan", "plan_from_similarity", "task_vector_plan"]


def plan_from_similarity(
    S: np.ndarray,
    ids: Sequence[str],
    n_groups: int | None,
    k: int = 3,
    *,
    linkage: Linkage = "average",
    fill: bool = False,
    method: str = "similarity",
) -> Plan:
    """Capped linkage (see :func:`linkage_plan`) on distances ``max(S) - S`` from a similarity S.

    NaN similarities mean "unknown, never group". ``method`` names the source in the plan.
    """
    D = similarity_to_distance(S)
    return linkage_plan(D, ids, n_groups, k=k, linkage=linkage, fill=fill, method=method)


def description_plan(
    embeddings: Any, ids: Sequence[str], n_groups: int | None, k: int = 3, **options: Any
) -> Plan:
    """Groups by cosine similarity of item-description embeddings ([n, d], computed elsewhere)."""
    return plan_from_similarity(cosine_similarity_matrix(embeddings), ids, n_groups, k, method="description", **options)


def task_vector_plan(
    task_vectors: Sequence[Mapping[str, torch.Tensor]] | np.ndarray,
    ids: Sequence[str],
    n_groups: int | None,
    k: int = 3,
    *,
    keys: Iterable[str] | None = None,
    **options: Any,
) -> Plan:
    """Groups by cosine similarity of task vectors (see :func:`gw.similarity.task_vector_cosine`)."""
    S = task_vector_cosine(task_vectors, keys=keys)
    return plan_from_similarity(S, ids, n_groups, k, method="task-vector-cosine", **options)


def cka_plan(features: Mapping[str, Any], n_groups: int | None, k: int = 3, **options: Any) -> Plan:
    """Groups by linear CKA of each model's features of a shared probe set (id -> [n, d])."""
    return plan_from_similarity(cka_matrix(features), list(features), n_groups, k, method="cka", **options)

