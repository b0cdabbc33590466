"""What a user sees when an input is wrong: one line on stderr, exit 2, nothing started."""
from __future__ import annotations

import pytest
from prefect.states import Completed, Failed

from flows.cli import main
from flows.nightly import _retry_transient
from infra.manifest import ManifestError


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fleetmerge: error: "), err
    return err


def test_a_run_that_is_not_published_is_one_line(tmp_path, capsys):
    assert main(["report", "run-nope", "--store", str(tmp_path)]) == 2
    assert "run 'run-nope' is not published" in _one_line_error(capsys)
    assert main(["predict", "--published", str(tmp_path), "--run", "run-nope", "--item", "x", "text"]) == 2
    assert "run-nope" in _one_line_error(capsys)


def test_a_store_that_does_not_exist_is_named(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "store"
    for argv in (["report", "--store", str(missing)], ["consolidate", "--store", str(missing)],
                 ["predict", "--published", str(missing), "--item", "x", "text"]):
        assert main(argv) == 2
        assert f"{missing}: no such store" in _one_line_error(capsys)
    assert not missing.exists()  # nothing was written


def test_consolidate_checks_the_manifest_before_starting_anything(tmp_path, capsys):
    assert main(["consolidate", "--store", str(tmp_path), "--fleet", "other.yaml"]) == 2
    assert "other.yaml" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_plan_stability_asks_for_the_gw_planner_before_starting_anything(tmp_path, capsys):
    assert main(["plan", "--store", str(tmp_path), "--bootstrap", "3"]) == 2
    assert "--bootstrap: plan stability resamples the GW features, so it needs --planner gw (the planner is " \
        "description)" in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_key_error_prints_its_message_without_quotes(capsys, monkeypatch):
    import flows.cli as cli

    def unknown_item(args):
        raise KeyError("item 'x' is not in published run r1")

    monkeypatch.setattr(cli, "cmd_report", unknown_item)  # the parser is built inside main, after this
    assert main(["report", "--store", "."]) == 2
    assert _one_line_error(capsys) == "fleetmerge: error: item 'x' is not in published run r1"


@pytest.mark.parametrize("error, retried", [(ManifestError("bad manifest"), False), (FileNotFoundError("gone"), False),
                                            (KeyError("x"), False), (ConnectionError("reset"), True),
                                            (RuntimeError("worker died"), True)])
def test_tasks_retry_only_what_may_pass_on_a_second_try(error, retried):
    assert _retry_transient(None, None, Failed(data=error)) is retried
    assert _retry_transient(None, None, Completed(data=1)) is True
