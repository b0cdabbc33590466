"""What a consolidation run does: `ConsolidateConfig`, the one place every default of a run lives.

The flow's tasks receive it, the CLI takes its option defaults from it, and the steps get their own
configs from it (`extract_config`, `merge_config`), so a default changes here and nowhere else.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING

from gw.gate import DEFAULT_DELTA
from gw.mergeability import DEFAULT_SHORTLIST, TRIAL_SIGNALS
from gw.plan import DEFAULT_TAU_QUANTILE

if TYPE_CHECKING:
    from infra.storage import Store
    from workers.consolidate import MergeConfig
    from workers.extract import ExtractConfig

GATE_RULES = ("bound", "delta")
# How the plan is made (workers.fleet_gw.plan_fleet): set packing on trial merges' measured outcomes, on GW
# distances or on the distances of the items' descriptions (the manifest's questions), or the GW-SMM paper's
# average linkage on GW distances.
PLANNERS = ("measured", "gw", "description", "linkage")
FALLBACK_PLANNERS = ("measured", "gw", "linkage")  # those that need no descriptions
# What picks the measured planner's shortlist: GW distances (the paper's signal), task-vector cosine
# (checkpoints only, sketched: workers.task_vectors), linear CKA on a probe set (workers.probe_cka) or the
# cosine of the items' descriptions (the manifest's questions, embedded by the base model: workers.descriptions).
SHORTLIST_SIGNALS = ("gw", "task_vector", "cka", "description")
# gw.merge's registry (available_methods() plus the "ta" alias), named here without importing torch so the
# CLI starts fast; tests/test_merge_subspace.py checks that the two agree.
MERGE_METHODS = ("ties", "doge", "task_arithmetic", "ta", "dare", "tsv_m", "iso_c", "iso_cts", "regmean")


@dataclass(frozen=True)
class ConsolidateConfig:
    """What a nightly run does; every field has a default that works on one machine."""

    # features (workers.extract)
    layer: int = -3
    pooling: str = "cls"
    max_responses: int = 256
    # GW matrix and plan
    solver: str = "entropic"
    # The planner with the best test macro F1 on the other folds, in each of 3 Beetle folds (a nested
    # cross-validated choice: bench/mergeability.py choose_default; docs/results/mergeability.md)
    planner: str = "description"
    # ... and the one that plans a fleet whose manifest describes fewer than two usable scorers (None: such a
    # fleet fails at once with one line): the measured planner reads only the scorers and their answers
    fallback_planner: str | None = "measured"
    shortlist: int = DEFAULT_SHORTLIST  # measured planner: each scorer's nearest partners that are trial-merged
    shortlist_by: str = "gw"  # ... nearest by this signal (SHORTLIST_SIGNALS)
    # ... each trial merge's members scored by this (gw.mergeability.TRIAL_SIGNALS). Beetle cannot tell the
    # signals apart (docs/results/mergeability.md); refit scores a merge with refitted heads, as the product
    # serves it, and is the one whose plan of the demo recovers its planted topics (workers/demo_data.py)
    trial_signal: str = "refit"
    tau: float | None = None  # None: the tau_quantile-quantile of the distances
    tau_quantile: float = DEFAULT_TAU_QUANTILE
    k: int = 3
    skip_by_bounds: bool = True  # skip GW pairs whose lower bound shows they can never be grouped under tau
    # GW only on each scorer's m nearest partners by the lower bound (gw.candidates; fleets of hundreds);
    # the others are never grouped. 0: all pairs. None: gw.candidates.auto_candidates of the fleet's size
    # (all pairs for small fleets, a shortlist for hundreds; always all pairs for the linkage planner).
    gw_candidates: int | None = None
    # merge and gate (workers.consolidate)
    method: str = "ties"
    grid: list[dict] | None = None  # None: the method's default grid; []: its defaults only
    refit_heads: bool = True
    delta: float = DEFAULT_DELTA
    gate: str = "bound"  # the gate rule (gw.gate)
    seed: int = 0
    # per-item correction (workers.consolidate.GroupConsolidator.correct): off by default
    item_correction: bool = False
    correction_ranks: tuple[int, ...] = (0, 4, 8, 16)  # each item's rank is chosen from these (by agreement)
    # where it runs, and as which run
    ray_address: str | None = None
    run_id: str | None = None

    def __post_init__(self):
        # The gate runs last: an unknown rule should fail now, not after hours of features and distances.
        if self.gate not in GATE_RULES:
            raise ValueError(f"gate must be one of {list(GATE_RULES)}, got {self.gate!r}")
        if self.planner not in PLANNERS:
            raise ValueError(f"planner must be one of {list(PLANNERS)}, got {self.planner!r}")
        if self.fallback_planner not in (*FALLBACK_PLANNERS, None):
            raise ValueError(f"fallback_planner must be one of {list(FALLBACK_PLANNERS)} or None, "
                             f"got {self.fallback_planner!r}")
        if isinstance(self.shortlist, bool) or not isinstance(self.shortlist, int) or self.shortlist < 1:
            raise ValueError(f"shortlist must be an integer >= 1, got {self.shortlist!r}")
        m = self.gw_candidates
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"gw_candidates must be an integer >= 0 (or None: by the fleet's size), got {m!r}")
        if self.gw_candidates and self.planner == "linkage":
            raise ValueError("the linkage planner reads every distance: it cannot run on a shortlist (gw_candidates)")
        if self.trial_signal not in TRIAL_SIGNALS:
            raise ValueError(f"trial_signal must be one of {list(TRIAL_SIGNALS)}, got {self.trial_signal!r}")
        if self.shortlist_by not in SHORTLIST_SIGNALS:
            raise ValueError(f"shortlist_by must be one of {list(SHORTLIST_SIGNALS)}, got {self.shortlist_by!r}")
        ranks = tuple(self.correction_ranks)  # a JSON round trip (Prefect parameters) gives a list
        if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in ranks):
            raise ValueError(f"correction_ranks must be integers >= 0, got {list(ranks)}")
        object.__setattr__(self, "correction_ranks", ranks)

    @classmethod
    def from_dict(cls, values: dict | None) -> ConsolidateConfig:
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown consolidation setting(s) {unknown}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def plan_signal(self) -> str:
        """The cheap signal the planner reads (workers.signals): the measured planner's shortlist, the
        description planner's distances, else GW."""
        if self.planner == "measured":
            return self.shortlist_by
        return "description" if self.planner == "description" else "gw"

    def for_described(self, described: int, usable: int, manifest_key: str) -> tuple[ConsolidateConfig, str | None]:
        """The config to plan with when `described` of the `usable` scorers have a description in the
        manifest, and a note when the description planner gave way to the fallback planner. Grouping by
        description needs two or more; without them the description planner would plan no group at all,
        and a shortlist by description would pick no partner."""
        if self.plan_signal != "description" or described >= 2:
            return self, None
        problem = (f"{described} of the {usable} usable scorers in {manifest_key} have a description, and grouping "
                   "by description needs two or more")
        if self.planner == "description" and self.fallback_planner is not None:
            return replace(self, planner=self.fallback_planner), f"{problem}: planned by the {self.fallback_planner} planner"
        option = "--planner description" if self.planner == "description" else "--shortlist-by description"
        raise ValueError(f"{option}: {problem}; add them to the manifest or choose another planner")

    def for_fleet(self, store: Store, usable: list[str], manifest_key: str) -> tuple[ConsolidateConfig, str | None]:
        """for_described on the fleet's manifest, which is read only when the plan reads descriptions."""
        if self.plan_signal != "description":
            return self, None
        from workers.descriptions import described

        return self.for_described(len(described(store, usable, manifest_key)), len(usable), manifest_key)

    def extract_config(self) -> ExtractConfig:
        from workers.extract import ExtractConfig

        return ExtractConfig(layer=self.layer, pooling=self.pooling, max_responses=self.max_responses, seed=self.seed)

    def merge_config(self) -> MergeConfig:
        from workers.consolidate import MergeConfig

        return MergeConfig(method=self.method, grid=self.grid, refit_heads=self.refit_heads, delta=self.delta,
                           gate=self.gate, seed=self.seed, item_correction=self.item_correction,
                           correction_ranks=self.correction_ranks)
