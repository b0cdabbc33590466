"""Faults met as an adversary would (issue 13): each ends in a clear error naming what is wrong, or a finished run.

Fast tests on the tiny fleet; the flow tests share the session's Prefect harness.
"""
from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from infra.manifest import load_manifest
from infra.storage import StorageError, open_store
from infra.validation import validate_fleet

pytestmark = pytest.mark.faults

VICTIM = "circuits-2"


def _validate(root):
    store = open_store(str(root))
    return validate_fleet(store, load_manifest(store))


def _edit_scorer(root, scorer_id, **changes):
    doc = yaml.safe_load((root / "fleet.yaml").read_text())
    next(s for s in doc["scorers"] if s["id"] == scorer_id).update(changes)
    (root / "fleet.yaml").write_text(yaml.safe_dump(doc))


# -- 1. a tokenizer that differs from the base model's -------------------------------------------------


def _permute_vocabulary(scorer_dir):
    """Swap the ids of the non-special tokens, and the embedding rows with them: the scorer alone
    computes exactly what it did, but under another tokenizer than the base model's."""
    doc = json.loads((scorer_dir / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    special = {t["content"] for t in doc["added_tokens"]}
    movable = sorted((i for t, i in vocab.items() if t not in special))
    moved = dict(zip(movable, movable[::-1]))  # old id -> new id
    doc["model"]["vocab"] = {t: moved.get(i, i) for t, i in vocab.items()}
    (scorer_dir / "tokenizer.json").write_text(json.dumps(doc))
    state = load_file(str(scorer_dir / "model.safetensors"))
    key = next(k for k in state if k.endswith("word_embeddings.weight"))
    old = state[key].clone()
    for before, after in moved.items():
        state[key][after] = old[before]
    save_file(state, str(scorer_dir / "model.safetensors"))


def test_a_scorer_with_another_tokenizer_is_set_aside_by_name(fleet):
    from workers.scorer_io import load_scorer

    texts = ["the battery is in series", "roots take up water"]
    before = load_scorer(fleet / "scorers" / VICTIM)
    _permute_vocabulary(fleet / "scorers" / VICTIM)
    after = load_scorer(fleet / "scorers" / VICTIM)
    with torch.inference_mode():
        logits = [s.model(**s.tokenizer(texts, return_tensors="pt", padding=True)).logits for s in (before, after)]
    assert torch.allclose(*logits, atol=1e-5)  # the scorer alone is unchanged: only its tokenizer differs

    report = _validate(fleet)
    assert list(report.rejected) == [VICTIM], report.summary()
    (reason,) = report.rejected[VICTIM]
    assert f"scorers/{VICTIM}: tokenizer differs from the base model's" in reason and "other ids" in reason
    assert "\n" not in reason


def test_the_consolidator_merges_under_the_base_tokenizer_and_refuses_another(fleet):
    from workers.consolidate import GroupConsolidator

    store = open_store(str(fleet))
    manifest = load_manifest(store)
    consolidator = GroupConsolidator(store, manifest, device="cpu")
    base_vocab = json.loads((fleet / "base" / "tokenizer.json").read_text())["model"]["vocab"]
    assert consolidator.tokenizer.get_vocab() == base_vocab  # the base's, before any member is loaded
    consolidator.member(manifest.scorer("circuits-1"))
    _permute_vocabulary(fleet / "scorers" / VICTIM)
    with pytest.raises(ValueError, match=f"scorer {VICTIM}: its tokenizer differs from the base model's"):
        consolidator.member(manifest.scorer(VICTIM))


# -- 2. null texts in one item's responses -------------------------------------------------------------


def _null_texts(root, scorer_id, rows=(0, 5)):
    path = root / "responses" / f"{scorer_id}.parquet"
    table = pq.read_table(path)
    texts = table.column("text").to_pylist()
    for row in rows:
        texts[row] = None
    pq.write_table(table.set_column(table.column_names.index("text"), "text", pa.array(texts, pa.string())), path)
    return table.column("response_id").to_pylist()[rows[0]]


def test_null_texts_are_named_by_validation(fleet):
    first = _null_texts(fleet, VICTIM)
    report = _validate(fleet)
    assert list(report.rejected) == [VICTIM], report.summary()
    (reason,) = report.rejected[VICTIM]
    assert reason == f"responses responses/{VICTIM}.parquet: 2 rows have a null text (e.g. response {first!r})"


# -- 3. paths outside the store --------------------------------------------------------------------------


def _outside(tmp_path, fleet, what):
    """Point `VICTIM` at a copy of its files outside the store, the way `what` says."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(fleet / "scorers" / VICTIM, elsewhere / "scorer")
    shutil.copy(fleet / "responses" / f"{VICTIM}.parquet", elsewhere / "responses.parquet")
    if what == "symlinked scorer dir":
        shutil.rmtree(fleet / "scorers" / VICTIM)
        os.symlink(elsewhere / "scorer", fleet / "scorers" / VICTIM)
    elif what == "symlinked weights":
        (fleet / "scorers" / VICTIM / "model.safetensors").unlink()
        os.symlink(elsewhere / "scorer" / "model.safetensors", fleet / "scorers" / VICTIM / "model.safetensors")
    elif what == "absolute checkpoint":
        _edit_scorer(fleet, VICTIM, checkpoint=str(elsewhere / "scorer"))
    elif what == "file uri checkpoint":
        _edit_scorer(fleet, VICTIM, checkpoint=f"file://{elsewhere / 'scorer'}")
    elif what == "absolute responses":
        _edit_scorer(fleet, VICTIM, responses=str(elsewhere / "responses.parquet"))
    elif what == "dotdot checkpoint":
        _edit_scorer(fleet, VICTIM, checkpoint=f"../elsewhere/scorer")
    return elsewhere


OUTSIDE = {"symlinked scorer dir": "outside the store", "symlinked weights": "outside the store",
           "absolute checkpoint": "outside the store", "file uri checkpoint": "outside the store",
           "absolute responses": "it is absolute", "dotdot checkpoint": "not a key inside the store"}


@pytest.mark.parametrize("what", sorted(OUTSIDE))
def test_paths_outside_the_store_are_set_aside_by_name(tmp_path, fleet, what):
    elsewhere = _outside(tmp_path, fleet, what)
    report = _validate(fleet)
    assert list(report.rejected) == [VICTIM], report.summary()
    (reason,) = report.rejected[VICTIM]
    assert OUTSIDE[what] in reason and "\n" not in reason, reason
    assert "elsewhere" in reason or "scorers/" in reason  # the path is named


def test_every_reader_of_the_store_refuses_a_symlink_out(tmp_path, fleet):
    """The rule is the store's: extraction, merging and publish see what validation saw."""
    from workers.extract.run import load_spec_scorer
    from workers.publish_fleet import weights_bytes_before
    from workers.scorer_io import checkpoint_hash

    _outside(tmp_path, fleet, "symlinked weights")
    store = open_store(str(fleet))
    spec = load_manifest(store).scorer(VICTIM)
    for read in (lambda: checkpoint_hash(store, spec.checkpoint),
                 lambda: load_spec_scorer(store, spec, "cpu"),
                 lambda: weights_bytes_before(store, load_manifest(store), [VICTIM]),
                 lambda: store.read_bytes(f"{spec.checkpoint}/model.safetensors")):
        with pytest.raises((StorageError, ValueError), match="outside the store"):
            read()
    # a symlink that stays inside the store is fine, and a symlink out is deleted, not followed
    os.symlink(fleet / "responses", fleet / "responses-link")
    assert store.read_table(f"responses-link/{VICTIM}.parquet").num_rows
    store.delete(f"{spec.checkpoint}/model.safetensors")
    assert (tmp_path / "elsewhere" / "scorer" / "model.safetensors").is_file()


# -- 4. run ids started in the same second, and the publish race -----------------------------------------


def test_runs_started_together_get_distinct_run_ids():
    from flows.nightly import new_run_id

    ids = [new_run_id() for _ in range(50)]  # well within one second
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("run-") and i[4:12].isdigit() for i in ids)


def test_the_loser_of_a_publish_race_gets_a_publish_error_and_the_winner_is_intact(any_store):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from infra.publish import PublishError, latest_run, publish_run, verify_run

    start = threading.Barrier(2)

    def publish(n: int):
        def write(prefix: str) -> None:
            for part in range(6):  # slow enough that both are writing at once
                any_store.write_bytes(f"{prefix}/part-{part}.bin", f"publisher {n} part {part}".encode() * 100)
                time.sleep(0.02)

        start.wait()
        try:
            return publish_run(any_store, "run-same-second", write)
        except Exception as exc:  # noqa: BLE001 - the test looks at which kind
            return exc

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(publish, range(2)))
    winners = [o for o in outcomes if isinstance(o, dict)]
    losers = [o for o in outcomes if not isinstance(o, dict)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    assert isinstance(losers[0], PublishError) and "run 'run-same-second'" in str(losers[0]), repr(losers[0])
    assert "exists" in str(losers[0]) or "already published" in str(losers[0])
    assert latest_run(any_store) == "run-same-second" and verify_run(any_store, "run-same-second") == []
    texts = {any_store.read_bytes(f"published/run-same-second/{k}").decode()[:11] for k in winners[0]["files"]}
    assert len(texts) == 1  # every file is the winner's: the loser never wrote into the run


# -- 5. a stalled S3 endpoint ------------------------------------------------------------------------------


@pytest.fixture
def stalled_endpoint():
    """An S3 endpoint that accepts connections and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held, stop = [], threading.Event()

    def hold() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fleetmerge: error: "), err
    return err


def test_a_stalled_s3_endpoint_ends_the_cli_in_one_line_naming_it(stalled_endpoint, capsys, monkeypatch):
    import time

    from flows.cli import main

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    started = time.monotonic()
    assert main(["report", "--store", "s3://bucket/fleet", "--s3-endpoint", stalled_endpoint]) == 2
    err = _one_line_error(capsys)
    assert f"S3 endpoint {stalled_endpoint}" in err and "HeadObject operation" in err, err
    assert time.monotonic() - started < 90


def test_a_stalled_endpoint_times_out_the_boto3_requests_too(stalled_endpoint, s3_settings, monkeypatch):
    """Deletes and the conditional create go through boto3, whose default waits are 60 s a read, 5 times."""
    import dataclasses
    import time

    import infra.storage.s3 as s3

    monkeypatch.setattr(s3, "BOTO_READ_TIMEOUT_S", 0.5)
    store = open_store("s3://bucket/fleet", dataclasses.replace(s3_settings, s3_endpoint=stalled_endpoint))
    started = time.monotonic()
    for operation in (lambda: store.delete("published/run-x"), lambda: store.put_if_absent("published/x", b"x")):
        with pytest.raises(StorageError, match=f"S3 endpoint {stalled_endpoint}"):
            operation()
    assert time.monotonic() - started < 30


def test_errors_from_ray_tasks_and_botocore_are_one_line(capsys, monkeypatch):
    from botocore.exceptions import EndpointConnectionError

    import flows.cli as cli

    remote = StorageError("s3://b/k (S3 endpoint http://h:1): cannot open: timed out")

    class RayTaskLikeError(StorageError):  # what ray.get raises: the remote error, its traceback, as a cause
        def __init__(self):
            super().__init__("ray::job() (pid=1)\nTraceback (most recent call last):\n  File ...\n" + str(remote))
            self.cause = remote

    for error, expected in ((RayTaskLikeError(), str(remote)),
                            (EndpointConnectionError(endpoint_url="http://h:1/b"), "http://h:1/b"),
                            (TimeoutError("read timed out\nmore"), "read timed out")):
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(cli, "cmd_report", fail)
        assert cli.main(["report", "--store", "."]) == 2
        assert expected in _one_line_error(capsys)


# -- 6. S3 answering 500s, then recovering ------------------------------------------------------------------


class FlakyS3:
    """An HTTP proxy in front of moto that answers 500 InternalError to the requests `fails(n)` picks (n
    counts requests from 1), and forwards the others unchanged."""

    ERROR = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")

    def __init__(self, upstream: str):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        proxy = self
        self.requests, self.failed, self.fails = 0, 0, lambda n: False
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = b""
                    while True:
                        line = self.rfile.readline()
                        raw += line
                        size = int(line.split(b";")[0].strip(), 16)
                        raw += self.rfile.read(size + 2)
                        if size == 0:
                            return raw
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with proxy._lock:
                    proxy.requests += 1
                    fail = proxy.fails(proxy.requests)
                    proxy.failed += fail
                if fail:
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(proxy.ERROR)))
                    self.end_headers()
                    self.wfile.write(proxy.ERROR if self.command != "HEAD" else b"")
                    return
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                if body:
                    conn.send(body)
                answer = conn.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                head = self.command == "HEAD"  # its Content-Length is the object's size: pass it on
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "server", "date",
                                            *(() if head else ("content-length",))):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky_s3(s3_settings, monkeypatch):
    import infra.storage.s3 as s3

    monkeypatch.setattr(s3, "_RETRY_WAITS_S", (0.01, 0.01, 0.01))  # the retries, without their waits
    proxy = FlakyS3(s3_settings.s3_endpoint)
    try:
        yield proxy
    finally:
        proxy.close()


def test_s3_answering_500s_then_recovering_loses_nothing(flaky_s3, s3_settings, tmp_path):
    """Every fourth request fails with a 500 (both SDKs retry it): writes, reads, listings, the conditional
    create and a whole publish complete, and the published run verifies."""
    from dataclasses import replace

    from fixtures_s3 import make_s3_bucket
    from infra.publish import read_manifest, verify_run
    from infra.storage.s3 import _s3_client, _s3_filesystem

    bucket = make_s3_bucket(s3_settings)
    settings = replace(s3_settings, s3_endpoint=flaky_s3.endpoint)
    _s3_client.cache_clear(), _s3_filesystem.cache_clear()
    store = open_store(f"s3://{bucket}/fleet", settings)
    flaky_s3.fails = lambda n: n % 4 == 0
    store.write_json("a/b.json", {"x": 1})
    store.write_bytes("a/c.bin", os.urandom(1 << 16))
    assert store.read_json("a/b.json") == {"x": 1} and store.size("a/c.bin") == 1 << 16
    assert store.list("a") == ["a/b.json", "a/c.bin"]
    assert store.put_if_absent("a/once", b"1") is True and store.put_if_absent("a/once", b"2") is False
    from infra.publish import publish_run

    publish_run(store, "run-1", lambda prefix: store.write_bytes(f"{prefix}/w.bin", b"weights"))
    assert read_manifest(store, "run-1")["files"]["w.bin"]["size"] == 7
    assert verify_run(store, "run-1") == []
    assert flaky_s3.failed >= 5, flaky_s3.failed  # the failures did happen


def test_s3_that_keeps_failing_ends_in_one_line_naming_the_endpoint(flaky_s3, s3_settings):
    from dataclasses import replace

    from fixtures_s3 import make_s3_bucket
    from infra.storage.s3 import _s3_client, _s3_filesystem

    bucket = make_s3_bucket(s3_settings)
    _s3_client.cache_clear(), _s3_filesystem.cache_clear()
    store = open_store(f"s3://{bucket}/fleet", replace(s3_settings, s3_endpoint=flaky_s3.endpoint))
    flaky_s3.fails = lambda n: True
    with pytest.raises(StorageError) as error:
        store.write_json("a/b.json", {"x": 1})
    assert f"S3 endpoint {flaky_s3.endpoint}" in str(error.value) and "a/b.json" in str(error.value)
    assert "\n" not in str(error.value)


# -- 7. a truncated or changed cache entry -----------------------------------------------------------------


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))


@pytest.mark.parametrize("how", ["truncated", "one byte changed"])
def test_a_damaged_candidate_checkpoint_is_detected_by_its_hash_and_recomputed(fleet, how):
    from workers.group_jobs import individual_job

    store = open_store(str(fleet))
    first = individual_job(store, VICTIM)
    weights = fleet / first["checkpoint"] / "backbone" / "model.safetensors"
    whole = weights.read_bytes()
    assert individual_job(store, VICTIM)["reused"] is True
    _damage(weights, how)
    with pytest.warns(UserWarning, match="no longer matches its recorded sha256"):
        again = individual_job(store, VICTIM)
    assert again["reused"] is False and again["checkpoint"] == first["checkpoint"]
    assert weights.read_bytes() == whole  # the same checkpoint, written whole again
    assert individual_job(store, VICTIM)["reused"] is True


def test_a_truncated_json_cache_entry_is_recomputed(fleet):
    from workers.group_jobs import own_job

    store = open_store(str(fleet))
    first = own_job(store, VICTIM)
    (entry,) = (fleet / "candidates" / "own").iterdir()
    _damage(entry, "truncated")
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert own_job(store, VICTIM) == first
    assert json.loads(entry.read_text()) == first


def test_a_truncated_features_file_is_recomputed(fleet):
    from workers.extract import ExtractConfig, read_features
    from workers.extract.run import extract_for_spec

    store = open_store(str(fleet))
    spec = load_manifest(store).scorer(VICTIM)
    config = ExtractConfig(max_responses=20)
    ref = extract_for_spec(store, spec, config, "cpu")
    _, vectors = read_features(store, ref)
    _damage(fleet / ref.key, "truncated")
    assert extract_for_spec(store, spec, config, "cpu") == ref
    assert (read_features(store, ref)[1] == vectors).all()


# -- flows: one item's bad rows, and many merges with everything upstream cached ---------------------------

FAST = {"grid": [], "max_responses": 24, "delta": 1.0}  # a lenient gate: merged groups are published


def test_null_texts_in_one_item_never_fail_the_fleet(prefect_harness, ray_local, fleet):
    from flows.nightly import consolidate
    from infra.publish import read_manifest

    _null_texts(fleet, VICTIM)
    summary = consolidate(fleet="fleet.yaml", store=str(fleet), config=FAST)
    assert "null text" in summary["set_aside"][VICTIM][0]
    routing = read_manifest(open_store(str(fleet)), summary["run_id"])["routing"]
    assert set(routing) == {"circuits-1", "circuits-3", "plants-1", "plants-2"}


def _many_scorers(root, copies: int) -> list[str]:
    """The tiny fleet with every scorer copied `copies` times under new ids (same weights and responses)."""
    store = open_store(str(root))
    manifest = load_manifest(store)
    scorers = []
    for spec in manifest.scorers:
        for n in range(copies):
            new = f"{spec.id}-{n}"
            shutil.copytree(root / spec.checkpoint, root / "scorers" / new)
            shutil.copy(root / spec.responses, root / "responses" / f"{new}.parquet")
            scorers.append(spec.model_copy(update={"id": new, "checkpoint": f"scorers/{new}",
                                                   "responses": f"responses/{new}.parquet"}))
    from infra.manifest import save_manifest

    save_manifest(store, manifest.model_copy(update={"scorers": scorers}))
    return [s.id for s in scorers]


@pytest.mark.slow
def test_many_merges_with_everything_upstream_cached_start_one_ray(prefect_harness, ray_local, fleet, monkeypatch):
    """Twenty scorers, ten planned pairs, features and distances cached and no Ray connected (a rerun after a
    change of delta, or a fleet the benchmark processed): the flow connects once and every merge succeeds."""
    import ray

    from flows.analysis import distances_and_plan
    from flows.config import ConsolidateConfig
    from flows.nightly import consolidate

    ids = _many_scorers(fleet, 4)
    config = {**FAST, "planner": "gw", "tau": 1e9, "k": 2}  # every pair is under tau: 10 pairs (no trial merges:
    # they would start Ray before the merges)
    distances_and_plan(open_store(str(fleet)), "fleet.yaml", ConsolidateConfig.from_dict(config), plan=False)
    ray.shutdown()
    inits = []
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(k) or real_init(*a, **k))
    summary = consolidate(fleet="fleet.yaml", store=str(fleet), config=config)
    assert summary["computed"] == {"features": 0, "pairs": 0, "merges": 10}, summary["computed"]
    assert len(summary["groups"]) == 10 and sorted(i for g in summary["groups"] for i in g) == sorted(ids)
    assert len(inits) == 1
