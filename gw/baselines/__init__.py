"""Other ways to group scorers, to compare with :func:`gw.plan.solve_plan` (docs/architecture.md §4.3).

* :func:`linkage_plan`: the GW-SMM paper's method (arXiv 2503.09774), agglomerative average-linkage
  clustering on D to a fixed number of groups, here with the group-size cap ``k``.
* :func:`random_plan`: random groups, seeded.
* :func:`given_plan`: a person's grouping (e.g. by curriculum module); :func:`partition_modules`
  splits labelled modules into groups of at most ``k``; :func:`sized_plan` groups by any distance at
  given group sizes.
* :func:`plan_from_similarity`: linkage on any similarity matrix, used by :func:`description_plan`
  (cosine of description embeddings), :func:`task_vector_plan` (task-vector cosine) and
  :func:`cka_plan` (linear CKA on a shared probe set).

Every baseline takes the same ``k`` and can be asked for ``n_groups`` multi-member groups, so plans
compare at equal size. Pure math; no I/O.

Modules: ``linkage`` (:func:`linkage_plan`), ``given`` (random, given and module plans),
``similarity`` (plans from other similarities).
"""

from __future__ import annotations

from ._checks import Linkage
from .given import default_group_sizes, given_plan, module_plan, partition_modules, random_plan, sized_plan
from .linkage import linkage_plan
from .similarity import cka_plan, description_plan, plan_from_similarity, task_vector_plan

__all__ = [
    "Linkage",
    "cka_plan",
    "default_group_sizes",
    "description_plan",
    "given_plan",
    "linkage_plan",
    "module_plan",
    "partition_modules",
    "plan_from_similarity",
    "random_plan",
    "sized_plan",
    "task_vector_plan",
]
