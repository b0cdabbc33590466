"""A synthetic school district for the demo: items in topics, with planted structure.

Nothing here is real student data. Each topic has a pool of rubric concepts (each with several
phrasings) and misconceptions; each item draws its concepts from its topic's pool, so items of one
topic share vocabulary and rubric concepts while items of different topics share almost none.

Two layouts (`structure`):

- "rubric" (what `fleetmerge demo` generates): each topic also has its own rubric shape, as the items
  of one assessment module often do. circuits items are scored 0/1/2 on three concepts (full credit
  states all three, each missing one costs a level, a misconception scores 0), plants items mark each
  of three concepts present (multi-label), fractions items are scored incorrect/correct on two
  concepts (correct states both, without a misconception). The topics then differ in the geometry of
  their responses and of their scorers' features (how many label clusters, of what sizes), not only
  in their words, which gives a plan over each scorer's own features something to find. Measured on
  the default demo (seed 0, 200 responses): the GW plan still mixes topics (it grouped
  circuits-1 + fractions-1 + plants-2), so GW over these features does not recover the rubric shape
  either; the planner issue takes that up.
- "words" (the default, used by the test fixtures and the benchmark trio): every topic has the same
  template (five concepts with four phrasings each, the same presence rates and scoring rule; the last
  item of each topic with three or more items is multi-label, the rest score 0/1/2 by how many of
  their three concepts a response states), so the topics differ only in their words. An item's
  responses then look the same, up to a relabelling of the content, as an item of another topic with
  the same task. GW on each scorer's features over its own responses cannot tell such items apart (it
  is blind to isometries): the fine-tuned scorers' geometry follows their labels, so such a plan
  groups items by task (multi-class with multi-class, multi-label with multi-label) across topics,
  not by topic. The topics do show in the base encoder's features.
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
STRUCTURES = ("words", "rubric")


@dataclass(frozen=True)
class Rubric:
    """A topic's rubric shape in the "rubric" layout.

    task: "multiclass" (a score scale) or "multilabel" (each concept marked present).
    n_concepts: concepts per item; presence: how often a response states each of them.
    scale: the multi-class scores, lowest first: full credit states every concept, each missing one
        costs a level, a misconception scores the lowest.
    """

    task: str
    n_concepts: int
    presence: float
    scale: tuple[str, ...] = ()


RUBRICS: dict[str, Rubric] = {
    "circuits": Rubric("multiclass", 3, 0.65, tuple(MULTICLASS_LABELS)),
    "plants": Rubric("multilabel", 3, 0.5),
    "fractions": Rubric("multiclass", 2, 0.65, ("incorrect", "correct")),
}


@dataclass(frozen=True)
class DemoItem:
    item_id: str
    topic: str
    task: str
    concepts: tuple[str, ...]
    question: str
    rubric: Rubric | None = None  # the topic's rubric shape ("rubric" layout); None: the "words" template

    @property
    def label_names(self) -> list[str]:
        if self.task == "multilabel":
            return list(self.concepts)
        return list(self.rubric.scale) if self.rubric else list(MULTICLASS_LABELS)


def _check_structure(structure: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {list(STRUCTURES)}, got {structure!r}")


def demo_items(n_per_topic: Sequence[int] = (3, 3, 2), seed: int = 0, *, structure: str = "words") -> list[DemoItem]:
    """Items per topic. "words": the last item of each topic with three or more items is multi-label;
    "rubric": every item of a topic has the topic's rubric shape (`RUBRICS`)."""
    _check_structure(structure)
    rng = np.random.default_rng(seed)
    items = []
    for topic, n in zip(TOPICS, n_per_topic):
        pool = list(TOPICS[topic]["concepts"])
        rubric = RUBRICS[topic] if structure == "rubric" else None
        for j in range(n):
            if rubric is not None:
                drawn = {it.concepts for it in items if it.topic == topic}
                concepts = ()
                while not concepts or concepts in drawn:  # items of a topic ask about different concept sets
                    concepts = tuple(sorted(str(c) for c in rng.choice(pool, size=rubric.n_concepts, replace=False)))
                named = ", ".join(c.replace("_", " ") for c in concepts)
                question = f"Explain {topic} question {j + 1}: describe what happens, mentioning {named}."
                items.append(DemoItem(f"{topic}-{j + 1}", topic, rubric.task, concepts, question, rubric))
                continue
            concepts = tuple(sorted(rng.choice(pool, size=3, replace=False)))
            task = "multilabel" if n >= 3 and j == n - 1 else "multiclass"
            named = ", ".join(c.replace("_", " ") for c in concepts)
            question = f"Explain {topic} question {j + 1}: describe what happens, mentioning {named}."
            items.append(DemoItem(f"{topic}-{j + 1}", topic, task, concepts, question))
    return items


def _rubric_response(item: DemoItem, rng: np.random.Generator) -> tuple[str, int, list[int]]:
    """A response to an item of the "rubric" layout: its concepts at the rubric's presence rate, other
    concepts of the topic as distractors (shared vocabulary, no credit), sometimes a misconception."""
    topic, rubric = TOPICS[item.topic], item.rubric
    present = [c for c in item.concepts if rng.random() < rubric.presence]
    distractors = [c for c in topic["concepts"] if c not in item.concepts and rng.random() < 0.25]
    misconception = rng.random() < 0.15
    parts = [topic["concepts"][c][int(rng.integers(4))] for c in present + distractors]
    if misconception:
        parts.append(topic["misconceptions"][int(rng.integers(len(topic["misconceptions"])))])
    if not parts:
        parts.append(f"the {topic['filler'][int(rng.integers(5))]} does something")
    rng.shuffle(parts)
    text = OPENERS[int(rng.integers(len(OPENERS)))] + " and ".join(parts)
    top = max(len(rubric.scale) - 1, 0)
    score = 0 if misconception else max(0, top - (len(item.concepts) - len(present)))
    if rubric.scale and rng.random() < 0.03:  # a little rater noise
        score = int(rng.integers(len(rubric.scale)))
    return text, score, [int(c in present) for c in item.concepts]


def _response(item: DemoItem, rng: np.random.Generator) -> tuple[str, int, list[int]]:
    if item.rubric is not None:
        return _rubric_response(item, rng)
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
                        seed: int = 0, structure: str = "words") -> tuple[Path, Path]:
    """Write `responses.parquet` and `items.jsonl` (the inputs of `fleetmerge fleet build`); `structure`
    is the layout ("words" or "rubric", see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = demo_items(n_per_topic, seed, structure=structure)
    pq.write_table(generate_responses(items, n_responses, seed), out / "responses.parquet")
    with open(out / "items.jsonl", "w") as fh:
        for item in items:
            fh.write(json.dumps({"item_id": item.item_id, "module": item.topic, "task": item.task,
                                 "question": item.question, "label_names": item.label_names}) + "\n")
    return out / "responses.parquet", out / "items.jsonl"
