"""Extraction settings and the small records that name one scorer's features."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from gw.keys import json_key

from .keys import FORMAT_VERSION

Pooling = Literal["cls", "mean"]


@dataclass(frozen=True)
class ExtractConfig:
    """How features are extracted.

    layer: index into the encoder's hidden states (embeddings output first, then one per layer), so
        -1 is the last layer and -3 (the default) the third-from-last.
    pooling: "cls" (first token) or "mean" (mean over the attention mask).
    max_responses / seed / split: which responses are used (split None = all splits).
    batch_size / max_length: tokenised length cap and batch size of the sorted batches.
    cuda_autocast / cuda_dtype: bf16 (or fp16) autocast when running on CUDA; CPU is always float32.
        bf16 falls back to fp16 on GPUs without bf16 support.
    """

    layer: int = -3
    pooling: Pooling = "cls"
    max_responses: int = 512
    seed: int = 0
    split: str | None = "train"
    batch_size: int = 64
    max_length: int = 128
    cuda_autocast: bool = True
    cuda_dtype: Literal["bfloat16", "float16"] = "bfloat16"

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"ExtractConfig.pooling must be 'cls' or 'mean', not {self.pooling!r}")
        if self.cuda_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"ExtractConfig.cuda_dtype must be 'bfloat16' or 'float16', not {self.cuda_dtype!r}")
        for name in ("max_responses", "batch_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ExtractConfig.{name} must be a positive integer, not {value!r}")
        if not isinstance(self.layer, int):
            raise ValueError(f"ExtractConfig.layer must be an integer hidden-state index, not {self.layer!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the vectors computed for given responses (what the config hash covers)."""
        return {"format": FORMAT_VERSION, "layer": self.layer, "pooling": self.pooling, "max_length": self.max_length,
                "cuda_autocast": self.cuda_autocast, "cuda_dtype": self.cuda_dtype}

    def config_hash(self) -> str:
        return json_key(self.output_settings(), length=32)


@dataclass(frozen=True)
class FeatureRef:
    """Where one scorer's features are and what they were made from (small and JSON-safe)."""

    scorer_id: str
    key: str
    n: int
    dim: int
    checkpoint_hash: str
    data_hash: str
    config_hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "FeatureRef":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class ExtractionPlan:
    """The responses one scorer will be run over, and the key its features are stored under."""

    scorer_id: str
    key: str
    checkpoint_hash: str
    data_hash: str
    config_hash: str
    response_ids: tuple[str, ...] = field(repr=False)
    texts: tuple[str, ...] = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.response_ids)
