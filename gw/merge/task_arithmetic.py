"""Task Arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ Σ_i τ_i with τ_i = θ_i − θ₀.

Scope: every floating tensor of the backbone is treated alike — linear weights, biases, LayerNorm
weights and biases, and embedding tables all get θ₀ + λ Σ τ_i. Non-floating buffers are copied from the
base (they must be identical in every model). The default λ = 1/N is plain weight averaging; larger λ
is Task Arithmetic proper and is usually chosen on validation data (see gw.tuning).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gw.merge._state import (
    KIND_BUFFER,
    StateDict,
    TaskVectorSource,
    allocate_like,
    classify_key,
    copy_buffers,
    sum_rows,
)


@dataclass(frozen=True)
class TaskArithmeticParams:
    """lam: scaling of the summed task vectors; None means 1/N (the average of the fine-tunes)."""

    lam: float | None = None

    def resolved(self, n_models: int) -> dict[str, float]:
        lam = 1.0 / n_models if self.lam is None else float(self.lam)
        if not math.isfinite(lam):
            raise ValueError(f"lam must be a finite number, got {self.lam}")
        return {"lam": lam}


def add_scaled_sum(source: TaskVectorSource, keys: Sequence[str], lam: float, out: dict[str, Tensor]) -> None:
    """out[key] = θ₀ + lam · Σ_i τ_i for every key, chunk by chunk (τ as streamed by `source`)."""
    outputs = {key: allocate_like(source.base, key) for key in keys}
    for key, start, stop, taus in source.chunks(keys):
        summed = source.workspace.get("summed", (taus.shape[1],), taus.dtype, taus.device)
        source.write_base_plus(key, start, stop, sum_rows(taus, summed), lam, outputs[key])
    out.update(outputs)


def merge_task_arithmetic(
    base: StateDict,
    finetuned: Sequence[StateDict],
    keys: Sequence[str],
    params: TaskArithmeticParams,
    *,
    seed: int = 0,  # noqa: ARG001 - deterministic; accepted for the common signature
    source: TaskVectorSource | None = None,
) -> tuple[dict[str, Tensor], dict[str, float], dict[str, object]]:
    """Task Arithmetic over validated state dicts; returns (state dict, resolved params, info)."""
    resolved = params.resolved(len(finetuned))
    source = source or TaskVectorSource(base, finetuned)
    float_keys = [k for k in keys if classify_key(k, base[k]) != KIND_BUFFER]
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        add_scaled_sum(source, float_keys, resolved["lam"], out)
    copy_buffers(base, [k for k in keys if k not in out], out)
    return {k: out[k] for k in keys}, resolved, {"n_merged_keys": len(float_keys)}
