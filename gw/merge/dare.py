"""DARE (Yu et al., ICML 2024, "Language Models are Super Mario"): drop and rescale, then TA or TIES.

Each entry of each task vector is dropped with probability p and the survivors are multiplied by
1/(1 − p), so every task vector is unchanged in expectation. The sparsified task vectors are then merged
with Task Arithmetic (``combine="ta"``, the paper's main set-up) or TIES (``combine="ties"``; the trim
threshold is taken on the sparsified vectors).

Scope: as in the paper, every floating tensor — linear weights, biases, LayerNorm weights and biases,
embedding tables — is dropped and rescaled alike; non-floating buffers are copied from the base.

Determinism: the drop mask of (task i, key, chunk) comes from a generator seeded with
(seed, i, key, chunk start), so a merge is reproducible given its seed (on a given device type: CPU and
CUDA generators draw different streams) and independent of key order.
Defaults: p = 0.5 (conservative for small encoders), combine = "ta" with λ = 1/N, TIES with λ = 1 and
top_k = 0.2.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from gw.merge._state import DropRescale, StateDict, TaskVectorSource
from gw.merge.task_arithmetic import TaskArithmeticParams, merge_task_arithmetic
from gw.merge.ties import TiesParams, merge_ties

COMBINE_METHODS = ("ta", "ties")


@dataclass(frozen=True)
class DareParams:
    """p: drop probability in [0, 1); combine: "ta" or "ties"; lam: None = the combiner's default."""

    p: float = 0.5
    combine: str = "ta"
    lam: float | None = None
    top_k: float = 0.2

    def resolved_p(self) -> float:
        p = float(self.p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DARE drop probability p must be in [0, 1), got {self.p}")
        if self.combine not in COMBINE_METHODS:
            raise ValueError(f"DARE combine must be one of {COMBINE_METHODS}, got {self.combine!r}")
        return p


def merge_dare(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: DareParams,
    *,
    seed: int = 0,
) -> tuple[dict[str, Tensor], dict[str, object], dict[str, object]]:
    """DARE + TA or TIES over validated state dicts; returns (state dict, resolved params, info)."""
    p = params.resolved_p()
    source = TaskVectorSource(base, finetuned, transform=DropRescale(p=p, seed=int(seed)))
    if params.combine == "ta":
        merged, inner, info = merge_task_arithmetic(
            base, finetuned, keys, TaskArithmeticParams(lam=params.lam), source=source
        )
    else:
        lam = 1.0 if params.lam is None else params.lam
        merged, inner, info = merge_ties(
            base, finetuned, keys, TiesParams(lam=lam, top_k=params.top_k), source=source
        )
    resolved: dict[str, object] = {"p": p, "combine": params.combine, **inner}
    return merged, resolved, info
