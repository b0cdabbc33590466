"""Human-readable summaries of a consolidation run, for the terminal."""
from __future__ import annotations

from infra.publish import latest_run, read_manifest, run_prefix
from infra.storage import Store


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_summary(summary: dict) -> None:
    storage = summary["storage"]
    print(f"run {summary['run_id']}{'' if summary['republished'] else ' (nothing changed: still the published run)'}")
    if "planner" in summary:
        print(f"  planned by the {summary['planner']} planner"
              + (f" (not by description: {summary['fallback']})" if summary.get("fallback") else ""))
    print(f"  groups merged: {len(summary['groups'])}  " + "  ".join("+".join(g) for g in summary["groups"]))
    print(f"  kept individual: {', '.join(summary['individual']) or 'none'}")
    if summary["set_aside"]:
        for item, reasons in summary["set_aside"].items():
            print(f"  set aside {item}: {'; '.join(reasons)}")
    width = max([len(row["item"]) for row in summary["items"]] + [4]) + 2
    print(f"\n  {'item':<{width}}{'test macro F1 before':>20}{'after':>8}{'change':>9}   decision")
    for row in summary["items"]:
        before, after = row.get("test_macro_f1_before"), row.get("test_macro_f1_after")
        figures = (f"{before:>20.3f}{after:>8.3f}{after - before:>+9.3f}" if None not in (before, after)
                   else f"{'–':>20}{'–':>8}{'':>9}")
        print(f"  {row['item']:<{width}}{figures}   {row['decision']}")
    print(f"\n  storage: {megabytes(storage['bytes_before'])} -> {megabytes(storage['bytes_after'])} "
          f"({storage['ratio']}x smaller, {storage['n_backbones']} backbones for {storage['n_items']} items"
          f"{_adapters(storage)})")
    print(f"  computed {summary['computed']}, reused {summary['reused']}")
    print(f"  seconds: {summary['seconds']}")
    print(f"  published under {summary['store']}/published/{summary['run_id']}")
    first = summary["items"][0]["item"] if summary["items"] else "ITEM"
    print("\n  next:")
    print(f"    fleetmerge report {summary['run_id']} --store {summary['store']}    # groups, gate reasons, storage")
    print(f"    fleetmerge predict --published {summary['store']} --item {first} \"some answer\"")
    print("    the Prefect UI: `prefect server start`, then PREFECT_API_URL=http://127.0.0.1:4200/api for the next run")


def print_run(store: Store, run_id: str | None = None) -> None:
    run_id = run_id or latest_run(store)
    if run_id is None:
        raise ValueError(f"{store.uri}: nothing published yet")
    manifest = read_manifest(store, run_id)
    extra = manifest.get("extra", {})
    storage = extra.get("storage", {})
    print(f"run {run_id} at {store.uri_for(run_prefix(store, run_id))} (created {manifest.get('created_at')})")
    for name, items in sorted(extra.get("members", {}).items()):
        print(f"  {name:<40} {', '.join(items)}")
    for gate in extra.get("gate", []):
        print(f"  gate {'+'.join(gate['members'])}: {gate['reason']}")
    for item, reasons in extra.get("set_aside", {}).items():
        print(f"  set aside {item}: {'; '.join(reasons)}")
    if storage:
        print(f"  storage: {megabytes(storage['bytes_before'])} -> {megabytes(storage['bytes_after'])} ({storage['ratio']}x"
              f"{_adapters(storage)})")


def _adapters(storage: dict) -> str:
    """The per-item corrections' share of the storage, when the run has any."""
    n = storage.get("n_adapters", 0)
    return f"; {n} item corrections: {megabytes(storage['adapter_bytes'])}" if n else ""
