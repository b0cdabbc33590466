"""The scoring service: request parsing, the memory budget, following LATEST, and HTTP on Ray Serve."""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from infra.storage import open_store
from workers.multihead import MultiHeadScorer
from workers.publish_fleet import publish_consolidated, save_checkpoint
from workers.scorer_io import load_scorer, split_model
from workers.service import MAX_TEXT_CHARS, BadRequest, FleetHolder, parse_request

ITEMS = ("circuits-1", "circuits-3", "plants-1")


def _move_latest(store, run_id: str) -> None:
    store.write_bytes("published/LATEST", run_id.encode())  # what a new publish does last


def _checkpoint(store, scorers, items, prefix):
    backbone, _ = split_model(scorers[items[0]].model)
    heads = {i: split_model(scorers[i].model)[1] for i in items}
    schemas = {i: {"task": scorers[i].task, "labels": list(scorers[i].labels)} for i in items}
    model = MultiHeadScorer(scorers[items[0]].model.config, backbone, heads, schemas)
    return save_checkpoint(store, prefix, model, scorers[items[0]].tokenizer, {"group": list(items)})


@pytest.fixture(scope="module")
def published(tmp_path_factory, tiny_fleet_dir):
    """A store with run-1 (circuits-1 + circuits-3 share a backbone, plants-1 alone) and run-2 (all apart),
    LATEST at run-1."""
    from infra.manifest import load_manifest

    fleet = open_store(str(tiny_fleet_dir))
    manifest = load_manifest(fleet)
    scorers = {i: load_scorer(tiny_fleet_dir / "scorers" / i, task=manifest.scorer(i).task) for i in ITEMS}
    for i, scorer in scorers.items():
        scorer.labels = manifest.scorer(i).labels
    store = open_store(str(tmp_path_factory.mktemp("served")))
    run1 = {"groups/g1": _checkpoint(store, scorers, ["circuits-1", "circuits-3"], "c/g1"),
            "items/plants-1": _checkpoint(store, scorers, ["plants-1"], "c/p1")}
    run2 = {f"items/{i}": _checkpoint(store, scorers, [i], f"c/{i}") for i in ITEMS}
    publish_consolidated(store, "run-2", run2, bytes_before=1)
    publish_consolidated(store, "run-1", run1, bytes_before=1)
    return store


def test_requests_are_parsed_or_refused_with_one_reason():
    assert parse_request(b'{"item": "a", "texts": ["x", "y"]}') == [("a", "x"), ("a", "y")]
    assert parse_request(b'{"requests": [{"item": "a", "text": "x"}, {"item": "b", "text": "y"}]}') == [("a", "x"),
                                                                                                        ("b", "y")]
    for body, status, words in [(b"{not json", 400, "not JSON"), (b"[1]", 400, "must be an object"),
                                (b'{"item": "a", "texts": "x"}', 400, "list of strings"),
                                (b'{"item": "a", "texts": []}', 400, "no texts"),
                                (b'{"item": "a", "texts": ["  "]}', 400, "row 0: text is empty"),
                                (b'{"requests": [{"item": "", "text": "x"}]}', 400, "item must be"),
                                (json.dumps({"item": "a", "texts": ["x" * (MAX_TEXT_CHARS + 1)]}).encode(), 413,
                                 "characters"),
                                (json.dumps({"item": "a", "texts": ["x"] * 1025}).encode(), 413, "more than 1024")]:
        with pytest.raises(BadRequest, match=words) as caught:
            parse_request(body)
        assert caught.value.status == status and "\n" not in str(caught.value)


def test_the_budget_evicts_the_least_recently_used_checkpoint(published):
    holder = FleetHolder(published, memory_budget=1, device="cpu", poll_s=3600)  # room for one checkpoint
    run, out = holder.score([("circuits-1", "the switch is open"), ("plants-1", "leaves take in light")])
    assert run == "run-1" and len(out) == 2 and holder.status()["loaded"] == ["items/plants-1"]
    holder.score([("circuits-3", "a closed loop")])
    status = holder.status()
    assert status["loaded"] == ["groups/g1"] and status["loads"] == 3 and status["evictions"] == 2
    # Without a budget both stay; answers are the same either way.
    free = FleetHolder(published, device="cpu", poll_s=3600)
    assert [p.scores for p in free.score([("circuits-1", "the switch is open")])[1]] == \
        [p.scores for p in holder.score([("circuits-1", "the switch is open")])[1]]
    with pytest.raises(KeyError, match="unknown item 'nope'"):
        holder.score([("nope", "x")])


def test_the_budget_keeps_the_checkpoint_asked_for_most_not_the_last_used(published):
    probe = FleetHolder(published, run_id="run-2", device="cpu", poll_s=3600)
    probe.score([("circuits-1", "x")])
    size = probe.status()["loaded_bytes"]  # run-2's three checkpoints are the same size
    holder = FleetHolder(published, run_id="run-2", memory_budget=2 * size, device="cpu", poll_s=3600)
    holder.score([("circuits-1", "the switch is open")] * 3)
    holder.score([("circuits-3", "a closed loop")])
    holder.score([("plants-1", "leaves take in light")])
    # circuits-1 was asked for three rows, circuits-3 for one: circuits-3 goes, though circuits-1 was used
    # before it (least-recently-used eviction would have dropped circuits-1)
    status = holder.status()
    assert status["loaded"] == ["items/circuits-1", "items/plants-1"] and status["evictions"] == 1
    # circuits-3 is back with three more rows; plants-1, asked for once, makes room
    holder.score([("circuits-3", "a closed loop")] * 3)
    assert holder.status()["loaded"] == ["items/circuits-1", "items/circuits-3"]


def test_a_new_latest_is_served_and_running_requests_finish_on_the_old_run(published):
    holder = FleetHolder(published, device="cpu", poll_s=0)
    old = holder._acquire()  # a request that is still running on run-1
    try:
        _move_latest(published, "run-2")
        assert holder.score([("circuits-1", "x")])[0] == "run-2"
        assert holder.status()["retired_runs_open"] == 1  # not closed under the running request
        assert old.predict("circuits-1", ["still answered"])[0].label
    finally:
        holder._release(old)
        _move_latest(published, "run-1")
    assert holder.status()["retired_runs_open"] == 0
    assert holder.score([("circuits-1", "x")])[0] == "run-1"


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_the_service_answers_over_http(published, ray_local):
    from ray import serve

    from workers.service import start

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        url = start(published.uri, port=port, memory_budget=1, device="cpu", poll_s=0)
        status, doc = _post(f"{url}/score", b'{"item": "circuits-1", "texts": ["the switch is open", "no idea"]}')
        assert status == 200 and doc["run"] == "run-1" and len(doc["predictions"]) == 2
        assert set(doc["predictions"][0]["scores"]) == {"incorrect", "partially_correct", "correct"}
        # Mixed items, answered concurrently.
        results = []
        body = json.dumps({"requests": [{"item": i, "text": "leaves take in light"} for i in ITEMS]}).encode()
        threads = [threading.Thread(target=lambda: results.append(_post(f"{url}/score", body))) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert [s for s, _ in results] == [200] * 4
        assert [p["item"] for p in results[0][1]["predictions"]] == list(ITEMS)
        assert _post(f"{url}/score", b"{oops")[0] == 400
        status, doc = _post(f"{url}/score", b'{"item": "nope", "texts": ["x"]}')
        assert status == 404 and "unknown item 'nope'" in doc["error"]
        with urllib.request.urlopen(f"{url}/healthz", timeout=30) as response:
            health = json.loads(response.read())
        assert health["run"] == "run-1" and health["evictions"] >= 1 and len(health["loaded"]) == 1
    finally:
        serve.shutdown()


def test_checkpoints_in_memory_are_used_before_a_load_can_evict_them(published):
    holder = FleetHolder(published, memory_budget=1, device="cpu", poll_s=3600)
    holder.score([("plants-1", "leaves take in light")])
    # plants-1's checkpoint is in memory: it answers first, then g1 is loaded (one load, not two).
    holder.score([("circuits-1", "the switch is open"), ("plants-1", "sunlight")])
    assert holder.status()["loads"] == 2 and holder.status()["loaded"] == ["groups/g1"]
