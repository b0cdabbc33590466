"""The plan type: disjoint groups of scorer ids plus the ids left alone, normalised and JSON-safe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Plan:
    """A grouping of scorers: disjoint groups of size >= 2, plus the ids left on their own.

    Normalised on construction: ids sorted inside each group, groups sorted, singletons sorted, and
    ``stability`` keyed by those sorted groups.
    """

    groups: tuple[tuple[str, ...], ...]
    singletons: tuple[str, ...]
    method: str
    tau: float | None = None
    objective: float | None = None
    stability: Mapping[tuple[str, ...], float] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        groups = tuple(sorted(tuple(sorted(str(i) for i in g)) for g in self.groups))
        singletons = tuple(sorted(str(i) for i in self.singletons))
        for group in groups:
            if len(group) < 2:
                raise ValueError(f"Plan group {group!r} has fewer than 2 members; list it in singletons")
        seen: set[str] = set()
        for member in [m for g in groups for m in g] + list(singletons):
            if member in seen:
                raise ValueError(f"Plan lists id {member!r} more than once")
            seen.add(member)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "singletons", singletons)
        object.__setattr__(self, "method", str(self.method))
        if self.tau is not None:
            object.__setattr__(self, "tau", float(self.tau))
        if self.objective is not None:
            object.__setattr__(self, "objective", float(self.objective))
        if self.stability is not None:
            stability = {tuple(sorted(str(i) for i in g)): float(s) for g, s in self.stability.items()}
            unknown = set(stability) - set(groups)
            if unknown:
                raise ValueError(f"Plan stability names groups that are not in the plan: {sorted(unknown)}")
            for group, share in stability.items():
                if not 0.0 <= share <= 1.0:
                    raise ValueError(f"Plan stability of {group!r} is {share}; expected a share in [0, 1]")
            object.__setattr__(self, "stability", stability)

    @property
    def ids(self) -> tuple[str, ...]:
        """Every id the plan covers, sorted."""
        return tuple(sorted([m for g in self.groups for m in g] + list(self.singletons)))

    @property
    def n_groups(self) -> int:
        """Number of multi-member groups."""
        return len(self.groups)

    def group_of(self, scorer_id: str) -> tuple[str, ...]:
        """The group holding ``scorer_id`` (a 1-tuple for a singleton)."""
        for group in self.groups:
            if scorer_id in group:
                return group
        if scorer_id in self.singletons:
            return (scorer_id,)
        raise KeyError(f"id {scorer_id!r} is not in the plan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (lists and plain floats; stability as a list of {group, share})."""
        return {
            "groups": [list(g) for g in self.groups],
            "singletons": list(self.singletons),
            "method": self.method,
            "tau": self.tau,
            "objective": self.objective,
            "stability": (
                None
                if self.stability is None
                else [{"group": list(g), "share": s} for g, s in sorted(self.stability.items())]
            ),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """Inverse of :meth:`to_dict`."""
        missing = {"groups", "singletons", "method"} - set(d)
        if missing:
            raise ValueError(f"Plan dict lacks keys {sorted(missing)}")
        stability = d.get("stability")
        return cls(
            groups=tuple(tuple(g) for g in d["groups"]),
            singletons=tuple(d["singletons"]),
            method=d["method"],
            tau=d.get("tau"),
            objective=d.get("objective"),
            stability=None if stability is None else {tuple(e["group"]): e["share"] for e in stability},
        )
