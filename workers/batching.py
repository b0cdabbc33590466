"""Length-sorted batches with dynamic padding: the cheap half of fast inference on CPU and GPU.

Sorting by token length before batching means each batch pads only to its own longest text, not to
the longest text of the whole set; results are put back in the caller's order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

DEFAULT_MAX_LENGTH = 128


def sorted_batches(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], *, batch_size: int = 64,
                   max_length: int = DEFAULT_MAX_LENGTH) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (row indices, padded batch), longest texts first so memory peaks early."""
    if not texts:
        return
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    lengths = np.array([len(ids) for ids in encoded["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        features = [{k: encoded[k][i] for k in encoded.keys()} for i in rows]
        yield rows, tokenizer.pad(features, return_tensors="pt")


def map_batches(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], tokenizer: PreTrainedTokenizerBase,
                texts: Sequence[str], *, batch_size: int = 64, max_length: int = DEFAULT_MAX_LENGTH,
                device: str | torch.device = "cpu") -> np.ndarray:
    """Apply `fn` (batch -> [B, ...] tensor) over texts in sorted batches; rows come back in input order."""
    out: np.ndarray | None = None
    with torch.inference_mode():
        for rows, batch in sorted_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length):
            values = fn({k: v.to(device) for k, v in batch.items()}).float().cpu().numpy()
            if out is None:
                out = np.empty((len(texts), *values.shape[1:]), dtype=values.dtype)
            out[rows] = values
    if out is None:
        raise ValueError("no texts to process")
    return out
