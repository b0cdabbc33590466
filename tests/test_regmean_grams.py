"""RegMean in the product: each member's Grams from its own training answers, cached in the store."""
from __future__ import annotations

import shutil

import torch

from gw.merge.regmean import regmean_matrix
from infra.manifest import load_manifest
from infra.storage import open_store
from workers.consolidate import GroupConsolidator, MergeConfig
from workers.grams import GRAMS_PREFIX, input_grams

PAIR = ("circuits-1", "circuits-2")


def test_input_grams_are_the_mean_outer_product_of_a_layers_inputs_over_real_tokens(tiny_fleet_dir):
    store = open_store(str(tiny_fleet_dir))
    consolidator = GroupConsolidator(store, load_manifest(store), device="cpu")
    spec = consolidator.manifest.scorer(PAIR[0])
    model = consolidator.individual(spec)
    texts = ["a short answer", "a much longer answer with many more words in it than the first one"]
    grams = input_grams(model.backbone, consolidator.tokenizer, texts)
    # the first layer's query sees the embeddings' output: recompute it without the padding by hand
    name = next(k for k in grams if k.endswith("layer.0.attention.self.query.weight"))
    seen = []
    module = model.backbone.get_submodule(name.removesuffix(".weight"))
    handle = module.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0][0]))
    with torch.inference_mode():
        for text in texts:  # one text at a time: no padding at all
            model.backbone(**consolidator.tokenizer(text, return_tensors="pt"))
    handle.remove()
    x = torch.cat(seen).double()
    torch.testing.assert_close(grams[name].double(), x.T @ x / len(x), rtol=1e-4, atol=1e-5)
    assert all(g.shape[0] == g.shape[1] for g in grams.values())


def test_a_regmean_group_merges_with_grams_computed_once_and_cached(tmp_path, tiny_fleet_dir):
    shutil.copytree(tiny_fleet_dir, tmp_path / "fleet")
    store = open_store(str(tmp_path / "fleet"))
    config = MergeConfig(method="regmean", grid=[{}], gate="delta", delta=1.0)
    consolidator = GroupConsolidator(store, load_manifest(store), device="cpu")
    specs = [consolidator.manifest.scorer(i) for i in PAIR]
    outcome = consolidator.consolidate(specs, config)
    assert outcome.decision.passed and outcome.record()["merge"]["method"] == "regmean"
    assert len(store.list(GRAMS_PREFIX)) == 2  # one file per member
    # a fresh consolidator reads them back rather than recomputing, and merges the same backbone
    again = GroupConsolidator(store, load_manifest(store), device="cpu")
    model, _ = again.merged_model(specs, {}, config)
    key = next(k for k in again.grams(specs[0]) if k.endswith("layer.0.intermediate.dense.weight"))
    expected = regmean_matrix([again.member(s).backbone[key] for s in specs], [again.grams(s)[key] for s in specs], 0.9)
    torch.testing.assert_close(model.backbone_state_dict()[key], expected.float())
