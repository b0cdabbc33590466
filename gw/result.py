"""The result of one GW computation (shared by every solver)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class GWResult:
    """One GW computation.

    Attributes:
        value: the square-loss GW objective ``sum_ijkl (C1_ik - C2_jl)^2 T_ij T_kl`` of the
            returned coupling, on the normalised costs (no entropy term, no square root).
        solver: ``"entropic"`` or ``"exact"``.
        iterations: outer iterations (entropic: gradient steps; exact: conditional-gradient steps).
        converged: the solver's stopping rule was met with the marginals within tolerance (for
            exact: POT raised no warning).
        marginal_error: ``|T 1 - p|_1 + |T^T 1 - q|_1`` of the returned coupling.
        n_a, n_b: number of points of the two clouds.
        epsilon: the entropic regularisation (None for exact).
        inner_iterations: total Sinkhorn iterations (0 for exact).
        seconds: wall time (for a batch, the batch's time divided by its size).
        coupling: the [n_a, n_b] coupling when asked for, else None.
    """

    value: float
    solver: str
    iterations: int
    converged: bool
    marginal_error: float
    n_a: int
    n_b: int
    epsilon: float | None = None
    inner_iterations: int = 0
    seconds: float = field(default=0.0, compare=False)
    coupling: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe fields (the coupling is left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "coupling"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GWResult":
        names = {f.name for f in fields(cls)} - {"coupling"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def without_coupling(self) -> "GWResult":
        if self.coupling is None:
            return self
        return GWResult.from_dict(self.to_dict())
