"""Per-item corrections: per-row LoRA in one mixed-batch pass, the PEFT adapter format, the consolidation
with corrections, publish (storage counts the adapters), fleetmerge predict against peft + transformers."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from flows.cli import main
from infra.manifest import load_manifest
from infra.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from infra.publish import read_manifest, run_prefix, verify_run
from infra.storage import open_store
from gw.mergeability import agreement
from workers.consolidate import CORRECTION_TOLERANCE, GroupConsolidator, MergeConfig
from workers.correction import linear_modules, load_adapter, save_adapter
from workers.multihead import FORMAT, FORMAT_CORRECTED, MultiHeadScorer, load_consolidated
from workers.publish_fleet import publish_consolidated, save_checkpoint, weights_bytes_before
from workers.serving import ConsolidatedFleet

PAIR = ("circuits-1", "circuits-2")
TEXTS = ["the switch is open", "the battery pushes current round the loop", "no current flows", "the bulb"]


def _random_factors(encoder, rank, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in linear_modules(encoder):
        layer = encoder.get_submodule(name)
        out[name] = (torch.randn(rank, layer.in_features, generator=g) * scale,
                     torch.randn(layer.out_features, rank, generator=g) * scale)
    return out


@pytest.fixture(scope="module")
def three_items(tiny_base):
    """A tiny encoder shared by three items with random heads; a and b corrected (ranks 2 and 5), c not."""
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(tiny_base)
    backbone = {k: v for k, v in load_file(str(tiny_base / "model.safetensors")).items() if not k.startswith("pooler")}
    g = torch.Generator().manual_seed(1)
    heads = {i: {"pooler.dense.weight": torch.randn(32, 32, generator=g), "pooler.dense.bias": torch.zeros(32),
                 "classifier.weight": torch.randn(3, 32, generator=g), "classifier.bias": torch.zeros(3)}
             for i in "abc"}
    items = {i: {"task": "multiclass", "labels": ["x", "y", "z"]} for i in "abc"}
    model = MultiHeadScorer(config, backbone, heads, items, strict=False)
    factors = {"a": _random_factors(model.backbone, 2, seed=2), "b": _random_factors(model.backbone, 5, seed=3)}
    for item, f in factors.items():
        model.set_correction(item, f)
    return model, config, backbone, heads, items, factors


def _folded(config, backbone, heads, items, item, factors):
    """`item` alone on an encoder whose weights have its correction folded in: W + B A."""
    state = dict(backbone)
    for module, (a, b) in (factors or {}).items():
        state[f"{module}.weight"] = state[f"{module}.weight"] + b @ a
    return MultiHeadScorer(config, state, {item: heads[item]}, {item: items[item]}, strict=False)


def test_mixed_batch_with_corrections_equals_per_item_passes(three_items, tiny_base):
    from transformers import AutoTokenizer

    model, config, backbone, heads, items, factors = three_items
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    rows = ["a", "c", "b", "a", "b"]
    texts = TEXTS + ["leaves take in light"]
    batch = tokenizer(texts[:len(rows)], padding=True, return_tensors="pt")
    with torch.inference_mode():
        mixed = torch.stack(model(batch, rows))
        for n, item in enumerate(rows):
            alone = _folded(config, backbone, heads, items, item, factors.get(item))
            one = {k: v[n:n + 1] for k, v in batch.items()}
            torch.testing.assert_close(mixed[n], alone(one, [item])[0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(mixed[0], model.heads["a"](model.encode(batch)[:1])[0], atol=1e-3)  # it does correct
    assert model.corrections.rank("b") == 5 and model.corrections.items == ["a", "b"]
    # Removing a correction gives the item the shared encoder back.
    model.set_correction("b", None)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(torch.stack(model(batch, ["b"] * len(rows))),
                                       model.heads["b"](model.encode(batch)))
    finally:
        model.set_correction("b", factors["b"])


def test_adapter_files_round_trip_and_refuse_what_they_cannot_apply(three_items, tmp_path):
    model, *_ = three_items
    factors = model.correction("a")
    save_adapter(tmp_path / "a", {**factors, "encoder.layer.0.output.dense": (
        factors["encoder.layer.0.output.dense"][0][:1], factors["encoder.layer.0.output.dense"][1][:, :1])}, "a")
    doc = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert doc["r"] == doc["lora_alpha"] == 2 and doc["peft_type"] == "LORA"
    assert set(doc["target_modules"]) == set(linear_modules(model.backbone))
    back = load_adapter(tmp_path / "a")
    a, b = back["encoder.layer.0.output.dense"]  # the rank-1 module is zero-padded to r = 2
    assert a.shape[0] == 2 and torch.count_nonzero(a[1]) == 0 and torch.count_nonzero(b[:, 1]) == 0
    torch.testing.assert_close(back["encoder.layer.1.attention.self.query"], factors["encoder.layer.1.attention.self.query"])
    doc["lora_alpha"] = 4
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="scaling 1"):
        load_adapter(tmp_path / "a")
    with pytest.raises(ValueError, match="no readable adapter_config.json"):
        load_adapter(tmp_path / "missing")
    with pytest.raises(ValueError, match="no linear layer"):
        model.set_correction("c", {"encoder.nope": factors["encoder.layer.0.output.dense"]})


@pytest.fixture(scope="module")
def consolidator(tiny_fleet_dir):
    store = open_store(str(tiny_fleet_dir))
    return GroupConsolidator(store, load_manifest(store), device="cpu")


def test_evaluation_scores_the_corrected_items(consolidator):
    specs = [consolidator.manifest.scorer(i) for i in PAIR]
    config = MergeConfig(method="ties", item_correction=True, correction_ranks=(0, 4, 16))
    evaluation, model = consolidator.evaluate(specs, {}, config)
    plain, plain_model = consolidator.evaluate(specs, {}, MergeConfig(method="ties"))
    for item in PAIR:
        record = evaluation["correction"][item]
        assert record["rank"] in (0, 4, 16) and set(record["agreement"]) == {"0", "4", "16"}
        # the smallest rank within the tolerance of the best agreement with the item's own scorer
        table = {int(r): v for r, v in record["agreement"].items()}
        assert record["rank"] == min(r for r, v in table.items() if v >= max(table.values()) - CORRECTION_TOLERANCE)
        # agreement is with the item's own scorer on its train and validation answers, own head
        member = consolidator.member(consolidator.manifest.scorer(item))
        texts = member.texts["train"] + member.texts["validation"]
        own_model, merged = consolidator.individual(consolidator.manifest.scorer(item)), plain_model
        reference = consolidator.probabilities(own_model, item, consolidator.features(own_model, texts, item))
        merged.heads[item].load_head_state(member.head)
        rank0 = consolidator.probabilities(merged, item, consolidator.features(merged, texts, item))
        task = consolidator.manifest.scorer(item).task
        assert table[0] == pytest.approx(agreement(reference, rank0, task), abs=1e-5)
        assert table[16] >= table[0] - 1e-6  # the residual at rank 16 brings the item back toward its own scorer
        assert (model.corrections.rank(item) if model.corrections else 0) == record["rank"]
        # What the gate sees is the corrected model's validation probabilities (refit head).
        member = consolidator.member(consolidator.manifest.scorer(item))
        probs = consolidator.probabilities(model, item, consolidator.features(model, member.texts["validation"], item))
        np.testing.assert_allclose(probs, evaluation["scores"]["refit_heads"][item]["validation_probs"], atol=1e-5)
    assert MergeConfig(item_correction=True).to_dict() != MergeConfig().to_dict()
    assert "item_correction" not in MergeConfig().to_dict()  # keys made before the option existed stay valid
    with pytest.raises(ValueError, match="correction_ranks"):
        MergeConfig(correction_ranks=(-1,))


def test_corrected_checkpoint_publishes_and_loads_with_peft_and_transformers(consolidator, tmp_path, capsys):
    specs = [consolidator.manifest.scorer(i) for i in PAIR]
    # A fixed rank, so that both items carry an adapter whatever validation would choose.
    config = MergeConfig(method="ties", item_correction=True, correction_ranks=(4,))
    evaluation, merged = consolidator.evaluate(specs, {}, config)
    store = open_store(str(tmp_path / "out"))
    prefix = save_checkpoint(store, "candidates/g1", merged, consolidator.tokenizer,
                             {"group": list(PAIR), "correction": evaluation["correction"]})
    sources = {"groups/g1": prefix}
    before = weights_bytes_before(consolidator.store, consolidator.manifest, list(PAIR))
    publish_consolidated(store, "run-1", sources, bytes_before=before)
    assert verify_run(store, "run-1") == []
    manifest = read_manifest(store, "run-1")
    storage = manifest["extra"]["storage"]
    adapter_files = [store.size(k) for k in store.list(prefix) if k.endswith(ADAPTER_WEIGHTS)]
    assert len(adapter_files) == 2 and storage["n_adapters"] == 2
    assert storage["adapter_bytes"] == sum(adapter_files) > 0
    assert storage["bytes_after"] == storage["backbone_bytes"] + storage["head_bytes"] + storage["adapter_bytes"]
    assert manifest["routing"][PAIR[0]]["adapter"] == f"groups/g1/adapters/{PAIR[0]}"

    root = store.uri_for(run_prefix(store, "run-1")) + "/groups/g1"
    doc = json.loads(open(f"{root}/consolidated.json").read())
    assert doc["format"] == FORMAT_CORRECTED and doc["items"][PAIR[1]]["adapter"] == f"adapters/{PAIR[1]}"
    loaded, _, _ = load_consolidated(root)
    assert loaded.corrections.rank(PAIR[0]) == 4

    with ConsolidatedFleet(store, device="cpu") as served:
        ours = {item: np.array([p.scores for p in served.predict(item, TEXTS)]) for item in PAIR}
        mixed = served.predict_mixed([(PAIR[i % 2], t) for i, t in enumerate(TEXTS)])
    for i, got in enumerate(mixed):
        np.testing.assert_allclose(got.scores, ours[PAIR[i % 2]][i], atol=1e-5)
    # The served run gives what the consolidation scored for the corrected item.
    member = consolidator.member(specs[0])
    val = np.array([p.scores for p in ConsolidatedFleet(store, device="cpu").predict(PAIR[0], member.texts["validation"])])
    np.testing.assert_allclose(val, evaluation["scores"]["refit_heads"][PAIR[0]]["validation_probs"], atol=1e-5)

    # The model card's transformers + peft snippet, run as a user would, gives the same probabilities.
    card = open(f"{root}/README.md").read()
    snippet = re.search(r"With plain transformers and peft[^\n]*for `([^`]+)`:\n\n```python\n(.*?)```", card, re.S)
    assert snippet, "the model card shows no peft loading snippet"
    item, code = snippet.group(1), snippet.group(2)
    assert item == PAIR[0] and f"adapters/{item}" in code
    scope: dict = {}
    exec(code.replace('path = "."', f"path = {root!r}").replace('["an answer to score"]', repr(TEXTS)), scope)
    np.testing.assert_allclose(scope["probs"].numpy(), ours[item], atol=1e-5)

    assert main(["predict", "--published", str(tmp_path / "out"), "--item", PAIR[0], "--json", TEXTS[0]]) == 0
    row = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(list(row["scores"].values()), ours[PAIR[0]][0], atol=1e-4)


def test_uncorrected_checkpoints_keep_format_1(consolidator, tmp_path):
    specs = [consolidator.manifest.scorer(i) for i in PAIR]
    _, merged = consolidator.evaluate(specs, {}, MergeConfig(method="ties", grid=[{}]))
    store = open_store(str(tmp_path))
    prefix = save_checkpoint(store, "c", merged, consolidator.tokenizer)
    assert store.read_json(f"{prefix}/consolidated.json")["format"] == FORMAT
    assert not any("/adapters/" in k for k in store.list(prefix))
