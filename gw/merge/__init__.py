"""Merge methods for backbone state dicts: one registry, one signature.

    result = merge("ties", base, [sd_a, sd_b, sd_c], seed=0, lam=1.0, top_k=0.2)
    result.state_dict  # merged backbone, same keys, shapes, dtypes and devices as `base`
    result.params      # every parameter used, defaults resolved (JSON-safe)
    result.info        # small JSON-safe diagnostics (thresholds, DOGE's loss curve, ...)

Inputs are BACKBONE state dicts only (heads stay per item and are split off by the caller); task
vectors are taken against `base`, the pretrained checkpoint. Inputs are never modified. See
gw/merge/README.md for what each method does with LayerNorm, biases and embeddings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from gw.merge._state import classify_key, validate_state_dicts
from gw.merge.dare import DareParams, merge_dare
from gw.merge.doge import DogeParams, merge_doge
from gw.merge.iso import IsoCParams, IsoCtsParams, merge_iso_c, merge_iso_cts
from gw.merge.regmean import Grams, RegMeanParams, merge_regmean
from gw.merge.task_arithmetic import TaskArithmeticParams, merge_task_arithmetic
from gw.merge.ties import TiesParams, merge_ties
from gw.merge.tsv import TsvMParams, merge_tsv_m

__all__ = ["MergeResult", "available_methods", "classify_key", "method_defaults", "merge", "needs_grams"]


@dataclass(frozen=True)
class MergeResult:
    """A merged backbone with the parameters that produced it."""

    state_dict: dict[str, Tensor]
    method: str
    params: dict[str, Any]
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """JSON-safe description (everything but the tensors), e.g. for consolidated.json."""
        return {"method": self.method, "params": dict(self.params), "seed": self.seed, "info": dict(self.info)}


@dataclass(frozen=True)
class _Method:
    params_type: type
    run: Callable[..., tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]]
    uses_grams: bool = False  # needs each member's layer-input Gram matrices (RegMean)


_METHODS: dict[str, _Method] = {
    "task_arithmetic": _Method(TaskArithmeticParams, merge_task_arithmetic),
    "ties": _Method(TiesParams, merge_ties),
    "dare": _Method(DareParams, merge_dare),
    "doge": _Method(DogeParams, merge_doge),
    "tsv_m": _Method(TsvMParams, merge_tsv_m),
    "iso_c": _Method(IsoCParams, merge_iso_c),
    "iso_cts": _Method(IsoCtsParams, merge_iso_cts),
    "regmean": _Method(RegMeanParams, merge_regmean, uses_grams=True),
}
_ALIASES = {"ta": "task_arithmetic"}


def available_methods() -> list[str]:
    """Canonical names of the registered merge methods ("ta" is accepted for "task_arithmetic")."""
    return sorted(_METHODS)


def _canonical(method: str) -> str:
    name = _ALIASES.get(method.lower(), method.lower()) if isinstance(method, str) else method
    if name not in _METHODS:
        raise ValueError(f"unknown merge method {method!r}; available: {available_methods()}")
    return name


def needs_grams(method: str) -> bool:
    """Whether `method` needs each member's layer-input Gram matrices (`merge(..., grams=...)`)."""
    return _METHODS[_canonical(method)].uses_grams


def method_defaults(method: str) -> dict[str, Any]:
    """The keyword parameters a method accepts, with their defaults (None = resolved per merge)."""
    params_type = _METHODS[_canonical(method)].params_type
    return {f.name: f.default for f in dataclasses.fields(params_type)}


def merge(
    method: str,
    base: Mapping[str, Tensor],
    finetuned: Sequence[Mapping[str, Tensor]],
    *,
    seed: int = 0,
    grams: Sequence[Grams] | None = None,
    **params: Any,
) -> MergeResult:
    """Merge fine-tuned backbones into one, with task vectors against the pretrained `base`.

    method: one of available_methods() (or "ta"); params: that method's keywords (method_defaults()).
    grams: per model, {weight key: input Gram matrix}, for the methods that need them (`needs_grams`).
    Deterministic given `seed` (only DARE draws random numbers). Raises ValueError on an unknown method
    or parameter, and, naming the key, on key, shape or dtype mismatches between `base` and a model.
    """
    name = _canonical(method)
    spec = _METHODS[name]
    accepted = {f.name for f in dataclasses.fields(spec.params_type)}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for merge method {name!r}; accepted: {sorted(accepted)}")
    keys = validate_state_dicts(base, finetuned)
    extra = {"grams": grams} if spec.uses_grams else {}
    state_dict, resolved, info = spec.run(base, finetuned, keys, spec.params_type(**params), seed=int(seed), **extra)
    return MergeResult(state_dict=state_dict, method=name, params=resolved, seed=int(seed), info=info)
