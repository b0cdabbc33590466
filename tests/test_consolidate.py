"""Consolidating groups of tiny scorers: merge, head refit, gate, publish and serve."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.cli import main
from infra.manifest import load_manifest
from infra.publish import read_manifest, verify_run
from infra.storage import open_store
from workers.consolidate import GroupConsolidator, MergeConfig
from workers.publish_fleet import publish_consolidated, save_checkpoint, weights_bytes_before
from workers.serving import ConsolidatedFleet

TRIO = ("circuits-1", "circuits-2", "circuits-3")


@pytest.fixture(scope="module")
def consolidator(tiny_fleet_dir):
    store = open_store(str(tiny_fleet_dir))
    return GroupConsolidator(store, load_manifest(store), device="cpu")


def _specs(consolidator, ids=TRIO):
    return [consolidator.manifest.scorer(i) for i in ids]


def test_lenient_gate_accepts_the_trio_and_records_why(consolidator):
    outcome = consolidator.consolidate(_specs(consolidator), MergeConfig(method="ties", grid=[{}], delta=1.0))
    assert outcome.decision.passed and outcome.candidate.members == TRIO
    record = outcome.record()
    assert record["merge"]["method"] == "ties" and record["params"]["top_k"] == 0.2
    assert set(record["baseline_validation"]) == set(TRIO) == set(record["merged_validation"])


def test_strict_gate_falls_back_or_keeps_members_individual(consolidator):
    # The base encoder under each fine-tuned head (TA with λ = 0, no refit) loses accuracy; at δ = 0 any drop fails.
    outcome = consolidator.consolidate(_specs(consolidator), MergeConfig(method="task_arithmetic", grid=[{"lam": 0.0}],
                                                                         refit_heads=False, delta=0.0))
    decision, whole = outcome.decision, outcome.decision.attempts[0]
    assert whole.members == list(TRIO)
    assert not whole.passed and whole.max_drop > 0, whole
    pairs = decision.attempts[1:]
    assert len(pairs) == 3 and all(len(p.members) == 2 for p in pairs)  # every pair of the trio was tried
    if decision.passed:
        best = min((p for p in pairs if p.passed), key=lambda p: p.max_drop)
        assert decision.accepted == best.members and outcome.candidate.members == tuple(best.members)
    else:
        assert outcome.candidate is None and decision.individual == list(TRIO)


def test_grid_search_records_every_candidate(consolidator):
    grid = [{"lam": 1.0, "top_k": 0.2}, {"lam": 0.5, "top_k": 0.1}]
    outcome = consolidator.consolidate(_specs(consolidator, TRIO[:2]), MergeConfig(method="ties", grid=grid, delta=1.0))
    table = outcome.record()["tuning"]["circuits-1+circuits-2"]["table"]
    assert [row["params"] for row in table] == grid
    assert outcome.candidate.params in grid


def test_refit_changes_heads_but_not_the_backbone(consolidator):
    config = MergeConfig(method="ties", grid=[{}], delta=1.0)
    refit = consolidator.build(_specs(consolidator, TRIO[:2]), {}, config)
    plain = consolidator.build(_specs(consolidator, TRIO[:2]), {}, MergeConfig(method="ties", grid=[{}], refit_heads=False))
    for (k, a), b in zip(refit.model.backbone_state_dict().items(), plain.model.backbone_state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(refit.model.heads["circuits-1"].parameters(),
                                                      plain.model.heads["circuits-1"].parameters()))


def test_publish_and_serve_round_trip(tmp_path, consolidator, capsys):
    config = MergeConfig(method="ties", grid=[{}], delta=1.0)
    merged = consolidator.build(_specs(consolidator, TRIO), {}, config).model
    alone = consolidator.individual(consolidator.manifest.scorer("plants-1"))
    store = open_store(str(tmp_path / "out"))
    fleet_store = consolidator.store
    before = weights_bytes_before(fleet_store, consolidator.manifest, [*TRIO, "plants-1"])
    sources = {"groups/g1": save_checkpoint(store, "candidates/g1", merged, consolidator.tokenizer, {"group": list(TRIO)}),
               "items/plants-1": save_checkpoint(store, "candidates/p1", alone, consolidator.tokenizer)}
    manifest = publish_consolidated(store, "run-1", sources, bytes_before=before)
    assert verify_run(store, "run-1") == []
    storage = read_manifest(store, "run-1")["extra"]["storage"]
    assert storage["bytes_before"] == before and storage["n_backbones"] == 2
    assert 1.5 < storage["ratio"] < 2.0  # four encoders became two (plus four small heads)
    assert manifest["routing"]["circuits-2"]["checkpoint"] == "groups/g1"

    texts = ["the switch is open", "the battery pushes current round the loop", "leaves take in light"]
    with ConsolidatedFleet(store, device="cpu") as served:
        assert served.run_id == "run-1" and served.items == sorted([*TRIO, "plants-1"])
        requests = [("circuits-1", texts[0]), ("plants-1", texts[2]), ("circuits-3", texts[1]), ("circuits-1", texts[1])]
        mixed = served.predict_mixed(requests)
        for (item, text), got in zip(requests, mixed):
            alone_pred = served.predict(item, [text])[0]
            assert got.label == alone_pred.label and np.allclose(got.scores, alone_pred.scores, atol=1e-5)
        # Same answers as the in-memory merged model.
        batch = consolidator.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            expected = torch.stack(merged(batch, ["circuits-2"] * 3)).softmax(-1).numpy()
        got = np.array([p.scores for p in served.predict("circuits-2", texts)])
        assert np.allclose(got, expected, atol=1e-5)
        multilabel = served.predict("circuits-3", texts)[0]
        assert isinstance(multilabel.label, list) and len(multilabel.scores) == 3
        with pytest.raises(KeyError, match="not in published run"):
            served.predict("nope", texts)

    assert main(["predict", "--published", str(tmp_path / "out"), "--item", "circuits-1", *texts[:2]]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("incorrect", "partially_correct", "correct") for line in lines)
