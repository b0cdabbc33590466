"""A synthetic school district for the demo: items in topics, with planted structure.

Nothing here is real student data. Two layouts (`structure`):

- "rules" (what `fleetmerge demo` generates): a fractions unit in three topics, adding, multiplying and
  dividing fractions (3, 3 and 2 items). Every response draws on one pool of seven procedure steps with
  four phrasings each (`STEPS`), so the topics share their words. What tells them apart is the topic's
  rule (`RULES`), which every item of the topic follows (its items differ only in their fractions): the
  steps that earn credit, and the steps of another operation's procedure that are a misconception
  there. The same words thus carry conflicting rules across topics: "add the numerators" earns credit
  when adding and scores "incorrect" when multiplying (and is flagged when dividing); "multiply the
  numerators" earns credit when multiplying and scores "incorrect" when adding; "flip the second
  fraction" is marked when dividing and scores "incorrect" when adding or multiplying. Adding items are
  scored incorrect / partially_correct / correct on two steps, multiplying items incorrect / correct on
  two, dividing items are multi-label (each of its two steps stated, and `uses_another_procedure`).
  Merging two items' encoders should then help when they share a rule and hurt when they do not.
  Measured on the default demo (seed 0, 200 responses, MiniLM-L6 at the demo's 6 epochs; own validation
  macro F1 0.69-0.89) with `bench/demo_pairs.py`: every pair merged by the product's one call,
  `GroupConsolidator.evaluate(pair, {}, MergeConfig())` (TIES defaults, heads refit), and each member's
  change of validation macro F1 against its own scorer:

  | pairs (members) | mean | worst member, mean | pairs with a fall | test, mean | own heads, mean |
  |---|---|---|---|---|---|
  | within a topic: 7 (14) | +0.073 | +0.054 | 1 of 7 (-0.004) | +0.073 | -0.015 |
  | across topics: 21 (42) | -0.027 | -0.083 | 21 of 21 | -0.022 | -0.162 |

  ("worst member": the lower of a pair's two changes; "a fall": a member below 0.)
  The agreement of the merged model's decisions with the member's own scorer on its held-out answers
  does not tell them apart (0.878 within, 0.880 across): the own scorers are weak, and a merge within
  a topic that improves on one disagrees with it too. `gw.plan.solve_plan` on the measured pair
  outcomes (the worst or the mean member's change) groups the three topics exactly. The GW plan does
  not: on the same fleet the GW planner planned adding-1 + dividing-1 + dividing-2, adding-2 +
  adding-3 + multiplying-2 and multiplying-1 + multiplying-3 (mean GW distance 0.243 within a topic,
  0.260 across), and the gate merged the two mixed trios and kept multiplying-1 and -3 on their own
  scorers. GW over each scorer's features of its own responses does not see the rules.
  The measured planner's own-head trial signals do not see them either: with `--trial-signal
  agreement` or `true_label` it plans adding-1 + dividing-1 + dividing-2, adding-2 + adding-3,
  multiplying-1..3, because with the own heads kept a merge within a topic costs its weaker member
  about as much as one across (true-label change, worse member: -0.092 within a topic on average,
  -0.179 across, but adding-1 loses less with the dividing items, -0.083 and -0.088, than with
  adding-3, -0.132). With the default `--trial-signal refit` (heads refitted on the merged backbone,
  cross-fitted, against the same refit on the member's own backbone) the within-topic merges show
  their use (-0.014 within, -0.037 across) and the plan is the three topics exactly (measured
  2026-12-07 on the seed-0 demo fleet; 23 pairs, 7 within a topic).
  The default planner (description) reads the items' questions, each titled by its skill ("Adding
  fractions. Explain how to work out 1/2 + 1/3, step by step."), and packs the three topics exactly. Without
  the titles the questions' fractions outweigh their operation sign in the base model's embedding, and
  it mixes two of the three groups (adding-2 + dividing-2 + multiplying-2, dividing-1 + multiplying-1 +
  multiplying-3): the description planner finds only what the descriptions say, where the measured
  planner finds the topics from trial merges alone.
  This layout replaces the earlier "rubric" one (each topic its own rubric shape, the topics otherwise
  apart in their words), on which the GW plan mixed topics too (circuits-1 + fractions-1 + plants-2).
- "words" (the default, used by the test fixtures and the benchmark trio): each topic has a pool of
  rubric concepts (each with several phrasings) and misconceptions, and each item draws its concepts
  from its topic's pool, so items of one topic share vocabulary and rubric concepts while items of
  different topics share almost none. Every topic has the same template (five concepts with four
  phrasings each, the same presence rates and scoring rule; the last item of each topic with three or
  more items is multi-label, the rest score 0/1/2 by how many of their three concepts a response
  states), so the topics differ only in their words. An item's responses then look the same, up to a
  relabelling of the content, as an item of another topic with the same task. GW on each scorer's
  features over its own responses cannot tell such items apart (it is blind to isometries): the
  fine-tuned scorers' geometry follows their labels, so such a plan groups items by task (multi-class
  with multi-class, multi-label with multi-label) across topics, not by topic. The topics do show in
  the base encoder's features.
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
STRUCTURES = ("words", "rules")

# -- the "rules" layout: fraction operations, one pool of steps, conflicting rules -------------------

STEPS: dict[str, list[str]] = {
    "common_denominator": ["you find a common denominator", "make the bottom numbers the same",
                           "rewrite both fractions with the same denominator", "change them to the same size pieces"],
    "add_numerators": ["add the numerators", "add the top numbers", "put the tops together",
                       "the numerators get added"],
    "keep_denominator": ["keep the denominator the same", "the bottom number stays the same",
                         "leave the denominator alone", "the denominator does not change"],
    "multiply_numerators": ["multiply the numerators", "multiply the top numbers", "times the tops together",
                            "the numerators get multiplied"],
    "multiply_denominators": ["multiply the denominators", "multiply the bottom numbers", "times the bottoms together",
                              "the denominators get multiplied"],
    "flip_divisor": ["flip the second fraction", "use the reciprocal of the second fraction",
                     "turn the second fraction upside down", "invert the fraction you divide by"],
    "change_to_multiply": ["change the division to a multiplication", "multiply instead of dividing",
                           "turn the divide sign into a times sign", "do a times instead of the divide"],
}
FILLER = ["you just work it out", "i am not sure", "you do the sum", "it is about fractions"]


@dataclass(frozen=True)
class Rule:
    """What decides a topic's labels in the "rules" layout; every item of the topic follows it.

    credit: the steps that earn credit; misconceptions: steps of another operation's procedure that are
    wrong here (a response that states one is scored lowest, or flagged); every other step is neutral.
    task and scale: "multiclass" with the score names, lowest first (full credit states every credited
    step), or "multilabel" with one label a credited step plus `flag` (a misconception stated).
    presence: how often a response states each credited step; slip: how often it states a misconception.
    """

    operation: str
    credit: tuple[str, ...]
    misconceptions: tuple[str, ...]
    task: str
    scale: tuple[str, ...] = ()
    flag: str = ""
    presence: float = 0.6
    slip: float = 0.2


RULES: dict[str, Rule] = {
    "adding": Rule("+", ("common_denominator", "add_numerators"), ("multiply_numerators", "flip_divisor",
                   "change_to_multiply"), "multiclass", tuple(MULTICLASS_LABELS)),
    "multiplying": Rule("x", ("multiply_numerators", "multiply_denominators"),
                        ("add_numerators", "keep_denominator", "flip_divisor"), "multiclass",
                        ("incorrect", "correct"), presence=0.7),
    "dividing": Rule("divided by", ("flip_divisor", "change_to_multiply"), ("add_numerators", "keep_denominator"),
                     "multilabel", flag="uses_another_procedure", presence=0.55),
}
EXAMPLES: dict[str, list[str]] = {  # the fractions of each item's question, one per item
    "adding": ["1/2 and 1/3", "2/5 and 1/4", "3/4 and 1/6"],
    "multiplying": ["2/3 and 3/4", "1/2 and 4/5", "3/5 and 1/3"],
    "dividing": ["3/4 and 1/2", "2/3 and 4/5"],
}


@dataclass(frozen=True)
class DemoItem:
    item_id: str
    topic: str
    task: str
    concepts: tuple[str, ...]
    question: str
    rule: Rule | None = None  # the topic's rule ("rules" layout); None: the "words" template
    example: str = ""

    @property
    def label_names(self) -> list[str]:
        if self.rule is not None:
            return list(self.rule.credit) + [self.rule.flag] if self.task == "multilabel" else list(self.rule.scale)
        if self.task == "multilabel":
            return list(self.concepts)
        return list(MULTICLASS_LABELS)


def _check_structure(structure: str) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {list(STRUCTURES)}, got {structure!r}")


def demo_items(n_per_topic: Sequence[int] = (3, 3, 2), seed: int = 0, *, structure: str = "words") -> list[DemoItem]:
    """Items per topic. "words": the last item of each topic with three or more items is multi-label;
    "rules": every item of a topic follows the topic's rule (`RULES`), with its own fractions."""
    _check_structure(structure)
    if structure == "rules":
        if len(n_per_topic) > len(RULES) or any(n > len(EXAMPLES[t]) for t, n in zip(RULES, n_per_topic)):
            raise ValueError(f"the rules layout has at most {[len(EXAMPLES[t]) for t in RULES]} items per topic")
        items = []
        for topic, n in zip(RULES, n_per_topic):
            rule = RULES[topic]
            for j, example in enumerate(EXAMPLES[topic][:n]):
                # titled by its skill, as an item bank titles an item: the description planner reads it
                question = (f"{topic.capitalize()} fractions. Explain how to work out "
                            f"{example.replace(' and ', f' {rule.operation} ')}, step by step.")
                items.append(DemoItem(f"{topic}-{j + 1}", topic, rule.task, rule.credit, question, rule, example))
        return items
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


def rule_score(rule: Rule, steps: Sequence[str]) -> tuple[int, list[int]]:
    """The labels `rule` gives a response that states `steps`: (multi-class score, multi-label vector)."""
    stated = set(steps)
    wrong = bool(stated & set(rule.misconceptions))
    credited = sum(c in stated for c in rule.credit)
    vector = [int(c in stated) for c in rule.credit] + ([int(wrong)] if rule.flag else [])
    if not rule.scale:
        return 0, vector
    top = len(rule.scale) - 1
    score = 0 if wrong else max(0, top - (len(rule.credit) - credited))
    return score, vector


def _rules_response(item: DemoItem, rng: np.random.Generator) -> tuple[str, int, list[int]]:
    """A response to an item of the "rules" layout: the rule's credited steps at its presence rate,
    now and then a neutral step, sometimes a step of another operation (a misconception here)."""
    rule = item.rule
    steps = [c for c in rule.credit if rng.random() < rule.presence]
    neutral = [s for s in STEPS if s not in rule.credit and s not in rule.misconceptions]
    steps += [s for s in neutral if rng.random() < 0.15]
    if rng.random() < rule.slip:
        steps.append(rule.misconceptions[int(rng.integers(len(rule.misconceptions)))])
    parts = [STEPS[s][int(rng.integers(4))] for s in steps] or [FILLER[int(rng.integers(len(FILLER)))]]
    rng.shuffle(parts)
    lead = f"for {item.example} " if rng.random() < 0.3 else ""
    text = OPENERS[int(rng.integers(len(OPENERS)))] + lead + " and ".join(parts)
    score, vector = rule_score(rule, steps)
    if rule.scale and rng.random() < 0.03:  # a little rater noise
        score = int(rng.integers(len(rule.scale)))
    return text, score, vector


def _response(item: DemoItem, rng: np.random.Generator) -> tuple[str, int, list[int]]:
    if item.rule is not None:
        return _rules_response(item, rng)
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
    is the layout ("words" or "rules", see the module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = demo_items(n_per_topic, seed, structure=structure)
    pq.write_table(generate_responses(items, n_responses, seed), out / "responses.parquet")
    with open(out / "items.jsonl", "w") as fh:
        for item in items:
            fh.write(json.dumps({"item_id": item.item_id, "module": item.topic, "task": item.task,
                                 "question": item.question, "label_names": item.label_names}) + "\n")
    return out / "responses.parquet", out / "items.jsonl"
