"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge; θ = θ₀ + λ τ_m.

1. Trim: keep the top-k fraction of each task vector τ_i by magnitude, zero the rest. The threshold is
   exact and per task over the WHOLE task vector (all floating backbone tensors together, as in the
   paper); "top k" keeps ceil(k·numel) entries plus any entries tied with the threshold.
2. Elect: per entry, the sign of the total trimmed mass Σ_i τ̂_i.
3. Disjoint mean: per entry, the mean of the trimmed values whose sign agrees with the elected sign
   (zero where none agree).

Scope: like the paper, every floating tensor — linear weights, biases, LayerNorm weights and biases,
embedding tables — takes part in the trim threshold and in the merge alike. Non-floating buffers are
copied from the base. Defaults: top_k = 0.2, λ = 1.0.

Cost: three streaming passes over the inputs, key by key in [N, chunk] blocks — two for the exact
thresholds (gw.merge._magnitude: a radix select on the bit patterns of |τ|, no flat copy or sort) and
one for the merge — with a few megabytes of reused buffers; peak memory is the inputs plus the output.
The task vectors are never stored whole.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gw.merge._magnitude import kept_count, top_fraction_thresholds
from gw.merge._state import (
    KIND_BUFFER,
    StateDict,
    TaskVectorSource,
    Workspace,
    allocate_like,
    classify_key,
    copy_buffers,
    sum_rows,
)


@dataclass(frozen=True)
class TiesParams:
    """lam: scaling of the merged task vector; top_k: fraction of each task vector kept, in (0, 1]."""

    lam: float = 1.0
    top_k: float = 0.2

    def resolved(self) -> dict[str, float]:
        lam, top_k = float(self.lam), float(self.top_k)
        if not math.isfinite(lam):
            raise ValueError(f"lam must be a finite number, got {self.lam}")
        if not 0.0 < top_k <= 1.0:
            raise ValueError(f"top_k is the fraction of entries kept and must be in (0, 1], got {self.top_k}")
        return {"lam": lam, "top_k": top_k}


def elect_and_average(trimmed: Tensor, workspace: Workspace | None = None) -> Tensor:
    """Sign election by total mass and disjoint mean of one trimmed [N, chunk] block -> τ_m [chunk].

    Float 0/1 masks and row-wise in-place updates: on CPU several times faster than boolean
    masked_fill / count_nonzero over the whole block.
    """
    workspace = workspace or Workspace()
    shape, dtype, device = (trimmed.shape[1],), trimmed.dtype, trimmed.device
    elected = sum_rows(trimmed, workspace.get("elected", shape, dtype, device))
    total = workspace.get("agreeing_sum", shape, dtype, device).zero_()
    count = workspace.get("agreeing_count", shape, dtype, device).zero_()
    agrees = workspace.get("agrees", shape, dtype, device)
    for row in trimmed:
        # An entry agrees when it has the elected sign; zeros (trimmed) never agree.
        torch.mul(row, elected, out=agrees).gt_(0)
        total.addcmul_(row, agrees)
        count.add_(agrees)
    return total.div_(count.clamp_(min=1))


def ties_merge_chunk(taus: Tensor, thresholds: Tensor, workspace: Workspace | None = None) -> Tensor:
    """Trim (|τ_i| < thresholds[i] -> 0), elect and disjoint-mean an [N, chunk] block (modified in place)."""
    workspace = workspace or Workspace()
    keep = workspace.get("keep", tuple(taus.shape), taus.dtype, taus.device)
    torch.abs(taus, out=keep).ge_(thresholds.unsqueeze(1))
    return elect_and_average(taus.mul_(keep), workspace)


def _merge_pass(
    source: TaskVectorSource, keys: Sequence[str], thresholds: Tensor, lam: float, outputs: dict[str, Tensor]
) -> None:
    cast: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for key, start, stop, taus in source.chunks(keys):
        where = (taus.device, taus.dtype)
        if where not in cast:
            cast[where] = thresholds.to(taus.device, taus.dtype)
        merged_tau = ties_merge_chunk(taus, cast[where], source.workspace)
        source.write_base_plus(key, start, stop, merged_tau, lam, outputs[key])


def merge_ties(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: TiesParams,
    *,
    seed: int = 0,  # noqa: ARG001 - deterministic; accepted for the common signature
    source: TaskVectorSource | None = None,
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, object]]:
    """TIES over validated state dicts; returns (state dict, resolved params, info)."""
    resolved = params.resolved()
    lam, top_k = resolved["lam"], resolved["top_k"]
    source = source or TaskVectorSource(base, finetuned)
    float_keys = [k for k in keys if classify_key(k, base[k]) != KIND_BUFFER]
    numel = source.numel(float_keys)
    k = kept_count(top_k, numel)
    with torch.no_grad():
        out = {key: allocate_like(base, key) for key in float_keys}
        thresholds = top_fraction_thresholds(
            lambda: source.chunks(float_keys), source.n_models, numel, top_k, source.workspace
        )
        _merge_pass(source, float_keys, thresholds, lam, out)
    copy_buffers(base, [key for key in keys if key not in out], out)
    info = {
        "n_merged_keys": len(float_keys),
        "kept_per_task": k,
        "trim_thresholds": [float(t) for t in thresholds],
        "passes_over_inputs": 1 if k >= numel else 3,
    }
    return {key: out[key] for key in keys}, resolved, info
