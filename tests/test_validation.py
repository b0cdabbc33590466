"""Fleet validation: every bad input gets a clear error naming the scorer and the problem; good scorers survive."""
from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file, save_file

from infra.manifest import ManifestError, load_manifest, parse_manifest
from infra.storage import open_store
from infra.validation import FleetValidationError, validate_fleet

VICTIM = "circuits-2"


def _edit_manifest(root, edit):
    doc = yaml.safe_load((root / "fleet.yaml").read_text())
    edit(doc)
    (root / "fleet.yaml").write_text(yaml.safe_dump(doc))


def _edit_config(root, **changes):
    path = root / "scorers" / VICTIM / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _rewrite_weights(root, change):
    path = root / "scorers" / VICTIM / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def _rewrite_responses(root, change):
    path = root / "responses" / f"{VICTIM}.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def _validate(root):
    store = open_store(str(root))
    return validate_fleet(store, load_manifest(store))


def _nan(state):
    key = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[key][0, 0] = math.nan


def _pickled(root):
    path = root / "scorers" / VICTIM
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _labels_out_of_range(table):
    labels = table.column("label").to_pylist()
    labels[0] = 7
    return table.set_column(table.column_names.index("label"), "label", pa.array(labels, pa.int64()))


def _drop_split(table):
    import pyarrow.compute as pc

    return table.filter(pc.not_equal(table.column("split"), "validation"))


BREAKAGES = {
    "missing weights": (lambda r: (r / "scorers" / VICTIM / "model.safetensors").unlink(), "missing file"),
    "missing config": (lambda r: (r / "scorers" / VICTIM / "config.json").unlink(), "missing file"),
    "unreadable config": (lambda r: (r / "scorers" / VICTIM / "config.json").write_text("{not json"), "unreadable"),
    "pickled weights": (_pickled, "not safetensors"),
    "corrupt safetensors": (lambda r: (r / "scorers" / VICTIM / "model.safetensors").write_bytes(b"\x10" * 64),
                            "not valid safetensors"),
    "hidden size": (lambda r: _edit_config(r, hidden_size=64), "hidden_size"),
    "vocabulary": (lambda r: _edit_config(r, vocab_size=999), "vocab_size"),
    "architecture": (lambda r: _edit_config(r, model_type="roberta"), "model_type"),
    "missing layer": (lambda r: _rewrite_weights(r, lambda s: [s.pop(k) for k in list(s) if ".layer.1." in k]),
                      "backbone tensors of the base model are missing"),
    "label count": (lambda r: _edit_manifest(r, lambda d: d["scorers"][1].update(labels=["a", "b"])),
                    "head has 3 outputs but the manifest declares 2 labels"),
    "nan weights": (lambda r: _rewrite_weights(r, _nan), "NaN or Inf"),
    "missing responses": (lambda r: (r / "responses" / f"{VICTIM}.parquet").unlink(), "missing or unreadable responses"),
    "empty responses": (lambda r: _rewrite_responses(r, lambda t: t.slice(0, 0)), "is empty"),
    "missing column": (lambda r: _rewrite_responses(r, lambda t: t.drop_columns(["text"])), "lacks column(s) text"),
    "missing split": (lambda r: _rewrite_responses(r, _drop_split), "no rows in split(s) validation"),
    "labels out of range": (lambda r: _rewrite_responses(r, _labels_out_of_range), "labels out of range"),
    "malformed entry": (lambda r: _edit_manifest(r, lambda d: d["scorers"][1].pop("task")), "malformed manifest entry"),
}


def test_good_fleet_is_fully_usable(fleet):
    report = _validate(fleet)
    assert not report.rejected
    assert len(report.usable) == 5


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_breakage_sets_aside_only_the_broken_scorer(fleet, name):
    breaker, expected = BREAKAGES[name]
    assert load_manifest(open_store(str(fleet))).scorers[1].id == VICTIM
    breaker(fleet)
    report = _validate(fleet)
    assert list(report.rejected) == [VICTIM], report.summary()
    message = " ".join(report.rejected[VICTIM])
    assert expected in message, message
    assert VICTIM in message or "scorers/" + VICTIM in message or f"{VICTIM}.parquet" in message
    assert VICTIM not in report.usable_ids and len(report.usable) == 4


def test_multilabel_labels_must_be_full_vectors(fleet):
    spec = next(s for s in load_manifest(open_store(str(fleet))).scorers if s.task == "multilabel")
    path = fleet / "responses" / f"{spec.id}.parquet"
    table = pq.read_table(path)
    labels = table.column("labels").to_pylist()
    labels[3] = [1, 0]  # one label short
    pq.write_table(table.set_column(table.column_names.index("labels"), "labels", pa.array(labels)), path)
    report = _validate(fleet)
    assert list(report.rejected) == [spec.id]
    assert "lists of 3 values" in report.rejected[spec.id][0]


@pytest.mark.parametrize("bad_id,expected", [("../escape", "unsafe"), ("a/b", "unsafe"), ("", "empty"),
                                             (".hidden", "no leading dot")])
def test_unsafe_ids_are_set_aside(fleet, bad_id, expected):
    _edit_manifest(fleet, lambda d: d["scorers"][0].update(id=bad_id))
    report = _validate(fleet)
    assert len(report.usable) == 4
    assert any(expected in r for reasons in report.rejected.values() for r in reasons), report.rejected


def test_duplicate_ids_are_set_aside(fleet):
    _edit_manifest(fleet, lambda d: d["scorers"][2].update(id=d["scorers"][1]["id"]))
    report = _validate(fleet)
    assert "appears 2 times" in " ".join(report.rejected[VICTIM])
    assert len(report.usable) == 3


def test_fewer_than_two_usable_scorers_is_an_error(fleet):
    _edit_manifest(fleet, lambda d: d.update(scorers=d["scorers"][:2]))
    _edit_config(fleet, hidden_size=8)
    with pytest.raises(FleetValidationError, match="only 1 usable scorer"):
        _validate(fleet)


def test_manifest_level_errors_are_clear(fleet):
    with pytest.raises(ManifestError, match="base_model"):
        parse_manifest("fleet: x\nscorers: []\n", "fleet.yaml")
    with pytest.raises(ManifestError, match="not valid YAML"):
        parse_manifest("fleet: [unclosed", "fleet.yaml")
    (fleet / "base" / "model.safetensors").unlink()
    with pytest.raises(ManifestError, match="base model base: unreadable"):
        _validate(fleet)


def test_validation_over_s3(fleet, s3_store):
    s3_store.upload_dir(fleet, "")
    report = validate_fleet(s3_store, load_manifest(s3_store))
    assert len(report.usable) == 5 and not report.rejected
