"""`fleetmerge fleet build` end to end on tiny data, locally and on S3 (moto over HTTP)."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from infra.manifest import load_manifest
from infra.settings import Settings
from infra.storage import open_store
from infra.validation import validate_fleet
from workers.scorer_io import checkpoint_hash, load_scorer

FAST = ["--epochs", "1"]


def _build(responses, base, out, *extra):
    return main(["fleet", "build", "--responses", str(responses), "--base", str(base), "--out", str(out), "--name",
                 "t", "--device", "cpu", *FAST, *extra])


def test_fleet_build_writes_a_valid_fleet(tmp_path, tiny_district, tiny_base, capsys):
    responses, _ = tiny_district
    assert _build(responses, tiny_base, tmp_path / "f") == 0
    store = open_store(str(tmp_path / "f"))
    manifest = load_manifest(store)
    assert [s.id for s in manifest.scorers] == sorted(s.id for s in manifest.scorers)
    assert len(manifest.scorers) == 5 and manifest.base_model == "base"
    report = validate_fleet(store, manifest)
    assert len(report.usable) == 5
    multilabel = [s for s in manifest.scorers if s.task == "multilabel"]
    assert len(multilabel) == 1 and len(multilabel[0].labels) == 3
    scorer = load_scorer(tmp_path / "f" / multilabel[0].checkpoint)
    assert scorer.model.config.num_labels == 3 and scorer.model.config.problem_type == "multi_label_classification"
    # Each responses file is the item's rows only, in the fleet's format.
    table = pq.read_table(tmp_path / "f" / manifest.scorers[0].responses)
    assert set(table.column_names) == {"response_id", "text", "label", "split"} and table.num_rows == 60
    assert "5 scorers" in capsys.readouterr().out


def test_rebuild_reuses_unchanged_scorers_and_is_reproducible(tmp_path, tiny_district, tiny_base, capsys):
    responses, _ = tiny_district
    out = tmp_path / "f"
    assert _build(responses, tiny_base, out, "--only", "circuits-1", "plants-1") == 0
    first = checkpoint_hash(out / "scorers" / "circuits-1")
    capsys.readouterr()
    assert _build(responses, tiny_base, out, "--only", "circuits-1", "plants-1") == 0
    assert "0 built, 2 reused" in capsys.readouterr().out
    assert _build(responses, tiny_base, out, "--only", "circuits-1", "plants-1", "--no-reuse") == 0
    assert "2 built, 0 reused" in capsys.readouterr().out
    assert checkpoint_hash(out / "scorers" / "circuits-1") == first  # seeded: same weights again
    record = json.loads((out / "scorers" / "circuits-1" / "fleetmerge_build.json").read_text())
    assert record["n_train"] > 0 and record["config"]["epochs"] == 1


def test_fleet_build_to_s3(tiny_district, tiny_base, s3_settings, monkeypatch, capsys):
    from fixtures_s3 import make_s3_bucket

    bucket = make_s3_bucket(s3_settings)
    for name, value in {"AWS_ACCESS_KEY_ID": s3_settings.aws_access_key_id, "AWS_DEFAULT_REGION": s3_settings.s3_region,
                        "AWS_SECRET_ACCESS_KEY": s3_settings.aws_secret_access_key}.items():
        monkeypatch.setenv(name, value)
    responses, _ = tiny_district
    uri = f"s3://{bucket}/district"
    assert _build(responses, tiny_base, uri, "--only", "circuits-1", "plants-2", "--s3-endpoint",
                  s3_settings.s3_endpoint) == 0
    store = open_store(uri, Settings.from_env(store=uri, s3_endpoint=s3_settings.s3_endpoint))
    assert len(validate_fleet(store, load_manifest(store)).usable) == 2
    assert main(["fleet", "validate", "--fleet", uri, "--s3-endpoint", s3_settings.s3_endpoint]) == 0
    assert "2 usable, 0 set aside" in capsys.readouterr().out


def test_unknown_item_metadata_is_a_clear_error(tmp_path, tiny_district, tiny_base, capsys):
    responses, items = tiny_district
    lines = items.read_text().splitlines()[1:]
    (tmp_path / "items.jsonl").write_text("\n".join(lines))
    assert main(["fleet", "build", "--responses", str(responses), "--items", str(tmp_path / "items.jsonl"),
                 "--base", str(tiny_base), "--out", str(tmp_path / "f")]) == 2
    assert "items without metadata" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_scorer_learns_a_demo_item(tmp_path):
    """Real model: one MiniLM-L6 scorer on one demo item beats chance clearly on its validation split."""
    from workers.demo_data import write_demo_district
    from workers.evaluate import evaluate_fleet

    responses, _ = write_demo_district(tmp_path / "d", n_per_topic=(1,), n_responses=200)
    assert main(["fleet", "build", "--responses", str(responses), "--out", str(tmp_path / "f"), "--device", "cpu",
                 "--epochs", "4"]) == 0
    store = open_store(str(tmp_path / "f"))
    spec = load_manifest(store).scorers[0]
    assert evaluate_fleet(store, [spec], split="validation")[spec.id]["accuracy"] > 0.6
