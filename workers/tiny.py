"""A tiny randomly initialised BERT encoder with a character-level WordPiece vocabulary.

Used by unit tests and `fleetmerge demo --tiny`: a real Hugging Face checkpoint directory (config,
safetensors, tokenizer) that builds in well under a second and needs no download.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizer

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_COMMON = ["the", "a", "is", "and", "of", "to", "in", "it", "because", "not", "no", "yes"]


def tiny_vocab() -> list[str]:
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return _SPECIAL + _COMMON + chars + [f"##{c}" for c in string.ascii_lowercase + string.digits]


def write_tiny_bert(out_dir: str | Path, *, hidden: int = 32, layers: int = 3, heads: int = 2, seed: int = 0) -> Path:
    """A tiny random BERT checkpoint with a character-level tokenizer.

    Three layers, not two: the default extraction layer (-3) of a 2-layer encoder is its embedding
    output, whose first token is the same for every response.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True, model_max_length=128)
    tokenizer.save_pretrained(str(out))
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=hidden * 2, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(str(out), safe_serialization=True)
    return out


def tiny_finetune_config(seed: int = 0):
    """Fine-tuning settings under which the tiny encoder learns the demo items (more steps, higher rate)."""
    from workers.finetune import FinetuneConfig

    return FinetuneConfig(epochs=20, learning_rate=5e-3, batch_size=8, max_length=64, warmup_fraction=0.05, seed=seed)
