"""One config: the CLI's defaults are ConsolidateConfig's, and every merge setting reaches a group's cache key."""
from __future__ import annotations

import json

import pytest

from flows.cli import _consolidate_config, build_parser
from flows.config import ConsolidateConfig
from infra.manifest import MANIFEST_KEY


def _config(*argv: str) -> ConsolidateConfig:
    return ConsolidateConfig.from_dict(_consolidate_config(build_parser().parse_args(list(argv))))


@pytest.mark.parametrize("command", ["consolidate", "schedule", "distances", "plan"])
def test_cli_defaults_are_the_config_defaults(command):
    args = build_parser().parse_args([command, "--store", "X"])
    given = _consolidate_config(args)
    defaults = ConsolidateConfig().to_dict()
    assert given == {name: defaults[name] for name in given}
    assert args.fleet == MANIFEST_KEY
    if command in ("consolidate", "schedule"):
        assert set(given) == set(defaults)  # every setting of a run has its option


def test_cli_options_reach_the_config():
    assert _config("consolidate", "--store", "X", "--no-tuning", "--gate", "delta", "--no-refit", "--k", "2",
                   "--tau-quantile", "0.4", "--no-skip-by-bounds", "--layer", "-1", "--solver", "exact") == \
        ConsolidateConfig(grid=[], gate="delta", refit_heads=False, k=2, tau_quantile=0.4, skip_by_bounds=False,
                          layer=-1, solver="exact")
    assert _config("consolidate", "--store", "X", "--tuning").grid is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["consolidate", "--store", "X", "--gate", "nope"])


def test_config_refuses_what_it_does_not_know():
    with pytest.raises(ValueError, match="unknown consolidation setting"):
        ConsolidateConfig.from_dict({"extra": {}})
    with pytest.raises(ValueError, match="gate must be one of"):
        ConsolidateConfig(gate="nope")


def test_merge_config_carries_the_merge_settings():
    merge = ConsolidateConfig(method="dare", grid=[{"p": 0.5}], refit_heads=False, delta=0.05, gate="delta",
                              seed=3).merge_config()
    assert (merge.method, merge.grid, merge.refit_heads, merge.delta, merge.gate, merge.seed) == \
        ("dare", [{"p": 0.5}], False, 0.05, "delta", 3)


def test_every_grid_and_gate_is_its_own_merge_setting():
    from workers.consolidate import MergeConfig

    grids = (None, [], [{}], [{"lam": 1.0, "top_k": 0.2}])
    assert len({json.dumps(MergeConfig(grid=g).to_dict(), sort_keys=True) for g in grids}) == len(grids)
    assert MergeConfig(grid=({"lam": 1.0},)).to_dict() == MergeConfig(grid=[{"lam": 1.0}]).to_dict()
    assert MergeConfig(gate="delta").to_dict() != MergeConfig(gate="bound").to_dict()


def test_no_tuning_after_a_tuned_run_is_another_group(tiny_fleet_dir):
    from infra.storage import open_store
    from workers.group_jobs import group_key

    store = open_store(str(tiny_fleet_dir))
    members = ["circuits-1", "circuits-2"]
    configs = [_config("consolidate", "--store", str(tiny_fleet_dir)),
               _config("consolidate", "--store", str(tiny_fleet_dir), "--no-tuning"),
               ConsolidateConfig(grid=[{"lam": 1.0, "top_k": 0.2}])]
    keys = [group_key(store, members, c.merge_config()) for c in configs]
    assert len(set(keys)) == len(keys)
    assert group_key(store, members, configs[0].merge_config()) == keys[0]  # and the same config, the same key


def test_item_correction_options_reach_the_merge_config():
    config = _config("consolidate", "--store", "X", "--item-correction", "--correction-ranks", "8", "4")
    assert config.item_correction and config.correction_ranks == (8, 4)
    merge = config.merge_config()
    assert merge.item_correction and merge.correction_ranks == (4, 8)
    assert not _config("consolidate", "--store", "X").merge_config().item_correction
    # A JSON round trip (Prefect parameters) gives the same config.
    assert ConsolidateConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="correction_ranks"):
        ConsolidateConfig(correction_ranks=())


def test_the_description_planner_gives_way_to_its_fallback_on_a_fleet_it_cannot_plan():
    cfg = ConsolidateConfig()
    assert cfg.planner == "description" and cfg.for_described(2, 5, "f.yaml") == (cfg, None)
    fallen, note = cfg.for_described(1, 5, "f.yaml")
    assert fallen == ConsolidateConfig(planner="measured")
    assert note == ("1 of the 5 usable scorers in f.yaml have a description, and grouping by description needs two "
                    "or more: planned by the measured planner")
    with pytest.raises(ValueError, match=r"^--planner description: 0 of the 5 usable scorers in f.yaml .*another planner$"):
        ConsolidateConfig(fallback_planner=None).for_described(0, 5, "f.yaml")
    with pytest.raises(ValueError, match=r"^--shortlist-by description: 1 of the 5"):  # an explicit signal: no fallback
        ConsolidateConfig(planner="measured", shortlist_by="description").for_described(1, 5, "f.yaml")
    gw = ConsolidateConfig(planner="gw")
    assert gw.for_described(0, 5, "f.yaml") == (gw, None)  # it reads no description
    with pytest.raises(ValueError, match="fallback_planner must be one of"):
        ConsolidateConfig(fallback_planner="description")
    assert _config("consolidate", "--store", "X", "--fallback-planner", "none").fallback_planner is None
    assert _config("plan", "--store", "X", "--fallback-planner", "gw").fallback_planner == "gw"
