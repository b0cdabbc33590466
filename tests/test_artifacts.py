"""The run's artifacts read at a glance: words for gate decisions, rounded figures, one summary page."""
from __future__ import annotations

from flows.artifacts import HEATMAP_MAX_INCHES, _decision, heatmap_png, plan_ordered, plan_rows, run_markdown


def _record(members, accepted, reason="merged: every member passed (no member's macro F1 fell)"):
    return {"members": members, "accepted": accepted, "gate": {"reason": reason}}


def test_gate_decisions_in_words():
    assert _decision(_record(["a", "b", "c"], ["a", "b", "c"])) == "merged whole"
    assert _decision(_record(["a", "b", "c"], ["a", "c"])) == "fallback pair a + c (b on own scorer)"
    assert _decision(_record(["a", "b"], [])) == "kept on own scorers"


def test_plan_rows_round_and_name_singletons():
    planned = {"ids": ["a", "b", "c"], "matrix": [[0, 0.123456, 0.5], [0.123456, 0, 0.7], [0.5, 0.7, 0]],
               "plan": {"groups": [["a", "b"]], "singletons": ["c"], "method": "matching",
                        "tau": 0.6105666790571508, "objective": 0.1234567, "stability": None}}
    rows, description = plan_rows(planned)
    assert rows[0] == {"group": "a + b", "size": 2, "largest GW distance": 0.123}  # no empty stability column
    assert rows[1]["group"] == "c (on its own)"
    assert description == "plan (gw planner, matching): τ = 0.611, objective 0.123; 1 groups, 1 items on their own"


def test_plan_rows_show_gw_and_the_measured_outcome_side_by_side():
    planned = {"ids": ["a", "b", "c", "d"], "matrix": [[0, 0.2, 0.3, 0.9], [0.2, 0, 0.4, 0.9], [0.3, 0.4, 0, 0.9],
                                                       [0.9, 0.9, 0.9, 0]],
               "plan": {"groups": [["a", "b", "c"]], "singletons": ["d"], "method": "milp", "tau": 0.2,
                        "objective": 0.5, "planner": "measured"},
               "measured": [["a", "b", 0.91234], ["a", "c", 0.876], ["b", "c", 0.95], ["c", "d", 0.5]]}
    rows, description = plan_rows(planned)
    assert rows[0] == {"group": "a + b + c", "size": 3, "largest GW distance": 0.4, "trial-merge agreement": 0.876}
    assert description.startswith("plan (measured planner, milp)") and description.endswith("4 pairs trial-merged")
    # the trio's own trial merge, when there is one, is what the row shows
    planned["measured"].append(["a", "b", "c", 0.8])
    planned["plan"]["split"] = {"x+y+z": ["x", "y"]}
    rows, description = plan_rows(planned)
    assert rows[0]["trial-merge agreement"] == 0.8
    assert description.endswith("4 pairs trial-merged; 1 planned groups split after their own trial merge")
    planned["plan"]["trial_signal"] = "true_label"  # the column says which signal the outcome is
    assert plan_rows(planned)[0][0]["trial-merge true-label change"] == 0.8


def test_run_summary_lists_groups_changes_and_what_was_set_aside():
    summary = {"run_id": "r1", "storage": {"bytes_before": 8_000_000, "bytes_after": 3_000_000, "ratio": 2.667,
                                           "n_backbones": 3, "n_items": 8},
               "items": [{"item": f"i{n}", "backbone": "own scorer", "test_macro_f1_before": 0.5,
                          "test_macro_f1_after": 0.5 + d} for n, d in enumerate([-0.2, 0.0, 0.1, 0.3])],
               "set_aside": {"bad": ["scorers/bad/model.safetensors: not a safetensors file"]},
               "computed": {"features": 8, "pairs": 28, "merges": 3}, "reused": {"features": 0, "pairs": 0, "merges": 0},
               "seconds": {"total": 12.345}, "driver_peak_rss_mb": {"validate": 612.0, "publish": 1234.4}}
    page = run_markdown(summary, [_record(["i0", "i1", "i2"], ["i0", "i2"], "the group failed (i1: ...)")])
    assert "8.0 MB → 3.0 MB (2.667x smaller)" in page
    assert "| i0 + i1 + i2 | fallback pair i0 + i2 (i1 on own scorer) | the group failed (i1: ...) |" in page
    assert "| i0 | 0.500 | 0.300 | -0.200 |" in page and "| i3 | 0.500 | 0.800 | +0.300 |" in page
    assert "**bad**: scorers/bad/model.safetensors: not a safetensors file" in page
    assert "8 features, 28 pairs, 3 merges" in page and "total 12.3" in page
    assert "Driver peak memory: 1,234 MB." in page


def test_the_heatmap_shows_the_plan_as_blocks_on_a_canvas_that_does_not_grow_with_the_fleet():
    planned = {"ids": ["a", "b", "c", "d"], "plan": {"groups": [["d", "b"]]},
               "matrix": [[0, 1, 2, 3], [1, 0, 4, 5], [2, 4, 0, 6], [3, 5, 6, 0]]}
    matrix, ids = plan_ordered(planned)
    assert ids == ["d", "b", "a", "c"] and matrix[0] == [0, 5, 3, 6] and matrix[1][0] == 5
    import struct

    for n in (5, 500):
        big = [[abs(i - j) / n for j in range(n)] for i in range(n)]
        big[0][1] = big[1][0] = float("nan")  # not shortlisted
        png = heatmap_png(big, [f"item-{i}" for i in range(n)])
        width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and width <= HEATMAP_MAX_INCHES * 90 and height <= width


def test_plan_rows_of_the_description_planner_show_its_distances_beside_gw():
    planned = {"ids": ["a", "b", "c"], "matrix": [[0, 0.2, 0.5], [0.2, 0, 0.7], [0.5, 0.7, 0]],
               "description_matrix": [[0, 0.0412, None], [0.0412, 0, None], [None, None, 0]],
               "plan": {"groups": [["a", "b"]], "singletons": ["c"], "method": "matching", "tau": 0.05,
                        "objective": 0.01, "planner": "description"}}
    rows, description = plan_rows(planned)
    assert rows[0] == {"group": "a + b", "size": 2, "largest GW distance": 0.2, "largest description distance": 0.0412}
    assert description.startswith("plan (description planner, matching): τ = 0.05")
