"""The on-disk format of a per-item correction: a PEFT LoRA adapter directory (no torch here).

    adapters/<item>/adapter_config.json        peft_type LORA, r, lora_alpha = r (scaling 1), target_modules
    adapters/<item>/adapter_model.safetensors  base_model.model.<module>.lora_A.weight  [r, in]
                                               base_model.model.<module>.lora_B.weight  [out, r]

Module names are those of the shared encoder loaded with `AutoModel.from_pretrained(backbone/)`, so
`peft.PeftModel.from_pretrained(encoder, adapters/<item>)` applies W x + B A x to each listed linear
layer, exactly what fleetmerge's serving adds per row.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def lora_keys(module: str) -> tuple[str, str]:
    """The (A, B) tensor names PEFT's loader expects for one linear module of the encoder."""
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def adapter_config(rank: int, modules: Sequence[str], base_model: str | None = None) -> dict:
    """adapter_config.json for a LoRA of rank `rank` on `modules` with scaling lora_alpha / r = 1."""
    if rank < 1 or not modules:
        raise ValueError(f"an adapter needs rank >= 1 and at least one module, got rank {rank}, {len(modules)} modules")
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "inference_mode": True,
            "r": int(rank), "lora_alpha": int(rank), "lora_dropout": 0.0, "target_modules": sorted(modules),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def read_adapter_config(doc: Mapping, where: str) -> tuple[int, list[str]]:
    """(rank, target modules) of an adapter fleetmerge can apply exactly; a one-line error otherwise."""
    if doc.get("peft_type") != "LORA":
        raise ValueError(f"{where}: not a LoRA adapter (peft_type {doc.get('peft_type')!r})")
    rank, alpha, modules = doc.get("r"), doc.get("lora_alpha"), doc.get("target_modules")
    if not isinstance(rank, int) or rank < 1 or alpha != rank or doc.get("use_rslora") or doc.get("use_dora"):
        raise ValueError(f"{where}: only plain LoRA with lora_alpha == r (scaling 1) is supported")
    if doc.get("rank_pattern") or doc.get("alpha_pattern") or doc.get("fan_in_fan_out") or doc.get("bias", "none") != "none":
        raise ValueError(f"{where}: rank/alpha patterns, fan_in_fan_out and LoRA biases are not supported")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{where}: target_modules must be a non-empty list of module names")
    return rank, list(modules)
