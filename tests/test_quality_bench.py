"""The quality benchmark's pure pieces: the module plan at given sizes and the paired statistics."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _quality_report import _acceptance_needed  # noqa: E402
from _quality_stats import fleet_summary, paired_comparison, sign_test, storage  # noqa: E402

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
