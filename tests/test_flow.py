"""The nightly flow end to end on a tiny fleet: Prefect harness, local Ray, local stores and (one test) S3 on moto."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
from prefect.client.orchestration import get_client

from flows.config import ConsolidateConfig
from flows.nightly import consolidate
from infra.manifest import load_manifest, save_manifest
from infra.publish import latest_run, list_runs, read_manifest, verify_run
from infra.storage import open_store
from fixtures_s3 import make_s3_bucket
from workers.serving import ConsolidatedFleet

FAST = {"grid": [], "max_responses": 48, "delta": 1.0}  # a lenient gate: merged groups are published
GW_PLAN = {**FAST, "planner": "gw"}  # what the GW matrix alone decides (its caching and bound skipping)
OTHER_ITEMS = ("circuits-1", "circuits-2", "plants-1")


@pytest.fixture
def fleet_copy(tmp_path, tiny_fleet_dir):
    root = tmp_path / "fleet"
    shutil.copytree(tiny_fleet_dir, root)
    return root


@pytest.fixture
def other_fleet_copy(fleet_copy):
    """The fleet copy with a three-scorer manifest under `other.yaml` and no `fleet.yaml` at all."""
    store = open_store(str(fleet_copy))
    manifest = load_manifest(store)
    save_manifest(store, manifest.model_copy(update={"scorers": [s for s in manifest.scorers if s.id in OTHER_ITEMS]}),
                  "other.yaml")
    (fleet_copy / "fleet.yaml").unlink()
    return fleet_copy


@pytest.fixture
def driver_loads_no_model(monkeypatch):
    """Models load in Ray workers (other processes) only: a load in this, the flow's driver process, fails."""
    from transformers import PreTrainedModel

    def refuse(cls, *args, **kwargs):
        raise AssertionError("the flow's driver loaded a model")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))


async def _artifact_keys(flow_run_id) -> set[str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        found = await client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return {a.key for a in found if a.key}


def test_flow_publishes_then_reruns_without_computing(prefect_harness, ray_local, fleet_copy):
    import asyncio

    state = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=FAST, return_state=True)
    summary = state.result()
    store = open_store(str(fleet_copy))
    assert summary["groups"], summary
    assert latest_run(store) == summary["run_id"] and verify_run(store, summary["run_id"]) == []
    manifest = read_manifest(store, summary["run_id"])
    assert set(manifest["routing"]) == {"circuits-1", "circuits-2", "circuits-3", "plants-1", "plants-2"}
    assert summary["storage"]["ratio"] > 1.0
    # The default planner packs the items' descriptions: no trial merges; every planned group is merged
    # once, whether the gate then publishes it or keeps its members apart.
    assert summary["computed"] == {"features": 5, "pairs": 10, "merges": len(manifest["extra"]["plan"]["groups"])}
    assert manifest["extra"]["plan"]["planner"] == summary["planner"] == "description"
    keys = asyncio.run(_artifact_keys(state.state_details.flow_run_id))
    assert {"gw-heatmap", "merge-plan", "item-metrics", "storage-summary", "gw-progress"} <= keys

    again = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=FAST)
    assert again["computed"] == {"features": 0, "pairs": 0, "merges": 0}
    assert again["reused"]["pairs"] == 10 and not again["republished"]
    assert list_runs(store) == [summary["run_id"]]
    with ConsolidatedFleet(store, device="cpu") as served:
        assert served.predict("plants-1", ["the roots take up water"])[0].label


def test_broken_scorer_is_set_aside_and_the_rest_published(prefect_harness, ray_local, fleet_copy):
    (fleet_copy / "scorers" / "plants-2" / "model.safetensors").write_bytes(b"not safetensors at all")
    summary = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=FAST)
    assert "plants-2" in summary["set_aside"] and "not valid safetensors" in summary["set_aside"]["plants-2"][0]
    store = open_store(str(fleet_copy))
    assert "plants-2" not in read_manifest(store, summary["run_id"])["routing"]
    assert len(read_manifest(store, summary["run_id"])["routing"]) == 4


def test_changed_scorer_recomputes_only_its_own_work(prefect_harness, ray_local, fleet_copy):
    first = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=GW_PLAN)
    # Replace one scorer's weights by another's: a changed checkpoint with a valid head.
    shutil.copy(fleet_copy / "scorers" / "circuits-1" / "model.safetensors",
                fleet_copy / "scorers" / "circuits-2" / "model.safetensors")
    second = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=GW_PLAN)
    assert second["computed"]["features"] == 1 and second["reused"]["features"] == 4
    # Its 4 new pairs are solved or skipped by their lower bound; the other 6 come from the cache.
    assert second["computed"]["pairs"] + second["skipped"]["pairs"] == 4 and second["reused"]["pairs"] == 6
    # A planned group's merge is computed when the group is new or holds circuits-2, else reused. Here the
    # second plan is {circuits-1, circuits-2, plants-1} and {circuits-3, plants-2}; the first plan had
    # neither ({circuits-1, plants-1}, {circuits-2, circuits-3, plants-2}), so both are computed.
    store = open_store(str(fleet_copy))
    before, after = (read_manifest(store, run["run_id"])["extra"]["plan"]["groups"] for run in (first, second))
    new = [group for group in after if "circuits-2" in group or group not in before]
    assert second["computed"]["merges"] == len(new) == 2 and second["reused"]["merges"] == len(after) - len(new)
    assert second["republished"] and second["run_id"] != first["run_id"]


def test_items_kept_on_their_own_scorers_are_loaded_on_ray_never_in_the_driver(prefect_harness, ray_local, fleet_copy,
                                                                               driver_loads_no_model):
    # The measured planner's trial merges run, but no pair merges that well: the plan is all singletons.
    summary = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config={**FAST, "planner": "measured", "tau": 1e-9})
    assert summary["computed"]["trial merges"] > 0
    assert summary["groups"] == [] and len(summary["individual"]) == 5
    assert {row["decision"] for row in summary["items"]} == {"kept on its own scorer (not planned into a group)"}
    assert all(row["test_macro_f1_before"] is not None for row in summary["items"])
    store = open_store(str(fleet_copy))
    assert verify_run(store, summary["run_id"]) == [] and len(read_manifest(store, summary["run_id"])["routing"]) == 5
    assert set(summary["driver_peak_rss_mb"]) == {"validate", "extract", "gw", "trial-merges", "plan", "merge",
                                                  "individual", "publish", "artifacts"}


def test_failed_publish_leaves_the_previous_state(prefect_harness, ray_local, fleet_copy, monkeypatch):
    first = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=FAST)
    store = open_store(str(fleet_copy))
    shutil.copy(fleet_copy / "scorers" / "circuits-1" / "model.safetensors",
                fleet_copy / "scorers" / "circuits-3" / "model.safetensors")
    import workers.publish_fleet as publish_fleet

    def broken_checkpoint_weights(store_, prefix):
        raise OSError("disk full while publishing")

    monkeypatch.setattr(publish_fleet, "checkpoint_weights", broken_checkpoint_weights)
    with pytest.raises(Exception, match="disk full"):
        consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=FAST)
    assert latest_run(store) == first["run_id"] and list_runs(store) == [first["run_id"]]


def test_flow_reads_the_named_manifest_in_every_step_on_s3(prefect_harness, ray_local, other_fleet_copy, s3_settings,
                                                          monkeypatch):
    """The fleet in an S3 bucket (moto over HTTP): every step reads and writes it through the store."""
    # tau above every distance and k = 2: one merged pair and one item kept on its own, so every step runs.
    config = {**FAST, "planner": "measured", "tau": 1e9, "k": 2}  # its trial merges read the bucket too
    uri = f"s3://{make_s3_bucket(s3_settings)}/fleet"
    store = open_store(uri, s3_settings)
    store.upload_dir(other_fleet_copy, "")
    settings = dataclasses.asdict(s3_settings)
    summary = consolidate(fleet="other.yaml", store=uri, config=config, settings=settings)
    assert set(read_manifest(store, summary["run_id"])["routing"]) == set(OTHER_ITEMS)
    assert len(summary["groups"]) == 1 and len(summary["individual"]) == 1
    assert summary["computed"] == {"features": 3, "pairs": 3, "trial merges": 3, "merges": 1}

    import infra.ray_conn

    def no_ray(*args, **kwargs):
        raise AssertionError("a rerun with everything cached connected to Ray")

    monkeypatch.setattr(infra.ray_conn, "ensure_ray", no_ray)
    again = consolidate(fleet="other.yaml", store=uri, config=config, settings=settings)
    assert again["computed"] == {"features": 0, "pairs": 0, "trial merges": 0, "merges": 0}
    assert not again["republished"]


# The description signal reaches the shortlist through the same workers.signals call as the description
# planner (test_description_planner_... below runs it in the flow), so its own measured run is not repeated.
@pytest.mark.parametrize("shortlist_by", ["gw", "cka"])
def test_measured_planner_trial_merges_the_shortlist_once_and_plans_on_it(prefect_harness, ray_local, fleet_copy,
                                                                          shortlist_by):
    from workers.pair_jobs import PAIRS_PREFIX
    from workers.probe_cka import PROBE_PREFIX

    config = {**FAST, "planner": "measured", "shortlist": 2, "shortlist_by": shortlist_by}
    summary = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=config)
    store = open_store(str(fleet_copy))
    assert len(store.list(PROBE_PREFIX)) == (5 if shortlist_by == "cka" else 0)  # every scorer's probe features
    measured = [store.read_json(key) for key in store.list(PAIRS_PREFIX)]
    trios = [r for r in measured if len(r["pair"]) == 3]
    assert 0 < summary["computed"]["trial merges"] == len(measured) <= 2 * 5 + len(trios)
    pairs = {frozenset(r["pair"]) for r in measured if len(r["pair"]) == 2}
    plan = read_manifest(store, summary["run_id"])["extra"]["plan"]
    assert plan["planner"] == "measured" and plan["groups"]
    # every pair inside a planned group was trial-merged: unmeasured pairs never share a group
    assert all(frozenset((a, b)) in pairs for g in plan["groups"] for a in g for b in g if a < b)
    # and every planned trio was checked by its own trial merge
    assert {frozenset(g) for g in plan["groups"] if len(g) == 3} <= {frozenset(r["pair"]) for r in trios}
    again = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=config)
    assert again["computed"]["trial merges"] == 0 and again["reused"]["trial merges"] == len(measured)
    if shortlist_by == "gw":  # the other trial signal reads the same merges: only a newly planned trio is merged
        other = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config={**config, "trial_signal": "true_label"})
        plan = read_manifest(store, other["run_id"])["extra"]["plan"]
        # a plan whose merges are the published ones publishes nothing new: the published run keeps its record
        assert plan["trial_signal"] == ("true_label" if other["republished"] else ConsolidateConfig().trial_signal)
        assert plan["shortlist_by"] == "gw"
        assert other["computed"]["trial merges"] <= sum(len(g) == 3 for g in plan["groups"])
        assert other["reused"]["trial merges"] >= len(pairs)


def test_description_planner_packs_the_descriptions_and_leaves_a_scorer_without_one_alone(prefect_harness, ray_local,
                                                                                           fleet_copy):
    import numpy as np

    from workers.descriptions import description_distances
    from workers.fleet_gw import plan_fleet

    store = open_store(str(fleet_copy))
    manifest = load_manifest(store)
    blank = manifest.scorers[0].id
    save_manifest(store, manifest.model_copy(update={"scorers": [
        s.model_copy(update={"description": None}) if s.id == blank else s for s in manifest.scorers]}))
    summary = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config={**FAST, "planner": "description"})
    plan = read_manifest(store, summary["run_id"])["extra"]["plan"]
    assert plan["planner"] == "description" and "trial merges" not in summary["computed"]
    ids = sorted(s.id for s in manifest.scorers)
    D = description_distances(store, ids, use_ray=False)
    assert np.isnan(D[ids.index(blank)]).sum() == len(ids) - 1
    expected = plan_fleet(D, ids, tau=None, tau_quantile=ConsolidateConfig().tau_quantile, k=3, planner="description")
    assert sorted(map(tuple, plan["groups"])) == sorted(expected.groups) and expected.groups
    assert blank in plan["singletons"]
    # a fleet with one description left cannot be planned by them: the fallback planner plans it, and says
    # why; without a fallback, or asked to shortlist by them, a clear error before any features
    save_manifest(store, manifest.model_copy(update={"scorers": [
        s.model_copy(update={"description": None}) for s in manifest.scorers[1:]] + manifest.scorers[:1]}))
    fallen = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config={**FAST, "fallback_planner": "gw"})
    plan = read_manifest(store, fallen["run_id"])["extra"]["plan"]
    assert plan["planner"] == fallen["planner"] == "gw"
    assert plan["fallback"] == fallen["fallback"] == ("1 of the 5 usable scorers in fleet.yaml have a description, and "
                                                      "grouping by description needs two or more: planned by the gw planner")
    with pytest.raises(ValueError, match=r"--planner description: 1 of the 5 usable scorers in fleet.yaml have a "):
        consolidate(fleet="fleet.yaml", store=str(fleet_copy), config={**FAST, "fallback_planner": None})
    with pytest.raises(ValueError, match=r"--shortlist-by description: 1 of the 5 usable scorers"):
        consolidate(fleet="fleet.yaml", store=str(fleet_copy),
                    config={**FAST, "planner": "measured", "shortlist_by": "description"})


@pytest.mark.slow  # ~2.5 min; tests/test_correction.py covers consolidate -> publish -> serve -> peft without the flow
def test_flow_with_item_correction_publishes_adapters_and_serves_them(prefect_harness, ray_local, fleet_copy, capsys):
    from flows.report import print_summary

    # A fixed rank: every merged item carries an adapter, whatever validation would choose.
    summary = consolidate(fleet="fleet.yaml", store=str(fleet_copy),
                          config={**FAST, "item_correction": True, "correction_ranks": [4]})
    store = open_store(str(fleet_copy))
    merged = [i for g in summary["groups"] for i in g]
    assert merged, summary
    manifest = read_manifest(store, summary["run_id"])
    assert {i for i, r in manifest["routing"].items() if "adapter" in r} == set(merged)
    storage = summary["storage"]
    assert storage["n_adapters"] == len(merged) and storage["adapter_bytes"] > 0
    assert storage["bytes_after"] == storage["backbone_bytes"] + storage["head_bytes"] + storage["adapter_bytes"]
    assert all(row["decision"].endswith("correction rank 4") for row in summary["items"] if row["item"] in merged)
    print_summary(summary)
    assert f"{len(merged)} item corrections" in capsys.readouterr().out
    with ConsolidatedFleet(store, device="cpu") as served:
        model, _ = served._checkpoint(manifest["routing"][merged[0]]["checkpoint"])
        assert model.corrections.rank(merged[0]) == 4
        assert served.predict(merged[0], ["the switch is open"])[0].label


def test_flow_on_a_shortlist_solves_only_its_pairs_and_groups_only_them(prefect_harness, ray_local, fleet_copy):
    config = {**FAST, "planner": "gw", "gw_candidates": 1}  # main's default planner became "measured"
    summary = consolidate(fleet="fleet.yaml", store=str(fleet_copy), config=config)
    store = open_store(str(fleet_copy))
    # each of 5 scorers names its nearest partner by the bound: at most 5 of the 10 pairs are solved
    assert 0 < summary["computed"]["pairs"] <= 5
    assert summary["skipped"]["not shortlisted"] == 10 - summary["computed"]["pairs"]
    plan = read_manifest(store, summary["run_id"])["extra"]["plan"]
    solved = {frozenset((r["a"], r["b"])) for r in store.read_table(
        next(k for k in store.list("gw/distances"))).to_pylist() if r["solver"] != "not-shortlisted"}
    assert all(frozenset((a, b)) in solved for g in plan["groups"] for a in g for b in g if a < b)
    assert latest_run(store) == summary["run_id"] and verify_run(store, summary["run_id"]) == []
