"""The quality benchmark's pure pieces: the module plan at given sizes and the paired statistics."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _quality_report import _acceptance_needed  # noqa: E402
from _quality_stats import against_random_partitions, fleet_summary, paired_comparison, sign_test, storage  # noqa: E402

from gw.baselines import module_plan  # noqa: E402


def test_module_plan_groups_within_modules_and_pools_leftovers():
    modules = {f"a{i}": "A" for i in range(7)} | {f"b{i}": "B" for i in range(4)} | {"c0": "C"}
    plan = module_plan(modules, [3, 3, 3, 2])
    groups = [tuple(g) for g in plan.groups]
    assert sorted(groups) == sorted([("a0", "a1", "a2"), ("a3", "a4", "a5"), ("b0", "b1", "b2"), ("a6", "b3")])
    assert set(plan.singletons) == {"c0"}
    # A size that no module can fill is filled from the leftovers of all modules.
    assert sorted(map(len, module_plan(modules, [3, 3, 3, 3]).groups)) == [3, 3, 3, 3]


def test_module_plan_errors():
    with pytest.raises(ValueError, match="sizes"):
        module_plan({"a": "A", "b": "A"}, [3])
    with pytest.raises(ValueError, match="not in ids"):
        module_plan({"a": "A", "z": "A"}, [2], ids=["a", "b"])


def test_sign_test_matches_the_binomial():
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(3, 3) == 1.0
    assert sign_test(1, 9) == pytest.approx(2 * (1 + 10) / 1024)


def test_paired_comparison_counts_and_interval():
    ours = {"a": 0.9, "b": 0.8, "c": 0.5}
    theirs = {"a": 0.7, "b": 0.8, "c": 0.6}
    out = paired_comparison(ours, theirs, {"a": 2, "b": 1, "c": 1}, n_boot=2000)
    assert (out["wins"], out["losses"], out["ties"]) == (1, 1, 1)
    assert out["mean_diff"] == pytest.approx((2 * 0.2 + 0 - 0.1) / 4, abs=1e-4)
    assert out["ci95"][0] <= out["mean_diff"] <= out["ci95"][1]


def test_a_plan_against_random_partitions_by_hand():
    out = against_random_partitions(0.56, [0.50, 0.52, 0.54, 0.58])
    # one random partition reaches 0.56: (1 + 1) / (4 + 1); mean 0.535, sd sqrt(0.00113...) = 0.03416
    assert (out["random_reaching"], out["empirical_p"]) == (1, 0.4)
    assert out["t"] == pytest.approx(0.025 / (0.034157 * (1.25 ** 0.5)), abs=0.01)
    assert 0.2 < out["t_p"] < 0.3  # Student's t, 3 degrees of freedom, one-sided
    above_all = against_random_partitions(0.60, [0.50, 0.52, 0.54, 0.58])
    assert above_all["empirical_p"] == 0.2 and above_all["t_p"] < out["t_p"]
    with pytest.raises(ValueError, match="two or more"):
        against_random_partitions(0.5, [0.4])


def test_fleet_summary_micro_f1_pools_answers_and_storage_ratio():
    per_item = {"a": {"accuracy": 1.0, "macro_f1": 1.0, "qwk": float("nan"), "n": 1},
                "b": {"accuracy": 0.5, "macro_f1": 0.4, "qwk": 0.2, "n": 3}}
    out = fleet_summary(per_item, {"a": [1], "b": [0, 1, 1]}, {"a": [1], "b": [0, 0, 0]})
    assert out["micro_f1"] == pytest.approx(2 / 4)
    assert out["macro_f1"] == pytest.approx((1.0 + 3 * 0.4) / 4, abs=1e-4)
    assert out["qwk"] == pytest.approx(0.2)
    s = storage(n_items=6, n_backbones=2, backbone_bytes=100, head_bytes=1)
    assert s["ratio"] == pytest.approx(606 / 206, abs=1e-3)
    assert not math.isnan(s["ratio"])


def test_acceptance_needed_solves_the_expected_loss():
    # Two trios may lose half a member in expectation: 2 (1 - a^3) = 0.5.
    assert _acceptance_needed([3, 3], 0.5) == pytest.approx(0.75 ** (1 / 3), abs=1e-9)
    assert _acceptance_needed([2, 3], 0.0) == pytest.approx(1.0)


def _mergeability():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mergeability

    return mergeability


def test_mergeability_correlations_rank_a_monotone_predictor_first():
    import numpy as np

    bench = _mergeability()
    ids = [f"s{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    truth = rng.random((8, 8))
    truth = (truth + truth.T) / 2
    measured = {(a, b): float(truth[i, j]) for i, a in enumerate(ids) for j, b in enumerate(ids) if i < j}
    noise = rng.random((8, 8))
    out = bench.correlations({"exact": truth ** 3, "noise": (noise + noise.T) / 2, "inverse": -truth},
                             measured, ids, draws=100)
    assert out["exact"]["spearman"] == 1.0 and out["inverse"]["spearman"] == -1.0
    assert out["exact"]["ci95"][0] > 0.9 and out["exact"]["n_pairs"] == 28
    assert abs(out["noise"]["spearman"]) < 0.6 and out["noise"]["ci95"][0] < out["noise"]["spearman"] < out["noise"]["ci95"][1]


def test_mergeability_default_planner_is_chosen_on_validation_not_test():
    bench = _mergeability()

    def row(test, validation):
        return {"macro_f1": test, "validation_macro_f1": validation, "backbones": 20, "planned_backbones": 16,
                "storage_ratio": 2.0, "per_item_macro_f1": {"a": test, "b": test}}

    rows = {"measured": row(0.50, 0.70), "gw": row(0.60, 0.60), "linkage": row(0.55, 0.50), "module": row(0.5, 0.5),
            "description": row(0.5, 0.5), "random0": row(0.4, 0.4), "random1": row(0.45, 0.45),
            "premerge": row(0.5, 0.5)}
    folds = [{"fold": 0, "rows": rows, "test_sizes": {"a": 10, "b": 20}}]
    combined = bench.combine(folds, random_seeds=2)
    assert combined["default_planner"] == "measured"  # best validation, though gw is best on test
    assert combined["plans"]["random"]["macro_f1"] == 0.425
    assert combined["paired"]["default vs random"]["mean_diff"] == pytest.approx(0.075)
    assert "default vs measured" not in combined["paired"] and "default vs gw" in combined["paired"]
    # the plans at equal group sizes against chance too (does any grouping beat a random one?)
    assert combined["paired"]["description vs random"]["mean_diff"] == pytest.approx(0.075)
    assert combined["paired"]["module vs random"]["mean_diff"] == pytest.approx(0.075)
    # a setting of the measured planner is a product plan too, and is compared with the first measured planner
    rows["measured/true_label"] = row(0.48, 0.75)
    combined = bench.combine(folds, random_seeds=2)
    assert combined["default_planner"] == "measured/true_label"
    assert combined["paired"]["measured/true_label vs measured"]["mean_diff"] == pytest.approx(-0.02)
    assert {"default vs measured", "default vs gw", "default vs module"} <= set(combined["paired"])
    # defaults.md names the chosen setting and says so when the shipped one differs
    import _quality_report

    result = combined | {"folds": 1, "folds_run": [0]}
    row_text = _quality_report.planner_row({}, result, lambda c: "cmp", lambda c: "q")
    assert row_text.startswith(f"| planner | {bench.shipped_plan().removeprefix('planner/')} | measured/true_label − each other plan")
    assert "measured/true_label 0.750" in row_text and "− measured: cmp" in row_text
    agrees = row_text.endswith("against random: q |") and "update flows/config.py" not in row_text
    assert agrees == (bench.shipped_plan() == "measured/true_label")


def test_mergeability_default_is_picked_for_each_fold_on_the_other_folds():
    bench = _mergeability()
    items = [f"i{n}" for n in range(6)]

    def row(test: float, validation: float = 0.6):
        return {"macro_f1": test, "validation_macro_f1": validation, "backbones": 20, "planned_backbones": 16,
                "storage_ratio": 2.0, "per_item_macro_f1": {i: test for i in items}}

    # test macro F1 per fold: gw is best on folds 1 and 2, description on fold 0 and over all three
    figures = {"measured": (0.50, 0.50, 0.50), "gw": (0.40, 0.56, 0.56), "planner/description": (0.70, 0.52, 0.53)}
    folds = [{"fold": k, "test_sizes": {i: 10 for i in items},
              "rows": {**{name: row(f[k], validation=0.7 if name == "measured" else 0.6) for name, f in figures.items()},
                       "module": row(0.5), "description": row(0.5), "random0": row(0.45), "premerge": row(0.4)}}
             for k in range(3)]
    combined = bench.combine(folds, random_seeds=1)
    choice = combined["default_choice"]
    # fold 0 is picked on folds 1 and 2 (gw 0.56 against description 0.525); folds 1 and 2 on the others
    assert choice["picks"] == ["gw", "planner/description", "planner/description"]
    assert choice["planner"] == "planner/description" == combined["default_planner"]  # 0.583 over all three
    assert choice["others_mean"][0]["gw"] == pytest.approx(0.56)
    # the default row is each fold's figure of the plan picked without it, not the chosen plan's own
    default = combined["plans"]["default"]
    assert default["macro_f1_by_fold"] == [0.40, 0.52, 0.53] and default["macro_f1"] == pytest.approx(0.4833, abs=1e-4)
    assert default["planner"] == "planner/description"
    assert combined["paired"]["default vs random"]["mean_diff"] == pytest.approx(0.4833 - 0.45, abs=1e-4)
    # one fold: nothing to nest, the best validation mean
    single = bench.combine(folds[:1], random_seeds=1)["default_choice"]
    assert single["planner"] == "measured" and single["picks"] == ["measured"]
    import _mergeability_report

    text = "\n".join(_mergeability_report.default_choice_section(combined | {"by_fold": folds}))
    assert "| 0 | gw | 0.560 | description planner (set packing on description distances) 0.525 | 0.400 |" in text
    assert "the picks differ across folds" in text


def test_mergeability_resumes_an_earlier_result_and_adds_only_the_plans_it_lacks(tmp_path):
    bench = _mergeability()
    args = type("Args", (), {"plans": [], "random_seeds": 1, "predictor_plans": False, "folds": 3})()
    wanted = bench.wanted_plans(args)
    assert wanted[0] == "measured" and {"gw", "module", "description", "random0", "measured/cka"} <= set(wanted)
    earlier = {"fold": 0, "rows": {"measured": {}, "premerge": {}}, "plans": {"measured": [["a", "b"]]},
               "predictor_seconds": {"gw_l-3_cls": 3.0, "description": 1.0, "cka_probe": 79.0},
               "correlation": {"cka_probe": {"spearman": 0.4}}, "outcomes": [["a", "b", 0.9]], "pairs_total": 1}
    pairs_cache = bench.fold_dir(tmp_path, 3, 0) / bench.PAIRS_CACHE
    cached = bench.resumed(earlier, tmp_path, args)
    # the rows keep the plans; the every-pair correlations and outcomes go with the pairs cache, but only
    # pairs measured with every trial signal: an older result's pairs are measured again
    assert "correlation" not in cached and "outcomes" not in cached
    assert not pairs_cache.exists()
    earlier |= {"correlation_by_signal": {"refit": {"cka_probe": {"spearman": 0.2}}}, "trial_signal": "agreement"}
    bench.resumed(earlier, tmp_path, args)
    pairs = json.loads(pairs_cache.read_text())
    assert pairs["correlation"] == earlier["correlation"] and pairs["outcomes"] == earlier["outcomes"]
    assert pairs["correlation_by_signal"] == earlier["correlation_by_signal"]
    # a measured setting's row without per-item validation is gated again (not replanned); the plans at equal
    # group sizes are drawn again when they were drawn at another plan's sizes
    assert not bench.complete("measured", cached) and bench.complete("gw", {"rows": {"gw": {}}})
    assert bench.complete("module", {"rows": {"module": {}}, "sized_to": bench.shipped_plan()})
    assert not bench.complete("random0", {"rows": {"random0": {}}, "sized_to": "an older default"})
    # ... unless that plan's sizes are the shipped plan's
    older = {"rows": {"random0": {}}, "sized_to": "older", "plans": {"older": [["a", "b", "c"], ["d", "e"]],
                                                                      bench.shipped_plan(): [["d", "e"], ["a", "c", "f"]]}}
    assert bench.complete("random0", older)
    older["plans"][bench.shipped_plan()] = [["a", "b"], ["c", "d"]]
    assert not bench.complete("random0", older)
    assert bench.resumed(None, tmp_path, args) is None
    assert bench.shipped_plan() in bench.product_plans(wanted)


def test_frontier_setting_runs_the_products_jobs_and_counts_the_adapters(tiny_fleet_dir):
    """One frontier setting on the tiny fleet: ungated rows read the product's sweeps, gated rows its gate,
    and storage counts the kept adapters' float32 parameters."""
    import _frontier as frontier
    from quality_beetle import Fold, figures

    from infra.storage import open_store
    from workers.consolidate import MergeConfig

    fold = Fold(open_store(str(tiny_fleet_dir)), seed=0)
    single = [i for i in fold.ids if fold.manifest.scorer(i).task != "multilabel"]
    groups = [single[:3], single[3:5]] if len(single) >= 5 else [single[:2], single[2:4]]
    rows = {}
    for correction in (False, True):
        config = frontier.frontier_config("ties", correction, MergeConfig())
        assert config.candidates() == [{"lam": 1.0, "top_k": 0.2}]  # the grid's first candidate only
        rows[correction] = frontier.run_setting(fold, groups, config, figures)
    plain, corrected = rows[False], rows[True]
    assert plain["ungated"]["adapter_parameters"] == plain["gated"]["adapter_parameters"] == 0
    n = len(fold.ids)
    assert plain["ungated"]["backbones"] == n - sum(len(g) - 1 for g in groups)
    member = fold.consolidator.member(fold.manifest.scorer(fold.ids[0]))
    size = lambda state: sum(t.numel() * t.element_size() for t in state.values())  # noqa: E731
    expected = storage(n, corrected["ungated"]["backbones"], size(member.backbone), size(member.head),
                       4 * corrected["ungated"]["adapter_parameters"])["ratio"]
    assert corrected["ungated"]["storage_ratio"] == pytest.approx(expected)
    assert corrected["ungated"]["storage_ratio"] <= plain["ungated"]["storage_ratio"]
    assert corrected["gated"]["adapter_parameters"] <= corrected["ungated"]["adapter_parameters"]
    assert plain["gated"]["backbones"] >= plain["ungated"]["backbones"]
    assert len(plain["gated"]["decisions"]) == len(groups)

    premerge = figures(fold, {"items": fold.items({}), "groups": []})
    weights = {f"{f}:{i}": fold.own[i]["test"]["n"] for f in (0, 1) for i in fold.ids}
    name = frontier.setting_name("ties", 3, True)
    table = frontier.combine([{name: corrected}] * 2, [premerge] * 2, weights, paired_comparison)
    assert [(r["k"], r["correction"], r["gated"], r["folds"]) for r in table] == [(3, True, False, 2), (3, True, True, 2)]
    assert table[0]["macro_f1"] == pytest.approx(corrected["ungated"]["macro_f1"], abs=1e-4)
    assert table[0]["vs_premerge"]["mean_diff"] == pytest.approx(
        corrected["ungated"]["macro_f1"] - premerge["macro_f1"], abs=2e-3)


def test_frontier_report_names_the_best_storage_within_the_margin():
    from _quality_report import frontier_lines

    def row(k, correction, gated, ratio, f1):
        return {"method": "tsv_m", "k": k, "correction": correction, "gated": gated, "storage_ratio": ratio,
                "backbones": 47 / ratio, "macro_f1": f1, "adapter_parameters": 0, "seconds_per_group": 3.0,
                "vs_premerge": {"mean_diff": f1 - 0.5, "ci95": [-0.01, 0.01]}}

    result = {"frontier": [row(3, False, True, 2.9, 0.52), row(8, False, True, 5.5, 0.47), row(5, False, True, 4.4, 0.49),
                           row(16, True, True, 12.0, 0.49)],
              "frontier_settings": {"folds_run": [0, 1, 2], "premerge_macro_f1": 0.5, "note": "note"}}
    text = "\n".join(frontier_lines(result))
    assert "a group method alone, storage ≥ 4x: **met**; the most storage within the quality margin: TSV-M, k = 5, 4.40x" in text
    assert "with the per-item correction, storage ≥ 10x: **met**" in text
    assert text.count("| TSV-M |") == 4


def test_mergeability_report_shows_every_trial_signal_and_how_the_default_was_chosen():
    _mergeability()
    import _mergeability_report

    def corr(value):
        return {"spearman": value, "ci95": [value - 0.1, value + 0.1], "n_pairs": 3, "fold": 0}

    by_signal = {"agreement": {"cka_probe": corr(0.3), "same_module": corr(-0.4)},
                 "refit": {"cka_probe": corr(0.1), "same_module": corr(0.2)}}
    fold = {"fold": 0, "correlation": by_signal["agreement"], "correlation_by_signal": by_signal,
            "trial_signal": "agreement", "pairs_total": 3, "predictor_seconds": {"cka_probe": 33.0},
            "all_pairs_merge_seconds": 9.0, "shortlist_pairs": 2, "shortlist_merge_seconds": 6.0,
            "signal_agreement": {"agreement ~ refit": 0.25},
            "shortlist_finds_best_partner": {"agreement": 0.5, "refit": 1.0}}
    result = {"by_fold": [fold], "shortlist": 5, "n_items": 3}
    text = "\n".join(_mergeability_report.correlation_section(result, fold["correlation"]))
    assert "| predictor | agreement | refit true-label change |" in text and "over all 3 pairs" in text
    assert "| same module | -0.400 [-0.500, -0.300] | +0.200 [+0.100, +0.300] | 0 |" in text
    assert "agreement ~ refit +0.250" in text and "100 % of the scorers by refit true-label change" in text
    assert _mergeability_report.default_choice_section({"default_choice": {"planner": "measured"}}) == []
    # the plans from other predictors at equal group sizes are named by their predictor
    assert _mergeability_report._plan_label("sized/task_vector_cosine") == \
        "task-vector cosine (grouped at the default's sizes)"
    assert _mergeability_report._plan_label("measured/refit") == "measured (GW shortlist, refit true-label change)"
