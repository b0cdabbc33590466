"""Consolidating groups of tiny scorers: merge, head refit, gate, publish and serve."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flows.cli import main
from infra.manifest import load_manifest
from infra.publish import read_manifest, verify_run
from infra.storage import open_store
from workers.consolidate import HEAD_SETTINGS, GroupConsolidator, MergeConfig, choose
from workers.group_jobs import consolidate_group_job, sweep_job
from workers.multihead import load_consolidated
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
    outcome = consolidator.consolidate(_specs(consolidator), MergeConfig(method="ties", grid=[{}], gate="delta",
                                                                         delta=1.0))
    assert outcome.decision.passed and outcome.accepted == list(TRIO)
    record = outcome.record()
    assert record["merge"]["method"] == "ties" and record["params"]["top_k"] == 0.2
    assert set(record["baseline_validation"]) == set(TRIO) == set(record["merged_validation"]) == set(record["merged_test"])
    json.dumps(record)


def test_strict_gate_falls_back_or_keeps_members_individual(consolidator):
    # The base encoder under each fine-tuned head (TA with λ = 0, no refit) loses accuracy; at δ = 0 any drop fails.
    config = MergeConfig(method="task_arithmetic", grid=[{"lam": 0.0}], refit_heads=False, gate="delta", delta=0.0)
    outcome = consolidator.consolidate(_specs(consolidator), config)
    decision, whole = outcome.decision, outcome.decision.attempts[0]
    assert whole.members == list(TRIO) and not whole.passed
    pairs = decision.attempts[1:]
    assert len(pairs) == 3 and all(len(p.members) == 2 for p in pairs)  # every pair of the trio was tried
    if decision.passed:
        assert outcome.accepted == decision.accepted and len(decision.accepted) == 2
    else:
        assert outcome.candidate is None and decision.individual == list(TRIO)


def test_evaluate_scores_both_head_settings_from_one_merge(consolidator):
    specs = _specs(consolidator, TRIO[:2])
    evaluation, model = consolidator.evaluate(specs, {}, MergeConfig(method="ties"))
    assert evaluation["members"] == list(TRIO[:2]) and evaluation["params"]["top_k"] == 0.2
    for setting in HEAD_SETTINGS:
        for item in TRIO[:2]:
            scores = evaluation["scores"][setting][item]
            n = scores["validation"]["n"]
            probs = np.asarray(scores["validation_probs"])
            assert probs.shape[0] == n and len(scores["test_predictions"]) == scores["test"]["n"]
    # The returned model carries the refit heads, and they are what "refit_heads" scored.
    member = consolidator.member(specs[0])
    features = consolidator.features(model, member.texts["validation"])
    np.testing.assert_allclose(consolidator.probabilities(model, TRIO[0], features),
                               evaluation["scores"]["refit_heads"][TRIO[0]]["validation_probs"], atol=1e-5)


def test_refit_changes_heads_but_not_the_backbone(consolidator):
    specs = _specs(consolidator, TRIO[:2])
    _, refit = consolidator.evaluate(specs, {}, MergeConfig(method="ties"))
    _, plain = consolidator.evaluate(specs, {}, MergeConfig(method="ties", refit_heads=False))
    for (k, a), b in zip(refit.backbone_state_dict().items(), plain.backbone_state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(refit.heads["circuits-1"].parameters(),
                                                      plain.heads["circuits-1"].parameters()))


def test_choose_picks_the_best_worst_change_and_keeps_the_first_of_equals():
    own = {"a": {"validation": {"macro_f1": 0.8}}, "b": {"validation": {"macro_f1": 0.6}}}

    def evaluation(lam, a, b):
        return {"members": ["a", "b"], "params": {"lam": lam},
                "scores": {"refit_heads": {"a": {"validation": {"macro_f1": a}}, "b": {"validation": {"macro_f1": b}}}}}

    evaluations = [evaluation(0.3, 0.70, 0.70), evaluation(0.5, 0.78, 0.61), evaluation(0.7, 0.79, 0.55)]
    best, table = choose(evaluations, own, "refit_heads")
    assert best["params"] == {"lam": 0.5} and table["best_score"] == pytest.approx(-0.02)
    assert [row["params"]["lam"] for row in table["table"]] == [0.3, 0.5, 0.7]
    tied = [evaluation(0.3, 0.79, 0.6), evaluation(0.5, 0.79, 0.6)]
    assert choose(tied, own, "refit_heads")[0]["params"] == {"lam": 0.3}


def test_group_job_and_benchmark_pick_the_same_parameters_and_scores(tmp_path, tiny_fleet_dir):
    """The quality benchmark scores a group with the product's pieces: same choice, same figures."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from quality_beetle import Fold

    shutil.copytree(tiny_fleet_dir, tmp_path / "fleet")
    store = open_store(str(tmp_path / "fleet"))
    fold = Fold(store, seed=0)
    config = MergeConfig(method="ties", grid=[{"top_k": 0.1}, {"top_k": 0.2}], gate="delta", delta=1.0)
    group = list(TRIO[:2])
    record = consolidate_group_job(store, group, config, consolidator=fold.consolidator)
    assert record["accepted"] == group and not record["reused"]
    bench = fold.ungated([group], config, "refit_heads")
    evaluations = sweep_job(store, group, config, consolidator=fold.consolidator)["evaluations"]
    chosen, _ = choose(evaluations, fold.own, "refit_heads")
    assert chosen["params"] == record["params"]
    for item in group:
        assert bench["items"][item]["test"] == record["merged_test"][item]
        assert chosen["scores"]["refit_heads"][item]["validation"] == record["merged_validation"][item]
    gated = fold.gated([group], config)
    assert gated["groups"] == [group] and gated["items"] == bench["items"]
    # The saved checkpoint is the swept model: the same validation probabilities.
    with store.local_dir(record["checkpoint"]) as path:
        model, _, _ = load_consolidated(path)
    member = fold.consolidator.member(fold.manifest.scorer(group[0]))
    features = fold.consolidator.features(model.to(fold.consolidator.device), member.texts["validation"])
    np.testing.assert_allclose(fold.consolidator.probabilities(model, group[0], features),
                               chosen["scores"]["refit_heads"][group[0]]["validation_probs"], atol=1e-5)
    # Reruns reuse the record; another gate re-gates from the cached sweeps.
    assert consolidate_group_job(store, group, config, consolidator=fold.consolidator)["reused"]


def test_publish_and_serve_round_trip(tmp_path, consolidator, capsys):
    _, merged = consolidator.evaluate(_specs(consolidator, TRIO), {}, MergeConfig(method="ties"))
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
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["label", "scores", "|", "text"]
    assert len(lines) == 2 and all(line.split()[0] in ("incorrect", "partially_correct", "correct") for line in lines)
    assert all(line.endswith(text) for line, text in zip(lines, texts))
    assert main(["predict", "--published", str(tmp_path / "out"), "--item", "circuits-1", "--json", texts[0]]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["text"] == texts[0] and set(row["scores"]) == {"incorrect", "partially_correct", "correct"}
    assert all(round(v, 4) == v for v in row["scores"].values())
