"""Running a scorer's encoder: the wanted hidden layer, pooled, in batches, at the configured precision."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from workers.batching import map_batches
from workers.scorer_io import Scorer

from .config import ExtractConfig, Pooling


class _StopForward(Exception):
    """Raised from a forward hook once the wanted layer has run: later layers are never computed."""


def _layer_list(encoder: torch.nn.Module) -> torch.nn.ModuleList | None:
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers"):
        module: Any = encoder
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            return module
    return None


def _num_layers(encoder: torch.nn.Module) -> int:
    layers = _layer_list(encoder)
    if layers is not None:
        return len(layers)
    count = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
    if not isinstance(count, int):
        raise ValueError(f"{type(encoder).__name__}: cannot tell how many hidden layers it has")
    return count


def resolve_layer(layer: int, num_layers: int) -> int:
    """Hidden-state index in [0, num_layers] (0 = embeddings output) for a possibly negative `layer`."""
    count = num_layers + 1
    if not -count <= layer < count:
        raise ValueError(f"layer {layer} is out of range for an encoder with {num_layers} layers "
                         f"({count} hidden states: use {-count}..{num_layers})")
    return layer % count


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The bare encoder of a *ForSequenceClassification model (the model itself if it is bare)."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) else model


def hidden_state(encoder: torch.nn.Module, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    """hidden_states[index] of `encoder` on `batch` ([B, T, d]), computing no layer past the one needed.

    A forward hook on the module that produces that hidden state (the embeddings, or layer index-1)
    captures its output and stops the forward pass. The last layer, and encoders whose layers cannot
    be found or whose layer outputs are not [B, T, d] tensors, take the plain
    `output_hidden_states=True` path.
    """
    layers = _layer_list(encoder)
    source = None
    if layers is not None and index < len(layers):
        source = layers[index - 1] if index > 0 else getattr(encoder, "embeddings", None)
    if source is not None:
        captured: list[torch.Tensor] = []

        def grab(_module, _inputs, output):
            value = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(value, torch.Tensor) and value.dim() == 3:
                captured.append(value)
                raise _StopForward

        handle = source.register_forward_hook(grab)
        try:
            encoder(**batch)
        except _StopForward:
            return captured[0]
        finally:
            handle.remove()
    return encoder(**batch, output_hidden_states=True).hidden_states[index]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, T, d] -> [B, d] in float32: the first ([CLS]) token, or the mean over real (unpadded) tokens."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"pooling must be 'cls' or 'mean', not {pooling!r}")


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def autocast_dtype(device: torch.device, config: ExtractConfig) -> torch.dtype | None:
    """The reduced precision used on `device`, or None for float32 (always None on CPU)."""
    if device.type != "cuda" or not config.cuda_autocast:
        return None
    if config.cuda_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def precision_name(device: torch.device, config: ExtractConfig) -> str:
    dtype = autocast_dtype(device, config)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def extract_features(scorer: Scorer, texts: Sequence[str], config: ExtractConfig = ExtractConfig()) -> np.ndarray:
    """Pooled hidden layer `config.layer` of the scorer's encoder for each text: float32 [len(texts), d].

    Runs on the device the model is on, in length-sorted batches with dynamic padding under
    `torch.inference_mode` (rows come back in input order), with bf16/fp16 autocast on CUDA when
    configured. No texts gives a [0, d] array.
    """
    model = scorer.model
    model.eval()
    encoder = encoder_of(model)
    index = resolve_layer(config.layer, _num_layers(encoder))
    device = model_device(model)
    dtype = autocast_dtype(device, config)
    if len(texts) == 0:
        dim = getattr(getattr(encoder, "config", None), "hidden_size", 0)
        return np.zeros((0, int(dim)), dtype=np.float32)

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        context = torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else nullcontext()
        with context:
            hidden = hidden_state(encoder, batch, index)
        return pool(hidden, batch["attention_mask"], config.pooling)

    vectors = map_batches(run, scorer.tokenizer, list(texts), batch_size=config.batch_size,
                          max_length=config.max_length, device=device)
    return np.ascontiguousarray(vectors, dtype=np.float32)


MIN_RELATIVE_SPREAD = 1e-5


def check_spread(vectors: np.ndarray, scorer_id: str, config: ExtractConfig) -> None:
    """Refuse features that are the same for every response: GW of such a cloud is noise.

    It happens when the chosen layer sees no input, e.g. the first token of the embedding output
    (layer -3 of a 2-layer encoder): every response then differs only by float rounding.
    """
    if len(vectors) < 2:
        return
    spread = float(np.max(vectors.std(axis=0)))
    size = float(np.mean(np.abs(vectors))) + 1e-30
    if spread <= MIN_RELATIVE_SPREAD * size:
        raise ValueError(f"scorer {scorer_id!r}: features at layer {config.layer} ({config.pooling} pooling) are "
                         f"the same for every response (relative spread {spread / size:.1e}); that layer sees no "
                         f"input - choose another layer or pooling")
