"""Argument checks shared by the baselines."""

from __future__ import annotations

from typing import Literal

import numpy as np

Linkage = Literal["average", "complete", "single"]


def _check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2:
        raise ValueError(f"k must be an integer >= 2, got {k!r}")
    return int(k)


def _check_n_groups(n_groups: int | None, n: int) -> int | None:
    if n_groups is None:
        return None
    if not isinstance(n_groups, (int, np.integer)) or isinstance(n_groups, bool) or n_groups < 0:
        raise ValueError(f"n_groups must be a non-negative integer, got {n_groups!r}")
    if 2 * n_groups > n:
        raise ValueError(f"n_groups={n_groups} groups of >= 2 need {2 * n_groups} ids, only {n} given")
    return int(n_groups)
