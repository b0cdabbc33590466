"""Measured pair mergeability: the math (gw.mergeability), the cached trial merges (workers.pair_jobs) and
the measured planner (workers.fleet_gw.plan_fleet)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from gw.mergeability import agreement, outcome_distances, pair_outcome, shortlist
from infra.manifest import load_manifest
from infra.storage import open_store
from workers.consolidate import MergeConfig
from workers.fleet_gw import plan_fleet
from workers.pair_jobs import measure_pairs, outcomes, trial_config

# -- agreement ---------------------------------------------------------------------------------------


def test_agreement_is_the_probability_overlap_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
    q = np.array([[0.5, 0.4, 0.1], [0.5, 0.5, 0.0]])
    # row 1: min = 0.5 + 0.2 + 0.1 = 0.8; row 2: 0.0 + 0.5 + 0.0 = 0.5
    assert agreement(p, q, "multiclass") == pytest.approx(0.65)
    assert agreement(p, p, "multiclass") == pytest.approx(1.0)
    assert agreement(np.eye(3), np.roll(np.eye(3), 1, axis=1), "multiclass") == 0.0


def test_multilabel_agreement_averages_each_labels_closeness():
    p = np.array([[0.9, 0.1], [0.5, 0.5]])
    q = np.array([[0.6, 0.1], [0.5, 1.0]])
    assert agreement(p, q, "multilabel") == pytest.approx(np.mean([0.7, 1.0, 1.0, 0.5]))


@pytest.mark.parametrize("p, q", [(np.ones((2, 3)) / 3, np.ones((2, 2)) / 2), (np.zeros((0, 2)), np.zeros((0, 2))),
                                  (np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]))])
def test_agreement_rejects_mismatched_empty_or_non_finite_inputs(p, q):
    with pytest.raises(ValueError):
        agreement(p, q, "multiclass")


def test_pair_outcome_is_the_worse_member():
    assert pair_outcome({"a": 0.9, "b": 0.7}) == 0.7
    with pytest.raises(ValueError):
        pair_outcome({"a": 0.9})


# -- shortlist ---------------------------------------------------------------------------------------


def _clustered(n: int = 9, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    points = np.concatenate([rng.normal(c, 0.1, size=(n // 3, 2)) for c in ((0, 0), (5, 0), (0, 5))])
    D = np.linalg.norm(points[:, None] - points[None], axis=-1)
    return D, [f"s{i}" for i in range(len(points))]


def test_shortlist_takes_each_scorers_m_nearest_and_stays_within_m_times_n():
    D, ids = _clustered()
    pairs = shortlist(D, ids, m=2)
    assert len(pairs) <= 2 * len(ids) and pairs == sorted(pairs) and all(a < b for a, b in pairs)
    for i, name in enumerate(ids):
        nearest = {ids[j] for j in np.argsort(D[i])[1:3]}
        assert all(tuple(sorted((name, other))) in pairs for other in nearest)
    # m = 2 inside clusters of 3: every shortlisted pair lies within a cluster
    assert all(int(a[1:]) // 3 == int(b[1:]) // 3 for a, b in pairs)
    assert len(shortlist(D, ids, m=len(ids))) == len(ids) * (len(ids) - 1) // 2


def test_shortlist_skips_unknown_distances_breaks_ties_by_id_and_ignores_row_order():
    ids = ["c", "a", "b", "d"]
    D = np.ones((4, 4))
    np.fill_diagonal(D, 0)
    D[0, 3] = D[3, 0] = np.nan
    pairs = shortlist(D, ids, m=1)
    # every distance is 1: each scorer takes its first partner by id; c never gets d (unknown)
    assert pairs == [("a", "b"), ("a", "c"), ("a", "d")]
    perm = [1, 2, 0, 3]
    assert shortlist(D[np.ix_(perm, perm)], [ids[i] for i in perm], m=1) == pairs
    with pytest.raises(ValueError):
        shortlist(D, ids, m=0)
    with pytest.raises(ValueError):
        shortlist(D[:3, :3], ids, m=1)


def test_outcome_distances_leave_unmeasured_pairs_unknown():
    D = outcome_distances({("a", "b"): 0.9, ("b", "c"): 0.6}, ["a", "b", "c"])
    assert D[0, 1] == D[1, 0] == pytest.approx(0.1) and D[1, 2] == pytest.approx(0.4)
    assert np.isnan(D[0, 2]) and np.all(np.diag(D) == 0)
    with pytest.raises(ValueError, match="does not name"):
        outcome_distances({("a", "z"): 0.5}, ["a", "b"])


# -- the planners --------------------------------------------------------------------------------------


def test_measured_planner_groups_the_pairs_that_merge_best_not_the_gw_nearest():
    ids = ["a", "b", "c", "d"]
    gw = np.array([[0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1], [2, 2, 1, 0]], dtype=float)  # GW: {a,b}, {c,d}
    measured = {("a", "c"): 0.95, ("b", "d"): 0.9, ("a", "b"): 0.5, ("c", "d"): 0.4}
    assert sorted(plan_fleet(gw, ids, tau=None, tau_quantile=1.0, k=2).groups) == [("a", "b"), ("c", "d")]
    plan = plan_fleet(gw, ids, tau=None, tau_quantile=1.0, k=2, planner="measured", measured=measured)
    assert sorted(plan.groups) == [("a", "c"), ("b", "d")]
    # tau on the measured scale: pairs whose worse member agrees below 1 - tau never share a group
    strict = plan_fleet(gw, ids, tau=0.08, tau_quantile=1.0, k=2, planner="measured", measured=measured)
    assert strict.groups == (("a", "c"),) and set(strict.singletons) == {"b", "d"}
    with pytest.raises(ValueError, match="needs the trial merges"):
        plan_fleet(gw, ids, tau=None, tau_quantile=1.0, k=2, planner="measured")


def test_linkage_planner_and_unknown_planners():
    D, ids = _clustered()
    plan = plan_fleet(D, ids, tau=None, tau_quantile=1.0, k=3, planner="linkage")
    assert sorted(len(g) for g in plan.groups) == [3, 3, 3]
    assert all(len({int(m[1:]) // 3 for m in g}) == 1 for g in plan.groups)
    with pytest.raises(ValueError, match="planner must be"):
        plan_fleet(D, ids, tau=None, tau_quantile=1.0, k=3, planner="nearest")


def test_description_planner_packs_the_distances_it_is_given_and_never_groups_the_unknown():
    from workers.signals import unknown_note, unknown_to

    ids = ["a", "b", "c", "d", "e"]
    D = np.array([[0, .1, .9, .8, np.nan], [.1, 0, .7, .9, np.nan], [.9, .7, 0, .2, np.nan],
                  [.8, .9, .2, 0, np.nan], [np.nan] * 4 + [0]])  # e has no description
    plan = plan_fleet(D, ids, tau=None, tau_quantile=1.0, k=2, planner="description")
    assert sorted(plan.groups) == [("a", "b"), ("c", "d")] and plan.singletons == ("e",)
    assert unknown_to(D, ids) == ["e"] and unknown_to(np.where(np.isnan(D), 1.0, D), ids) == []
    assert unknown_note("description", ["e"]) == "description: no description for e"
    with pytest.raises(ValueError, match="resamples the GW features"):
        plan_fleet(D, ids, tau=None, tau_quantile=1.0, k=2, planner="description", resampled=[D])


def test_the_true_label_signal_is_signed_on_one_scale_where_agreement_is_not():
    """A merge that moves a member's answers toward its labels scores above 0 by true_label and below 1 by
    agreement; a multi-label member with confident labels agrees more than a 3-way one that moved as much."""
    from gw.gate import Evidence
    from gw.mergeability import true_label_change

    labels = np.array([0, 1, 2, 2])
    own = Evidence("multiclass", labels, np.array([[0.6, 0.2, 0.2], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6], [0.5, 0.2, 0.3]]))
    better = Evidence("multiclass", labels, np.array([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8],
                                                      [0.3, 0.2, 0.5]]))
    # per class (0, 1, 2): +0.2, +0.2, mean(+0.2, +0.2): each class weighs a third
    assert true_label_change(own, better) == pytest.approx(0.2)
    assert true_label_change(better, own) == pytest.approx(-0.2)
    assert agreement(own.probs, better.probs, "multiclass") == pytest.approx(0.8)
    on = np.array([[1, 0, 0, 0]] * 4)
    confident = Evidence("multilabel", on, np.array([[0.9, 0.02, 0.02, 0.02]] * 4))
    moved = Evidence("multilabel", on, np.array([[0.7, 0.02, 0.02, 0.02]] * 4))
    assert agreement(confident.probs, moved.probs, "multilabel") == pytest.approx(0.95)  # > 0.8, the same fall
    # class-balanced over (label, on/off) cells: the on-cell of label 0 fell 0.2, the four off-cells 0
    assert true_label_change(confident, moved) == pytest.approx(-0.2 / 4)


def test_the_trial_signal_is_checked_with_the_other_settings():
    from flows.config import ConsolidateConfig

    assert ConsolidateConfig(trial_signal="true_label").trial_signal == "true_label"
    with pytest.raises(ValueError, match=r"trial_signal must be one of \['agreement', 'true_label', 'refit'\], got 'f1'"):
        ConsolidateConfig(trial_signal="f1")


def test_the_shortlist_signal_is_checked_with_the_other_settings():
    from flows.config import ConsolidateConfig

    assert ConsolidateConfig(shortlist_by="task_vector").shortlist_by == "task_vector"
    assert ConsolidateConfig(shortlist_by="cka").shortlist_by == "cka"
    assert ConsolidateConfig(shortlist_by="description").shortlist_by == "description"
    with pytest.raises(ValueError,
                       match=r"shortlist_by must be one of \['gw', 'task_vector', 'cka', 'description'\], got 'cca'"):
        ConsolidateConfig(shortlist_by="cca")


# -- trial merges on a tiny fleet ------------------------------------------------------------------------


def test_trial_config_is_the_method_at_its_defaults_with_own_heads():
    cheap = trial_config(MergeConfig(method="tsv_m", grid=None, refit_heads=True, seed=3))
    assert (cheap.method, cheap.candidates(), cheap.refit_heads, cheap.seed) == ("tsv_m", [{}], False, 3)


def test_trial_merges_are_measured_on_train_and_validation_and_cached_by_content(tmp_path, tiny_fleet_dir):
    root = tmp_path / "fleet"
    shutil.copytree(tiny_fleet_dir, root)
    store = open_store(str(root))
    pairs = [("circuits-1", "circuits-2"), ("circuits-2", "plants-1"), ("circuits-1", "plants-1")]
    first = measure_pairs(store, pairs, MergeConfig(), use_ray=False)
    assert (first["computed"], first["reused"]) == (3, 0)
    manifest = load_manifest(store)
    for record in first["pairs"]:
        assert 0.0 <= record["outcome"]["agreement"] <= 1.0
        for signal in ("agreement", "true_label", "refit"):  # one merge, every signal: the worse member's
            assert record["outcome"][signal] == min(record[signal].values())
            assert -1.0 <= record["outcome"][signal] <= 1.0
        for item in record["pair"]:
            splits = store.read_table(manifest.scorer(item).responses).column("split").to_pylist()
            assert record["n"][item] == sum(s in ("train", "validation") for s in splits)  # never test
    again = measure_pairs(store, [tuple(reversed(p)) for p in pairs], MergeConfig(), use_ray=False)
    assert (again["computed"], again["reused"]) == (0, 3) and outcomes(again) == outcomes(first)
    assert outcomes(first, "true_label") == {tuple(r["pair"]): r["outcome"]["true_label"] for r in first["pairs"]}
    with pytest.raises(ValueError, match="trial signal must be one of"):
        outcomes(first, "macro_f1")
    # One scorer changes: only its pairs are measured again.
    shutil.copy(root / "scorers" / "circuits-1" / "model.safetensors", root / "scorers" / "plants-1" / "model.safetensors")
    changed = measure_pairs(store, pairs, MergeConfig(), use_ray=False)
    assert (changed["computed"], changed["reused"]) == (2, 1)
    with pytest.raises(ValueError, match="two or more different scorers"):
        measure_pairs(store, [("circuits-1", "circuits-1")], MergeConfig(), use_ray=False)


def test_a_trio_whose_own_merge_fails_the_pairs_threshold_keeps_its_best_pair():
    from gw.mergeability import split_weak_groups

    pairs = {("a", "b"): 0.95, ("a", "c"): 0.9, ("b", "c"): 0.92, ("d", "e"): 0.9}
    groups = [("a", "b", "c"), ("d", "e"), ("c2", "f", "g")]
    trios = {("a", "b", "c"): 0.7, ("c2", "f", "g"): 0.97}
    kept, split = split_weak_groups(groups, trios, pairs, tau=0.2)  # keep a group while 1 - outcome < 0.2
    assert kept == [("a", "b"), ("d", "e"), ("c2", "f", "g")] and split == {("a", "b", "c"): ("a", "b")}
    assert split_weak_groups(groups, trios, pairs, tau=0.5)[1] == {}


def test_measured_plan_after_the_group_check():
    from gw.plan import Plan
    from workers.fleet_gw import check_planned_groups

    ids = ["a", "b", "c", "d"]
    measured = {("a", "b"): 0.95, ("a", "c"): 0.9, ("b", "c"): 0.92}
    plan = Plan((("a", "b", "c"),), ("d",), "milp", tau=0.2, objective=0.0)
    checked, split = check_planned_groups(plan, ids, measured, {("a", "b", "c"): 0.6})
    assert checked.groups == (("a", "b"),) and set(checked.singletons) == {"c", "d"}
    assert checked.method == "milp+group-check" and split == {"a+b+c": ["a", "b"]}
    assert checked.objective == pytest.approx(0.2 - 0.05)
    assert check_planned_groups(plan, ids, measured, {("a", "b", "c"): 0.9}) == (plan, {})


def test_keying_many_pairs_hashes_each_checkpoint_once(tiny_fleet_dir, monkeypatch):
    import workers.group_jobs as group_jobs
    from workers.pair_jobs import pair_key

    store = open_store(str(tiny_fleet_dir))
    seen = []
    real = group_jobs.checkpoint_hash
    monkeypatch.setattr(group_jobs, "checkpoint_hash", lambda s, ref: seen.append(ref) or real(s, ref))
    pairs = [("circuits-1", "circuits-2"), ("circuits-2", "plants-1"), ("circuits-1", "plants-1")]
    manifest, hashes = load_manifest(store), {}
    batched = [pair_key(store, p, MergeConfig(), manifest=manifest, hashes=hashes) for p in pairs]
    assert len(seen) == 4  # three scorers and the base, not three per pair
    assert batched == [pair_key(store, p, MergeConfig()) for p in pairs]  # the same keys as one at a time
