"""Each member's layer-input Gram matrices, the statistics RegMean merges with (gw.merge.regmean).

A member's Grams come from its own fine-tuned backbone run over its item's training answers: for every
linear layer of the encoder, Σ x xᵀ over the non-padding tokens' inputs to that layer, divided by the
token count (so a member's weight in the merge does not grow with its number of answers). They depend
only on the member's checkpoint and responses, so they are cached in the store by content hash, one
safetensors file per member (MiniLM-L6: ~75 MB in float32).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from gw.keys import json_key
from infra.manifest import ScorerSpec
from infra.storage import Store
from workers.batching import sorted_batches
from workers.scorer_io import checkpoint_hash

GRAMS_PREFIX = "grams"
GRAMS_VERSION = 1  # bump when what a Gram holds changes


def input_grams(backbone: torch.nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 64,
                max_length: int = 128, device: str = "cpu") -> dict[str, torch.Tensor]:
    """{"<linear module>.weight": [in, in] mean input Gram over the non-padding tokens of `texts`}."""
    if not texts:
        raise ValueError("no training answers to compute Gram matrices from")
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []  # the current batch's token mask, read by the hooks

    def hook(name: str):
        def record(_module, inputs, _output) -> None:
            x = inputs[0]
            x = x[mask[0]] if x.dim() == 3 else x  # tokens of real text only
            x = x.double()
            gram = x.T @ x
            sums[name] = gram if name not in sums else sums[name] + gram
        return record

    handles = [module.register_forward_hook(hook(f"{name}.weight"))
               for name, module in backbone.named_modules() if isinstance(module, torch.nn.Linear)]
    tokens = 0
    try:
        with torch.inference_mode():
            for _, batch in sorted_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
                batch = {k: v.to(device) for k, v in batch.items()}
                mask[:] = [batch["attention_mask"].bool()]
                tokens += int(mask[0].sum())
                backbone(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / tokens).float().cpu() for name, total in sums.items()}


def grams_key(store: Store, spec: ScorerSpec, max_length: int) -> str:
    inputs = [checkpoint_hash(store, spec.checkpoint), store.size_and_sha256(spec.responses)[1], max_length]
    return f"{GRAMS_PREFIX}/{json_key(['grams', GRAMS_VERSION, inputs], length=24)}.safetensors"


def cached_grams(store: Store, spec: ScorerSpec, compute, *, max_length: int) -> dict[str, torch.Tensor]:
    """The member's Grams from the store, or `compute()`d and written there."""
    key = grams_key(store, spec, max_length)
    if (grams := store.read_cached(key, store.read_safetensors)) is not None:
        return grams
    grams = compute()
    store.write_safetensors(key, grams, metadata={"scorer": spec.id, "version": str(GRAMS_VERSION)})
    return grams
