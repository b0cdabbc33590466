"""A synthetic school district for the demo: items in topics, with planted structure.

Nothing here is real student data. Each topic has a pool of rubric concepts (each with several
phrasings) and misconceptions; each item draws three concepts from its topic's pool, so items of one
topic share vocabulary and rubric concepts while items of different topics share almost none — the
structure a good consolidation plan should find. Multi-class items score 0/1/2 by how many of their
concepts a response states (a misconception scores 0); multi-label items mark each concept present.

What a GW plan can see of this: the topics differ only in their words. Every topic has the same
template (five concepts with four phrasings each, the same presence rates and scoring rule), so an
item's responses look the same, up to a relabelling of the content, as an item of another topic with
the same task. GW on each scorer's features over its own responses cannot tell such items apart
(it is blind to isometries). The fine-tuned scorers' geometry follows their labels, so such a plan
groups items by task (multi-class with multi-class, multi-label with multi-label) across topics, not
by topic. The topics do show in the base encoder's features (measured on the default demo).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOPICS: dict[str, dict] = {
    "circuits": {
        "concepts": {
            "closed_path": ["the circuit makes a closed loop", "there is a complete path for the current",
                            "the bulb is in a closed path with the battery", "the loop from the battery is complete"],
            "battery_voltage": ["the battery gives a voltage difference", "the battery pushes the current",
                                "there is a voltage across the battery terminals", "the battery supplies the energy"],
            "switch_open": ["the open switch breaks the path", "an open switch stops the current",
                            "the switch makes a gap in the circuit", "with the switch open no current flows"],
            "series_share": ["bulbs in series share the same current", "in series the current goes through each bulb",
                             "the current is the same in every bulb in series", "series bulbs are on one path"],
            "parallel_branch": ["each bulb has its own branch", "parallel bulbs have separate paths",
                                "a broken bulb in one branch leaves the other path closed",
                                "the branches connect each bulb directly to the battery"],
        },
        "misconceptions": ["the current gets used up by the first bulb", "the battery only pushes from one end",
                           "bulbs light because the wire is hot"],
        "filler": ["wire", "bulb", "terminal", "battery", "current"],
    },
    "plants": {
        "concepts": {
            "sunlight": ["the plant uses energy from sunlight", "light gives the leaf energy",
                         "sunlight powers photosynthesis", "the leaves capture light energy"],
            "carbon_dioxide": ["the plant takes in carbon dioxide from the air", "carbon dioxide enters through the leaves",
                               "leaves absorb carbon dioxide", "the plant needs carbon dioxide gas"],
            "water_roots": ["the roots take up water", "water comes in through the roots",
                            "the plant absorbs water from the soil", "water travels up from the roots"],
            "glucose": ["the plant makes glucose as food", "photosynthesis produces sugar",
                        "the leaf makes its own food as glucose", "sugar is made and stored by the plant"],
            "oxygen": ["oxygen is released as a waste gas", "the plant gives off oxygen",
                       "oxygen leaves through the stomata", "photosynthesis releases oxygen into the air"],
        },
        "misconceptions": ["plants get their food from the soil", "plants breathe in oxygen to make food",
                           "the sun feeds the plant soil"],
        "filler": ["leaf", "plant", "roots", "chlorophyll", "green"],
    },
    "fractions": {
        "concepts": {
            "common_denominator": ["you need a common denominator first", "make the bottom numbers the same",
                                   "rewrite both fractions with the same denominator",
                                   "find a shared denominator before adding"],
            "add_numerators": ["then add the numerators", "add the top numbers only",
                               "the numerators are added together", "you sum the tops and keep the bottom"],
            "simplify": ["simplify the answer at the end", "reduce the fraction to lowest terms",
                         "divide top and bottom by the greatest common factor", "write the result in simplest form"],
            "equivalent": ["multiply top and bottom by the same number", "equivalent fractions have the same value",
                           "scaling numerator and denominator keeps the value", "two fourths equals one half"],
            "compare_size": ["a bigger denominator means smaller pieces", "compare using the same size pieces",
                             "more pieces of the whole means each piece is smaller",
                             "compare the numerators once denominators match"],
        },
        "misconceptions": ["add the denominators together too", "the bigger denominator is the bigger fraction",
                           "just add the tops and the bottoms"],
        "filler": ["fraction", "half", "numerator", "denominator", "pieces"],
    },
}

OPENERS = ["", "i think ", "because ", "well ", "my answer is that ", "it is because ", "so "]
MULTICLASS_LABELS = ["incorrect", "partially_correct", "correct"]
SPLIT_SHARES = (("train", 0.64), ("validation", 0.18), ("test", 0.18))


@dataclass(frozen=True)
class DemoItem:
    item_id: str
    topic: str
    task: str
    concepts: tuple[str, ...]
    question: str

    @property
    def label_names(self) -> list[str]:
        return list(MULTICLASS_LABELS) if self.task == "multiclass" else list(self.concepts)


def demo_items(n_per_topic: Sequence[int] = (3, 3, 2), seed: int = 0) -> list[DemoItem]:
    """Items per topic; the last item of each topic with three or more items is multi-label."""
    rng = np.random.default_rng(seed)
    items = []
    for topic, n in zip(TOPICS, n_per_topic):
        pool = list(TOPICS[topic]["concepts"])
        for j in range(n):
            concepts = tuple(sorted(rng.choice(pool, size=3, replace=False)))
            task = "multilabel" if n >= 3 and j == n - 1 else "multiclass"
            named = ", ".join(c.replace("_", " ") for c in concepts)
            question = f"Explain {topic} question {j + 1}: describe what happens, mentioning {named}."
            items.append(DemoItem(f"{topic}-{j + 1}", topic, task, concepts, question))
    return items


def _response(item: DemoItem, rng: np.random.Generator) -> tuple[str, int, list[int]]:
    topic = TOPICS[item.topic]
    present = [c for c in item.concepts if rng.random() < 0.5]
    if not present and rng.random() < 0.3:
        present = [item.concepts[int(rng.integers(len(item.concepts)))]]
    # Other concepts of the topic appear too: shared vocabulary that carries no credit for this item.
    distractors = [c for c in topic["concepts"] if c not in item.concepts and rng.random() < 0.25]
    misconception = rng.random() < 0.15
    parts = [topic["concepts"][c][int(rng.integers(4))] for c in present + distractors]
    if misconception:
        parts.append(topic["misconceptions"][int(rng.integers(len(topic["misconceptions"])))])
    if not parts:
        parts.append(f"the {topic['filler'][int(rng.integers(5))]} does something")
    rng.shuffle(parts)
    text = OPENERS[int(rng.integers(len(OPENERS)))] + " and ".join(parts)
    multilabel = [int(c in present) for c in item.concepts]
    score = 0 if misconception else min(len(present), 2)
    if rng.random() < 0.04:  # a little rater noise
        score = int(rng.integers(3))
    return text, score, multilabel


def generate_responses(items: Sequence[DemoItem], n_responses: int = 300, seed: int = 0) -> pa.Table:
    rows: dict[str, list] = {k: [] for k in ("item_id", "response_id", "text", "label", "labels", "split")}
    for index, item in enumerate(items):
        rng = np.random.default_rng([seed, index])
        splits = rng.permutation(np.concatenate([[name] * round(share * n_responses) for name, share in SPLIT_SHARES])[:n_responses])
        for r in range(n_responses):
            text, score, multilabel = _response(item, rng)
            rows["item_id"].append(item.item_id)
            rows["response_id"].append(f"{item.item_id}-r{r:04d}")
            rows["text"].append(text)
            rows["label"].append(score if item.task == "multiclass" else None)
            rows["labels"].append(multilabel if item.task == "multilabel" else None)
            rows["split"].append(str(splits[r]) if r < len(splits) else "train")
    return pa.table({
        "item_id": pa.array(rows["item_id"], pa.string()),
        "response_id": pa.array(rows["response_id"], pa.string()),
        "text": pa.array(rows["text"], pa.string()),
        "label": pa.array(rows["label"], pa.int64()),
        "labels": pa.array(rows["labels"], pa.list_(pa.int64())),
        "split": pa.array(rows["split"], pa.string()),
    })


def write_demo_district(out_dir: str | Path, *, n_per_topic: Sequence[int] = (3, 3, 2), n_responses: int = 300,
                        seed: int = 0) -> tuple[Path, Path]:
    """Write `responses.parquet` and `items.jsonl` (the inputs of `fleetmerge fleet build`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = demo_items(n_per_topic, seed)
    pq.write_table(generate_responses(items, n_responses, seed), out / "responses.parquet")
    with open(out / "items.jsonl", "w") as fh:
        for item in items:
            fh.write(json.dumps({"item_id": item.item_id, "module": item.topic, "task": item.task,
                                 "question": item.question, "label_names": item.label_names}) + "\n")
    return out / "responses.parquet", out / "items.jsonl"
