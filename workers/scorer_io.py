"""Load scorers safely and split them into a shared backbone and a per-item head.

Safety: weights load from `model.safetensors` only (a directory with pickled weights only is refused
before transformers sees it), `trust_remote_code` is never set, and nothing is fetched from a hub
(`local_files_only=True`).

Naming: backbone tensors are named relative to the encoder (`encoder.layer.0...`, as in the base
checkpoint), head tensors by module (`pooler.dense.weight`, `classifier.weight`).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from gw.keys import content_key
from infra.storage import Store, StorageError, open_store

DEFAULT_HEAD_MODULES = ("pooler", "classifier")
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model")


class ScorerLoadError(ValueError):
    """A scorer directory cannot be loaded; the message names the directory and the problem."""


@dataclass
class Scorer:
    model: torch.nn.Module  # a *ForSequenceClassification model in eval mode
    tokenizer: PreTrainedTokenizerBase
    task: str  # "multiclass" or "multilabel"
    path: Path


def _require_safetensors(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ScorerLoadError(f"{path}: missing config.json")
    if not (path / WEIGHTS_FILE).is_file():
        raise ScorerLoadError(f"{path}: no {WEIGHTS_FILE}; only safetensors weights are loaded (never pickles)")


def has_tokenizer(path: Path) -> bool:
    """Whether a checkpoint directory ships tokenizer files of its own."""
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(path: Path, fallback: Path | None = None) -> PreTrainedTokenizerBase:
    """The scorer's own tokenizer, or the base model's when the scorer directory ships none."""
    source = path if has_tokenizer(path) or fallback is None else fallback
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)


def load_scorer(path: str | Path, *, task: str = "multiclass", device: str | torch.device = "cpu",
                tokenizer_fallback: Path | None = None) -> Scorer:
    path = Path(path)
    _require_safetensors(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), use_safetensors=True, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ScorerLoadError(f"{path}: cannot load the scorer: {exc}") from None
    model.to(device).eval()
    return Scorer(model, load_tokenizer(path, tokenizer_fallback), task, path)


def _encoder_prefix(model: torch.nn.Module) -> str:
    prefix = getattr(model, "base_model_prefix", "")
    return f"{prefix}." if prefix and hasattr(model, prefix) else ""


def is_head_key(name: str, head_modules: Iterable[str] = DEFAULT_HEAD_MODULES) -> bool:
    return name.split(".", 1)[0] in set(head_modules)


def split_state_dict(
    state: Mapping[str, torch.Tensor], *, encoder_prefix: str = "", head_modules: Iterable[str] = DEFAULT_HEAD_MODULES
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(backbone, head): names relative to the encoder; head = the named top-level modules."""
    heads = tuple(head_modules)
    backbone, head = {}, {}
    for name, tensor in state.items():
        local = name[len(encoder_prefix):] if encoder_prefix and name.startswith(encoder_prefix) else name
        (head if is_head_key(local, heads) else backbone)[local] = tensor
    return backbone, head


def split_model(model: torch.nn.Module, head_modules: Iterable[str] = DEFAULT_HEAD_MODULES):
    """Split a *ForSequenceClassification model's parameters into (backbone, head) state dicts."""
    return split_state_dict(model.state_dict(), encoder_prefix=_encoder_prefix(model), head_modules=head_modules)


def load_backbone_state(path: str | Path, head_modules: Iterable[str] = DEFAULT_HEAD_MODULES) -> dict[str, torch.Tensor]:
    """Backbone tensors of a checkpoint directory (base encoder or fine-tuned scorer), from safetensors."""
    from safetensors.torch import load_file

    path = Path(path)
    _require_safetensors(path)
    state = load_file(str(path / WEIGHTS_FILE))
    config = json.loads((path / "config.json").read_text())
    prefix = f"{config.get('model_type', '')}."
    # Fine-tuned checkpoints carry the encoder prefix (bert.encoder...), base encoders do not.
    prefix = prefix if any(k.startswith(prefix) for k in state) else ""
    backbone, _ = split_state_dict(state, encoder_prefix=prefix, head_modules=head_modules)
    return backbone


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(source: str | Path | Store, checkpoint: str = "") -> str:
    """Content hash of a checkpoint: sha256 of its weights' hex sha256 then its config.json bytes (32 hex).

    ``source`` is the checkpoint directory, or a store with ``checkpoint`` the checkpoint's ref in it
    (a key, an absolute path or a URI). The weights are streamed, never downloaded whole. A store's
    unreadable checkpoint raises ValueError; a missing file in a directory raises FileNotFoundError.
    """
    in_store = isinstance(source, Store)
    where = source.sub(checkpoint) if in_store else open_store(str(Path(source).absolute()))
    try:
        _, weights_sha = where.size_and_sha256(WEIGHTS_FILE)
        config_bytes = where.read_bytes("config.json")
    except StorageError as exc:
        if not in_store:
            raise
        raise ValueError(f"checkpoint {checkpoint}: cannot hash it ({exc})") from None
    return content_key(weights_sha, config_bytes, length=32)


def default_device() -> str:
    """Where scorers run unless told otherwise: CUDA when available, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_config(path: str | Path):
    return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
