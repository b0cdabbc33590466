"""The model card (README.md) of a consolidated checkpoint: what it is and how to load it with transformers."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_BERT_SNIPPET = '''```python
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

path = "."  # this directory
tokenizer = AutoTokenizer.from_pretrained(f"{{path}}/backbone")
# The pooler is part of each item's head, so the shared encoder has none.
encoder = AutoModel.from_pretrained(f"{{path}}/backbone", add_pooling_layer=False).eval()
{adapter}head = load_file(f"{{path}}/heads/{item}.safetensors")

batch = tokenizer(["an answer to score"], padding=True, truncation=True, return_tensors="pt")
with torch.no_grad():
    first = encoder(**batch).last_hidden_state[:, 0]
    pooled = torch.tanh(first @ head["pooler.dense.weight"].T + head["pooler.dense.bias"])
    logits = pooled @ head["classifier.weight"].T + head["classifier.bias"]
{activation}
```'''
# The item's correction is a PEFT LoRA adapter (scaling 1) on the shared encoder's linear layers.
_ADAPTER = ('from peft import PeftModel  # pip install peft\n'
            'encoder = PeftModel.from_pretrained(encoder, f"{{path}}/{adapter}").eval()\n')
_ACTIVATION = {"multiclass": "probs = logits.softmax(-1)  # columns: the item's labels, in the order above",
               "multilabel": "probs = logits.sigmoid()  # one probability per label, in the order above"}


def _figure(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "–"


def model_card(items: Mapping[str, Mapping], meta: Mapping[str, Any], head_keys: Mapping[str, set[str]]) -> str:
    """Markdown for a checkpoint with these items (schemas, with their `adapter` directory if corrected), the
    caller's record (group, merge, params, gate, validation and test figures, correction) and each head's
    tensor names (which loading snippet applies)."""
    merge = meta.get("merge")
    names = ", ".join(f"`{i}`" for i in items)
    lines = ["---", "library_name: transformers", "tags: [fleetmerge, model-merging, text-classification]", "---", "",
             f"# fleetmerge consolidated scorer: {names}", ""]
    if merge:
        lines += [f"One encoder shared by {len(items)} assessment items, merged by fleetmerge with "
                  f"**{merge.get('method', '?')}** (parameters: `{meta.get('params') or merge.get('params') or {}}`), "
                  "and one small head per item. A scoring request names its item: one encoder pass, then that "
                  "item's head.", ""]
    else:
        lines += ["One item's own fine-tuned encoder, kept as it was (the gate or the plan did not merge it), "
                  "stored as backbone + head like every consolidated checkpoint.", ""]
    lines += ["## Items", "", "| item | task | labels | validation macro F1 | test macro F1 |", "|---|---|---|---|---|"]
    for item, schema in items.items():
        val = (meta.get("validation") or {}).get(item, {}).get("macro_f1")
        test = (meta.get("test") or {}).get(item, {}).get("macro_f1")
        lines.append(f"| {item} | {schema['task']} | {', '.join(schema['labels'])} | {_figure(val)} "
                     f"| {_figure(test)} |")
    gate = meta.get("gate")
    if gate:
        lines += ["", "## The accuracy gate", "", f"Rule `{gate.get('rule', '?')}`: {gate.get('reason', '')}", ""]
        checks = (gate.get("attempts") or [{}])[-1].get("checks", [])
        if checks:
            lines += ["| member | validation answers | macro F1 own → merged | passed | why |",
                      "|---|---|---|---|---|"]
            lines += [f"| {c['member']} | {c['n']} | {_figure(c['macro_f1_own'])} → {_figure(c['macro_f1_merged'])} "
                      f"| {'yes' if c['passed'] else 'no'} | {c['reason']} |" for c in checks]
    # The snippets show a corrected item when there is one: its loading has the extra step.
    first = next((i for i, schema in items.items() if schema.get("adapter")), next(iter(items)))
    lines += ["", "## Load it", "", "With fleetmerge (every item, mixed batches):", "", "```python",
              "from workers.multihead import load_consolidated",
              "model, tokenizer, doc = load_consolidated(\".\")", f"logits = model(tokenizer([\"an answer\"], "
              f"return_tensors=\"pt\"), [\"{first}\"])", "```", ""]
    if {"pooler.dense.weight", "classifier.weight"} <= head_keys.get(first, set()):
        adapter = items[first].get("adapter")
        how = " and peft (the item's correction)" if adapter else ""
        lines += [f"With plain transformers{how}, for `{first}`:", "",
                  _BERT_SNIPPET.format(item=first, activation=_ACTIVATION[items[first]["task"]],
                                       adapter=_ADAPTER.format(adapter=adapter) if adapter else ""), ""]
    lines += ["Files: `backbone/` (a plain Hugging Face encoder: config, safetensors weights, tokenizer), "
              "`heads/<item>.safetensors`, `consolidated.json` (the items, their label schemas and this record)."]
    corrected = {i: s["adapter"] for i, s in items.items() if s.get("adapter")}
    if corrected:
        chosen = meta.get("correction") or {}
        lines += ["", "## Per-item corrections", "",
                  "Items listed here keep a low-rank residual of their own encoder against the shared one: a PEFT "
                  "LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`, lora_alpha = r so the scaling "
                  "is 1) on the encoder's linear layers. Load it on the backbone with "
                  "`PeftModel.from_pretrained(encoder, \"<adapter dir>\")` before that item's head; fleetmerge "
                  "applies every row's adapter inside one encoder pass.", "",
                  "| item | adapter | rank | residual energy kept |", "|---|---|---|---|"]
        lines += [f"| {i} | `{d}/` | {(chosen.get(i) or {}).get('rank', '–')} "
                  f"| {_figure((chosen.get(i) or {}).get('energy_kept'))} |" for i, d in corrected.items()]
    lines.append("")
    return "\n".join(lines)
