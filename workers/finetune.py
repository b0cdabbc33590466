"""Fine-tune one item's scorer from the base encoder (multi-class or multi-label).

Seeded and reproducible on one device: the head's initialisation, dropout and the batch order all
come from the item's seed. Batches are bucketed by length (dynamic padding) to keep CPU runs short.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from workers.batching import map_batches


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 10
    learning_rate: float = 1e-4
    batch_size: int = 16
    max_length: int = 96
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(n: int, lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length rows: shuffle, sort within chunks of 8 batches, shuffle batches."""
    order = rng.permutation(n)
    chunk = batch_size * 8
    batches = []
    for start in range(0, n, chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune_scorer(base_dir: str | Path, texts: Sequence[str], labels: Sequence, *, task: str, label_names: Sequence[str],
                    config: FinetuneConfig = FinetuneConfig(), device: str | torch.device = "cpu",
                    on_step: Callable[[int, int, float], None] | None = None):
    """Return (model, tokenizer, history) for one item; `labels` are ints (multiclass) or 0/1 lists (multilabel)."""
    if task not in ("multiclass", "multilabel"):
        raise ValueError(f"unknown task {task!r}")
    if len(texts) == 0 or len(texts) != len(labels):
        raise ValueError(f"need matching, non-empty texts and labels (got {len(texts)} texts, {len(labels)} labels)")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    problem = "multi_label_classification" if task == "multilabel" else "single_label_classification"
    n_labels = len(label_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_dir), num_labels=n_labels, problem_type=problem, use_safetensors=True, local_files_only=True,
        trust_remote_code=False, id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True, trust_remote_code=False)
    model.to(device).train()

    encoded = tokenizer(list(texts), truncation=True, max_length=config.max_length)
    lengths = np.array([len(x) for x in encoded["input_ids"]])
    target = torch.tensor(np.asarray(labels), dtype=torch.float32 if task == "multilabel" else torch.long)

    steps_per_epoch = math.ceil(len(texts) / config.batch_size)
    total = steps_per_epoch * config.epochs
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.learning_rate)
    warmup = max(1, int(config.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    history, step = [], 0
    for _ in range(config.epochs):
        for rows in _batches(len(texts), lengths, config.batch_size, rng):
            batch = tokenizer.pad([{k: encoded[k][i] for k in encoded.keys()} for i in rows], return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch, labels=target[rows].to(device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            history.append(loss.item())
            if on_step:
                on_step(step, total, history[-1])
    model.eval()
    return model, tokenizer, history


def predict_logits(model, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """Logits of a *ForSequenceClassification model, in input order (sorted batches, inference mode)."""
    model.eval()
    return map_batches(lambda batch: model(**batch).logits, tokenizer, texts, batch_size=batch_size,
                       max_length=max_length, device=device)


def decisions(logits: np.ndarray, task: str) -> np.ndarray:
    """Class indices (multiclass) or 0/1 label vectors (multilabel)."""
    return (logits > 0).astype(np.int64) if task == "multilabel" else logits.argmax(axis=-1)
