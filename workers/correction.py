"""Per-item corrections on a shared encoder: per-row LoRA inside one batched pass, and their files.

Each corrected item has, for some of the encoder's linear layers, LoRA factors (A [r, in], B [out, r])
of its residual against the merged backbone (`gw.merge.correction`). `RowCorrections` stacks every
item's factors per layer (slot 0 is "no correction", zeros) and a forward hook on each layer adds
x A_rowᵀ B_rowᵀ to that layer's output, row by row, with two batched matmuls: a mixed batch still
takes one encoder pass. Items with smaller ranks are zero-padded to the layer's largest rank.

On disk each item's factors are a PEFT LoRA adapter directory (`infra.peft_format`).
"""
from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gw.merge.correction import residuals
from infra.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, lora_keys, read_adapter_config

Factors = Mapping[str, tuple[Tensor, Tensor]]  # encoder module name -> (A [r, in], B [out, r])


def linear_modules(encoder: nn.Module) -> list[str]:
    """Names of the encoder's linear layers: the weights a correction may target."""
    return [name for name, module in encoder.named_modules() if isinstance(module, nn.Linear)]


def item_residuals(own_backbone: Mapping[str, Tensor], model, max_rank: int) -> dict:
    """The item's residual against `model`'s shared encoder on every linear layer, up to `max_rank`
    (`gw.merge.correction.residuals`; `module_factors` slices a rank out of it)."""
    keys = [f"{name}.weight" for name in linear_modules(model.backbone)]
    return residuals(own_backbone, model.backbone_state_dict(), keys, max_rank)


class _Hook:
    def __init__(self, owner: RowCorrections, index: int):
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        rows = getattr(self.owner._local, "rows", None)
        a, b = self.owner.stacks(self.index)
        if rows is None or a.shape[1] == 0:
            return output
        x = inputs[0]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
        # Gather each row's factors: [batch, r, in] and [batch, out, r]; x Aᵀ then (x Aᵀ) Bᵀ.
        delta = torch.bmm(torch.bmm(flat, a[rows].transpose(1, 2).to(flat.dtype)), b[rows].transpose(1, 2).to(flat.dtype))
        return output + delta.reshape(output.shape).to(output.dtype)


class RowCorrections(nn.Module):
    """Every item's LoRA factors for one encoder, applied per row while `rows(items)` is active."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self._layers = dict((name, m) for name, m in encoder.named_modules() if isinstance(m, nn.Linear))
        self._index = {name: i for i, name in enumerate(self._layers)}
        self._factors: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # item -> module -> (A, B)
        self._slot: dict[str, int] = {}
        self._local = threading.local()  # the rows of the pass running in this thread
        for name, i in self._index.items():
            layer = self._layers[name]
            self.register_buffer(f"a{i}", layer.weight.new_zeros(1, 0, layer.in_features))
            self.register_buffer(f"b{i}", layer.weight.new_zeros(1, layer.out_features, 0))
            layer.register_forward_hook(_Hook(self, i))

    @property
    def items(self) -> list[str]:
        return sorted(self._factors)

    def factors(self, item: str) -> dict[str, tuple[Tensor, Tensor]]:
        return dict(self._factors.get(item, {}))

    def rank(self, item: str) -> int:
        return max((a.shape[0] for a, _ in self._factors.get(item, {}).values()), default=0)

    def stacks(self, index: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"a{index}"), getattr(self, f"b{index}")

    def set(self, item: str, factors: Factors | None) -> None:
        """Give `item` these factors (None or {}: no correction) and rebuild the per-layer stacks."""
        factors = {m: (a.detach(), b.detach()) for m, (a, b) in (factors or {}).items() if a.shape[0] > 0}
        for module, (a, b) in factors.items():
            layer = self._layers.get(module)
            if layer is None:
                raise ValueError(f"item {item}: no linear layer {module!r} in the encoder")
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[1] != layer.in_features \
                    or b.shape[0] != layer.out_features:
                raise ValueError(f"item {item}: factors of {module} have shapes {tuple(a.shape)}, {tuple(b.shape)}; "
                                 f"the layer is {layer.out_features}x{layer.in_features}")
        if factors:
            self._factors[item] = factors
        else:
            self._factors.pop(item, None)
        self._slot = {it: n + 1 for n, it in enumerate(sorted(self._factors))}
        for module, i in self._index.items():
            a_old, b_old = self.stacks(i)
            rank = max((f[module][0].shape[0] for f in self._factors.values() if module in f), default=0)
            a_new = a_old.new_zeros(len(self._slot) + 1, rank, a_old.shape[2])
            b_new = b_old.new_zeros(len(self._slot) + 1, b_old.shape[1], rank)
            for it, slot in self._slot.items():
                if module in self._factors[it]:
                    a, b = self._factors[it][module]
                    a_new[slot, :a.shape[0]] = a
                    b_new[slot, :, :b.shape[1]] = b
            setattr(self, f"a{i}", a_new)
            setattr(self, f"b{i}", b_new)

    @contextlib.contextmanager
    def rows(self, items: Sequence[str]) -> Iterator[None]:
        """Apply each row's item's correction during the passes inside; rows of other items get none."""
        slots = [self._slot.get(item, 0) for item in items]
        previous = getattr(self._local, "rows", None)
        device = self.a0.device if self._index else "cpu"
        self._local.rows = torch.tensor(slots, device=device) if any(slots) else None
        try:
            yield
        finally:
            self._local.rows = previous


def save_adapter(out_dir: str | Path, factors: Factors, item: str) -> Path:
    """Write one item's factors as a PEFT LoRA adapter directory; ranks below the largest are zero-padded
    (PEFT's `r` is one number per adapter, and zero rows add nothing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for module, (a, b) in factors.items():
        key_a, key_b = lora_keys(module)
        tensors[key_a] = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]).contiguous()
        tensors[key_b] = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1).contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt", "item": item})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(rank, list(factors)), indent=2))
    return out


def load_adapter(path: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """An adapter directory written by `save_adapter` (or any plain LoRA with scaling 1) as factors."""
    path = Path(path)
    try:
        doc = json.loads((path / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: no readable {ADAPTER_CONFIG} ({exc})") from None
    rank, modules = read_adapter_config(doc, str(path))
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    factors = {}
    for module in modules:
        key_a, key_b = lora_keys(module)
        if key_a not in tensors or key_b not in tensors:
            raise ValueError(f"{path}: {ADAPTER_WEIGHTS} lacks {key_a} or {key_b}")
        a, b = tensors.pop(key_a), tensors.pop(key_b)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(f"{path}: {module} has rank {a.shape[0]}/{b.shape[1]}, the config says r = {rank}")
        factors[module] = (a, b)
    if tensors:
        raise ValueError(f"{path}: tensors for modules not in target_modules: {sorted(tensors)[:3]}")
    return factors
