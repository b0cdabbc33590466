"""Scorer I/O: safe loading, backbone/head split, the multi-head scorer and its consolidated format."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModel

from workers.finetune import predict_logits
from workers.multihead import MultiHeadScorer, load_consolidated, save_consolidated
from workers.scorer_io import ScorerLoadError, load_backbone_state, load_scorer, split_model

TEXTS = ["the circuit makes a closed loop", "plants take in carbon dioxide", "no idea", "the switch is open " * 5]


@pytest.fixture(scope="module")
def two_scorers(tiny_fleet_dir):
    return {item: load_scorer(tiny_fleet_dir / "scorers" / item) for item in ("circuits-1", "circuits-3")}


def _multihead(scorers, backbone_from="circuits-1"):
    backbone, _ = split_model(scorers[backbone_from].model)
    heads = {item: split_model(s.model)[1] for item, s in scorers.items()}
    items = {item: {"task": "multiclass", "labels": list(s.model.config.id2label.values())} for item, s in scorers.items()}
    return MultiHeadScorer(scorers[backbone_from].model.config, backbone, heads, items)


def test_split_names_backbone_like_the_base(two_scorers, tiny_base):
    backbone, head = split_model(two_scorers["circuits-1"].model)
    base = load_backbone_state(tiny_base)
    assert set(backbone) == set(base)
    assert set(head) == {"pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert set(load_backbone_state(two_scorers["circuits-1"].path)) == set(base)


def test_multihead_reproduces_each_scorer(two_scorers):
    model = _multihead(two_scorers)
    scorer = two_scorers["circuits-1"]
    batch = scorer.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = scorer.model(**batch).logits
        got = torch.stack(model(batch, ["circuits-1"] * len(TEXTS)))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_per_item(two_scorers):
    model = _multihead(two_scorers)
    tok = two_scorers["circuits-1"].tokenizer
    items = ["circuits-1", "circuits-3", "circuits-3", "circuits-1"]
    with torch.inference_mode():
        mixed = model(tok(TEXTS, padding=True, return_tensors="pt"), items)
        for i, (text, item) in enumerate(zip(TEXTS, items)):
            alone = model(tok([text], return_tensors="pt"), [item])[0]
            torch.testing.assert_close(mixed[i], alone, atol=1e-5, rtol=1e-5)


def test_consolidated_round_trip(tmp_path, two_scorers):
    model = _multihead(two_scorers)
    tok = two_scorers["circuits-1"].tokenizer
    save_consolidated(tmp_path / "c", model, tok, meta={"group": ["circuits-1", "circuits-3"], "method": "none"})
    loaded, loaded_tok, doc = load_consolidated(tmp_path / "c")
    assert doc["group"] == ["circuits-1", "circuits-3"] and set(doc["items"]) == {"circuits-1", "circuits-3"}
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        for item in ("circuits-1", "circuits-3"):
            torch.testing.assert_close(torch.stack(loaded(batch, [item] * 4)), torch.stack(model(batch, [item] * 4)),
                                       atol=0, rtol=0)
    # The backbone directory is a plain Hugging Face encoder.
    plain = AutoModel.from_pretrained(str(tmp_path / "c" / "backbone"), local_files_only=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(plain(**batch).last_hidden_state, model.backbone(**batch).last_hidden_state,
                                   atol=1e-6, rtol=1e-6)


def test_predictions_survive_a_save_and_load_of_the_scorer(tmp_path, two_scorers):
    scorer = two_scorers["circuits-3"]
    scorer.model.save_pretrained(str(tmp_path / "s"), safe_serialization=True)
    scorer.tokenizer.save_pretrained(str(tmp_path / "s"))
    again = load_scorer(tmp_path / "s")
    assert (predict_logits(again.model, again.tokenizer, TEXTS) == predict_logits(scorer.model, scorer.tokenizer, TEXTS)).all()


def test_pickled_only_directory_is_refused(tmp_path, tiny_fleet_dir):
    target = tmp_path / "pickled"
    shutil.copytree(tiny_fleet_dir / "scorers" / "circuits-1", target)
    (target / "model.safetensors").rename(target / "pytorch_model.bin")
    with pytest.raises(ScorerLoadError, match="only safetensors"):
        load_scorer(target)


def test_head_count_mismatch_is_refused(two_scorers):
    scorers = two_scorers
    backbone, head = split_model(scorers["circuits-1"].model)
    with pytest.raises(ValueError, match="head has 3 outputs but 2 labels"):
        MultiHeadScorer(scorers["circuits-1"].model.config, backbone, {"x": head},
                        {"x": {"task": "multiclass", "labels": ["a", "b"]}})


def test_a_saved_checkpoint_loads_cleanly_in_transformers_as_its_model_card_says(tmp_path, two_scorers):
    import json
    import re

    from transformers import AutoConfig, AutoTokenizer

    model = _multihead(two_scorers)
    tok = two_scorers["circuits-1"].tokenizer
    meta = {"group": ["circuits-1", "circuits-3"], "merge": {"method": "ties"}, "params": {"lam": 1.0, "top_k": 0.2},
            "validation": {"circuits-1": {"macro_f1": 0.5}}, "test": {"circuits-1": {"macro_f1": 0.4}}}
    out = save_consolidated(tmp_path / "c", model, tok, meta=meta)
    # No missing or unexpected weights, and a config that names no item.
    encoder, info = AutoModel.from_pretrained(str(out / "backbone"), add_pooling_layer=False, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    config = AutoConfig.from_pretrained(str(out / "backbone"))
    assert config.architectures == ["BertModel"] and config.problem_type is None
    assert set(config.id2label.values()) == {"LABEL_0", "LABEL_1"}
    assert model.backbone.config.id2label == two_scorers["circuits-1"].model.config.id2label  # the model is untouched
    # truncation=True caps a long text at the encoder's positions.
    saved_tok = AutoTokenizer.from_pretrained(str(out / "backbone"))
    assert saved_tok.model_max_length <= config.max_position_embeddings
    assert saved_tok(["word " * 1000], truncation=True)["input_ids"][0].__len__() <= config.max_position_embeddings
    # The model card's plain-transformers code gives the consolidated scorer's logits.
    card = (out / "README.md").read_text()
    assert "circuits-3" in card and "ties" in card and json.loads((out / "consolidated.json").read_text())["items"]
    snippet = re.findall(r"```python\n(.*?)```", card, re.S)[-1].replace('path = "."', f'path = "{out}"')
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - our own generated card
    batch = tok(["an answer to score"], padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        expected = model(batch, ["circuits-1"])[0]
    torch.testing.assert_close(scope["logits"][0], expected, atol=1e-5, rtol=1e-5)
    assert scope["probs"].shape[-1] == len(model.items["circuits-1"]["labels"])
