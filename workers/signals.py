"""Distances between a fleet's scorers by one cheap signal: what the measured planner shortlists by and
what the description planner packs (flows.config.SHORTLIST_SIGNALS). One home for the choice, so the
flow and `fleetmerge plan` read the same numbers.

Every matrix is in `ids` order with a 0 diagonal and smaller meaning nearer; NaN marks a pair the signal
knows nothing about (a scorer without a description), which no planner groups and no shortlist picks.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from infra.manifest import MANIFEST_KEY
from infra.storage import Store
from workers.extract import ExtractConfig


def signal_distances(store: Store, signal: str, ids: Sequence[str], *, gw: np.ndarray | None,
                     extract_config: ExtractConfig, seed: int = 0, manifest_key: str = MANIFEST_KEY,
                     timeout_s: float = 600.0) -> np.ndarray:
    """The distances of `signal` ("gw": the run's GW matrix `gw` itself; "task_vector", "cka",
    "description": computed here, as Ray jobs)."""
    if signal == "gw":
        if gw is None:
            raise ValueError("the gw signal is the run's GW matrix: pass it as gw")
        return gw
    if signal == "task_vector":
        from workers.task_vectors import task_vector_distances

        return task_vector_distances(store, ids, manifest_key=manifest_key, timeout_s=timeout_s)
    if signal == "cka":
        from workers.probe_cka import cka_distances

        return cka_distances(store, ids, extract_config, manifest_key=manifest_key, seed=seed, timeout_s=timeout_s)
    if signal == "description":
        from workers.descriptions import description_distances

        return description_distances(store, ids, manifest_key=manifest_key, timeout_s=timeout_s)
    raise ValueError(f"unknown signal {signal!r}: expected gw, task_vector, cka or description")


def unknown_to(D: np.ndarray, ids: Sequence[str]) -> list[str]:
    """The scorers the signal knows no distance for (NaN to every other scorer): they stay on their own."""
    off = ~np.eye(len(ids), dtype=bool)
    return [i for n, i in enumerate(ids) if len(ids) > 1 and np.isnan(D[n][off[n]]).all()]


def unknown_note(signal: str, unknown: Sequence[str]) -> str:
    """What a run says of the scorers `unknown_to` names."""
    what = "no description" if signal == "description" else f"no {signal} distance"
    return f"{signal}: {what} for {', '.join(unknown)}"
