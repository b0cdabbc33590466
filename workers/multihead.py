"""One shared encoder, one small head per item: the consolidated scorer (docs/architecture.md §3.2, §4.5).

On disk (a directory; `workers.publish_fleet.save_checkpoint` writes it to a store):
    backbone/               a plain Hugging Face encoder directory (config, model.safetensors, tokenizer)
    heads/<item>.safetensors
    adapters/<item>/        optional: the item's correction, a PEFT LoRA adapter (`workers.correction`);
                            a checkpoint with any is format /2, so a reader that would ignore it refuses it
    consolidated.json       items and their label schemas, plus whatever the caller records
                            (group, merge method and parameters, source hashes, metrics)
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from workers.correction import Factors, RowCorrections, load_adapter, save_adapter

FORMAT = "fleetmerge.consolidated/1"
FORMAT_CORRECTED = "fleetmerge.consolidated/2"  # /1 plus per-item adapters
FORMATS = (FORMAT, FORMAT_CORRECTED)


class ItemHead(nn.Module):
    """A BERT-style classification head rebuilt from its state dict.

    Supported layouts (forward takes the encoder's first-token hidden state):
      BERT:     pooler.dense -> tanh -> classifier            (pooler.dense.*, classifier.*)
      RoBERTa:  classifier.dense -> tanh -> classifier.out_proj
      plain:    classifier
    """

    def __init__(self, state: Mapping[str, torch.Tensor]):
        super().__init__()
        keys = set(state)
        self.pre: nn.Linear | None = None
        if {"pooler.dense.weight", "classifier.weight"} <= keys:
            self.pre, self.out = _linear(state, "pooler.dense"), _linear(state, "classifier")
            self._layout = "bert"
        elif {"classifier.dense.weight", "classifier.out_proj.weight"} <= keys:
            self.pre, self.out = _linear(state, "classifier.dense"), _linear(state, "classifier.out_proj")
            self._layout = "roberta"
        elif "classifier.weight" in keys:
            self.out = _linear(state, "classifier")
            self._layout = "plain"
        else:
            raise ValueError(f"unsupported head layout, tensors: {sorted(keys)}")

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.pre(first_token)) if self.pre is not None else first_token
        return self.out(hidden)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        names = {"bert": ("pooler.dense", "classifier"), "roberta": ("classifier.dense", "classifier.out_proj"),
                 "plain": (None, "classifier")}[self._layout]
        out = {}
        for name, layer in zip(names, (self.pre, self.out)):
            if name is not None:
                out[f"{name}.weight"] = layer.weight.detach().clone()
                out[f"{name}.bias"] = layer.bias.detach().clone()
        return out

    def load_head_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a head state dict in checkpoint naming (pooler.dense.*, classifier.*)."""
        rebuilt = ItemHead(state)
        if rebuilt._layout != self._layout:
            raise ValueError(f"head layout {rebuilt._layout} does not match {self._layout}")
        self.load_state_dict(rebuilt.state_dict())

    @property
    def n_outputs(self) -> int:
        return self.out.out_features


def _linear(state: Mapping[str, torch.Tensor], name: str) -> nn.Linear:
    weight, bias = state[f"{name}.weight"], state.get(f"{name}.bias")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def build_encoder(config) -> nn.Module:
    """An encoder without its own pooler where the architecture has one (the pooler belongs to the heads)."""
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)


class MultiHeadScorer(nn.Module):
    def __init__(self, config, backbone_state: Mapping[str, torch.Tensor], heads: Mapping[str, Mapping[str, torch.Tensor]],
                 items: Mapping[str, Mapping], *, strict: bool = True):
        super().__init__()
        if set(heads) != set(items):
            raise ValueError(f"heads {sorted(heads)} and item schemas {sorted(items)} name different items")
        self.config = config
        self.backbone = build_encoder(config)
        missing, unexpected = self.backbone.load_state_dict(dict(backbone_state), strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"backbone tensors do not match the encoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.heads = nn.ModuleDict({item: ItemHead(state) for item, state in heads.items()})
        self.items = {item: dict(schema) for item, schema in items.items()}
        for item, head in self.heads.items():
            n = len(self.items[item]["labels"])
            if head.n_outputs != n:
                raise ValueError(f"item {item}: head has {head.n_outputs} outputs but {n} labels")
        self.corrections: RowCorrections | None = None  # per-item LoRA factors, made on the first `set_correction`
        self.eval()

    def set_correction(self, item: str, factors: Factors | None) -> None:
        """Give `item` a low-rank correction of the shared encoder (None: none); see workers.correction."""
        if item not in self.heads:
            raise ValueError(f"no item {item!r} in this checkpoint (items: {', '.join(self.heads)})")
        if self.corrections is None:
            if not factors:
                return
            self.corrections = RowCorrections(self.backbone)
        self.corrections.set(item, factors)

    def correction(self, item: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.corrections.factors(item) if self.corrections is not None else {}

    def encode(self, batch: Mapping[str, torch.Tensor], items: str | Sequence[str] | None = None) -> torch.Tensor:
        """First-token hidden state of the last layer: what every head reads. `items` (one per row, or one
        for every row) applies each row's item's correction inside the same pass."""
        if self.corrections is None or items is None:
            return self.backbone(**batch).last_hidden_state[:, 0]
        rows = [items] * len(batch["input_ids"]) if isinstance(items, str) else list(items)
        with self.corrections.rows(rows):
            return self.backbone(**batch).last_hidden_state[:, 0]

    def forward(self, batch: Mapping[str, torch.Tensor], items: Sequence[str]) -> list[torch.Tensor]:
        """Logits per row for a mixed batch: one backbone pass (each row with its item's correction, if
        any), then each row through its item's head."""
        first = self.encode(batch, items)
        out: list[torch.Tensor | None] = [None] * len(items)
        for item in dict.fromkeys(items):
            rows = [i for i, it in enumerate(items) if it == item]
            logits = self.heads[item](first[rows])
            for row, value in zip(rows, logits):
                out[row] = value
        return out  # type: ignore[return-value]

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.backbone.state_dict().items()}


def save_consolidated(out_dir: str | Path, scorer: MultiHeadScorer, tokenizer: PreTrainedTokenizerBase,
                      meta: Mapping | None = None) -> Path:
    from workers.model_card import model_card

    out = Path(out_dir)
    (out / "heads").mkdir(parents=True, exist_ok=True)
    backbone_dir = out / "backbone"
    shared = scorer.backbone.config
    scorer.backbone.config = _neutral_config(scorer.backbone)
    try:
        scorer.backbone.save_pretrained(str(backbone_dir), safe_serialization=True)
    finally:
        scorer.backbone.config = shared
    limit = getattr(scorer.backbone.config, "max_position_embeddings", None)
    if limit and tokenizer.model_max_length > limit:  # else truncation=True does not cap a long text
        tokenizer.model_max_length = limit
    tokenizer.save_pretrained(str(backbone_dir))
    head_keys = {}
    for item, head in scorer.heads.items():
        state = head.head_state_dict()
        head_keys[item] = set(state)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "heads" / f"{item}.safetensors"),
                  metadata={"item": item, "task": scorer.items[item]["task"]})
    items = {item: {**schema, "head": f"heads/{item}.safetensors"} for item, schema in scorer.items.items()}
    for item in scorer.items:
        factors = scorer.correction(item)
        if factors:
            save_adapter(out / "adapters" / item, factors, item)
            items[item]["adapter"] = f"adapters/{item}"
    corrected = any("adapter" in schema for schema in items.values())
    doc = {"format": FORMAT_CORRECTED if corrected else FORMAT, **(dict(meta) if meta else {}), "items": items}
    (out / "README.md").write_text(model_card(items, dict(meta or {}), head_keys))
    (out / "consolidated.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def _neutral_config(encoder: nn.Module):
    """A copy of the encoder's config that names no item: one member's labels or problem type would make
    AutoModelForSequenceClassification load silently as that item's classifier."""
    config = copy.deepcopy(encoder.config)
    config.architectures = [type(encoder).__name__]
    config.id2label, config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    config.problem_type = None
    config.finetuning_task = None
    return config


def load_consolidated(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiHeadScorer, PreTrainedTokenizerBase, dict]:
    path = Path(path)
    meta_file = path / "consolidated.json"
    if not meta_file.is_file():
        raise ValueError(f"{path}: not a consolidated checkpoint (no consolidated.json)")
    doc = json.loads(meta_file.read_text())
    if doc.get("format") not in FORMATS:
        raise ValueError(f"{path}: unknown consolidated format {doc.get('format')!r} (known: {', '.join(FORMATS)})")
    backbone_dir = path / "backbone"
    config = AutoConfig.from_pretrained(str(backbone_dir), local_files_only=True, trust_remote_code=False)
    backbone_state = load_file(str(backbone_dir / "model.safetensors"))
    items = {item: {k: v for k, v in schema.items() if k not in ("head", "adapter")}
             for item, schema in doc["items"].items()}
    heads = {item: load_file(str(path / schema["head"])) for item, schema in doc["items"].items()}
    scorer = MultiHeadScorer(config, backbone_state, heads, items)
    for item, schema in doc["items"].items():
        if "adapter" in schema:
            scorer.set_correction(item, load_adapter(path / schema["adapter"]))
    scorer = scorer.to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_dir), local_files_only=True, trust_remote_code=False)
    return scorer, tokenizer, doc
