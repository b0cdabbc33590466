"""Feature extraction over a fleet with Ray actors: same results as without Ray, caching, failures, retries."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from infra.manifest import load_manifest
from infra.storage import open_store
from workers.extract import ExtractConfig, extract_features, load_spec_scorer, plan_extraction, read_features
from workers.ray_extract import ExtractionWorker, extract_fleet, size_actors

CONFIG = ExtractConfig(max_responses=30, batch_size=8)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine two threads spin-wait (~100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def fleet_store(tmp_path, tiny_fleet_dir):
    shutil.copytree(tiny_fleet_dir, tmp_path / "fleet")
    return open_store(str(tmp_path / "fleet"))


def test_extract_fleet_equals_the_plain_function_and_a_rerun_reuses_everything(ray_local, fleet_store):
    specs = load_manifest(fleet_store).scorers
    seen: list[tuple[str, str]] = []
    result = extract_fleet(fleet_store, specs, CONFIG, timeout_s=300,
                           progress=lambda scorer_id, status, done, total: seen.append((scorer_id, status)))
    assert result.errors == {}
    assert sorted(result.computed) == sorted(s.id for s in specs) and result.reused == []
    assert 1 <= result.actors_started <= 2 and result.device == "cpu"
    assert sorted(seen) == sorted((s.id, "computed") for s in specs)
    for spec in specs:
        ids, vectors = read_features(fleet_store, result.features[spec.id])
        plan = plan_extraction(fleet_store, spec, CONFIG)
        expected = extract_features(load_spec_scorer(fleet_store, spec, "cpu"), plan.texts, CONFIG)
        assert ids == list(plan.response_ids)
        np.testing.assert_allclose(vectors, expected, atol=1e-6)

    again = extract_fleet(fleet_store, specs, CONFIG, timeout_s=300)
    assert again.actors_started == 0 and again.computed == [] and again.errors == {}
    assert sorted(again.reused) == sorted(s.id for s in specs)
    assert again.features == result.features


def test_a_corrupt_checkpoint_and_a_dying_worker_are_reported_and_the_rest_go_on(ray_local, fleet_store):
    specs = load_manifest(fleet_store).scorers[:3]
    corrupt, doomed = specs[0].id, specs[1].id
    (fleet_store.local_path(specs[0].checkpoint) / "model.safetensors").write_bytes(b"not a safetensors file")

    # Defined here so Ray ships the class by value (workers cannot import test modules).
    class DiesOnOneScorer(ExtractionWorker):
        def extract(self, store, spec, *args):
            if spec.id == doomed:
                os._exit(1)  # the worker process dies; with max_restarts=0 Ray gives up on it
            return super().extract(store, spec, *args)

    result = extract_fleet(fleet_store, specs, CONFIG, worker_cls=DiesOnOneScorer, max_restarts=0, timeout_s=300)
    assert set(result.errors) == {corrupt, doomed}
    assert corrupt in result.errors[corrupt] and "cannot load checkpoint" in result.errors[corrupt]
    assert "extraction worker failed" in result.errors[doomed]
    assert sorted(result.computed) == sorted(s.id for s in specs[2:])
    for spec in specs[2:]:
        assert read_features(fleet_store, result.features[spec.id])[1].shape == (CONFIG.max_responses, 32)


def test_a_worker_killed_during_extraction_is_retried_and_the_run_completes(ray_local, fleet_store, tmp_path):
    flag = tmp_path / "killed-once"

    class DiesOnce(ExtractionWorker):
        def extract(self, store, spec, *args):
            if not flag.exists():
                flag.write_text(spec.id)
                os._exit(1)  # the first call anywhere kills its worker process mid-extraction
            return super().extract(store, spec, *args)

    specs = load_manifest(fleet_store).scorers[:3]
    result = extract_fleet(fleet_store, specs, CONFIG, worker_cls=DiesOnce, max_restarts=1, max_task_retries=1,
                           max_in_flight=1, timeout_s=300)
    assert flag.exists()  # the fault did happen
    assert result.errors == {}
    assert sorted(result.computed) == sorted(s.id for s in specs)
    killed = flag.read_text()
    assert read_features(fleet_store, result.features[killed])[1].shape == (CONFIG.max_responses, 32)


def test_actor_sizing_fits_the_cluster():
    two_cpus = size_actors({"CPU": 2.0}, 5, use_gpu=False)
    assert two_cpus.window == 2 and two_cpus.num_cpus * two_cpus.window <= 2.0 and two_cpus.num_cpus < 1
    assert size_actors({"CPU": 2.0}, 1, use_gpu=False).window == 1
    assert size_actors({"CPU": 2.0}, 5, use_gpu=False, max_in_flight=4).num_cpus * 4 <= 2.0
    one_gpu = size_actors({"CPU": 16.0, "GPU": 1.0}, 5, use_gpu=True, max_in_flight=4)
    assert one_gpu.window == 1 and one_gpu.num_gpus == 1.0 and one_gpu.device == "cuda"
    shared = size_actors({"CPU": 16.0, "GPU": 1.0}, 5, use_gpu=True, gpus_per_actor=0.5)
    assert shared.window == 2 and shared.num_gpus == 0.5
    assert size_actors({"CPU": 8.0, "GPU": 0.5}, 5, use_gpu=True).window == 1
    with pytest.raises(ValueError, match="declares no GPUs"):
        size_actors({"CPU": 2.0}, 5, use_gpu=True)
    with pytest.raises(ValueError, match="no CPUs"):
        size_actors({}, 5, use_gpu=False)


def test_nothing_to_compute_starts_no_ray(fleet_store, monkeypatch):
    """Planning failures are reported per scorer without Ray being needed at all."""
    specs = load_manifest(fleet_store).scorers[:2]
    fleet_store.delete(specs[0].checkpoint)
    fleet_store.delete(specs[1].responses)
    result = extract_fleet(fleet_store, specs, CONFIG)
    assert set(result.errors) == {specs[0].id, specs[1].id} and result.actors_started == 0
    assert "cannot hash" in result.errors[specs[0].id] and "cannot read responses" in result.errors[specs[1].id]
