"""Benchmark: merging a MiniLM-L6 trio with gw.merge — TA, TIES and DOGE speed, and peak memory.

The trio is three MiniLM-L6 scorers built by the fleet builder into a git-ignored cache
(bench/_trio.py; demo district, FinetuneConfig(epochs=3): benchmark weights, not tuned scorers). Inputs
are backbone state dicts (base + 3 fine-tunes, ~90 MB each in float32), loaded once.

Figures (the last line of stdout is one JSON object):
  ta_seconds, ties_seconds, doge_seconds   median wall time of `--repeats` runs (DOGE: `--doge-repeats`,
                                           400 Adam steps), TA and TIES interleaved back to back
  copy_bandwidth_gbps                      (bytes read + bytes written) per second of `dst.copy_(src)`
                                           on float32 tensors as large as TIES's traffic counted below,
                                           median of `--repeats`, same threads, same run
  ties_bandwidth_fraction                  ((N task vectors read + 1 result written) bytes / ties_seconds)
                                           / copy_bandwidth; N = 3, each the size of one backbone.
                                           (The base is read too, and TIES reads everything twice: the
                                           exact thresholds need their own pass; those bytes are not
                                           counted.) ta_bandwidth_fraction is the same for TA, the ceiling.
  peak_rss_over_inputs                     per method, in a fresh subprocess: (input bytes + peak RSS
                                           during the merge − RSS just before it) / input bytes, i.e. the
                                           memory the merge needs at its peak, inputs included, over the
                                           inputs (base + N models). The peak is the kernel's high-water
                                           mark (VmHWM) after resetting it (/proc/self/clear_refs "5"), or,
                                           where that is refused, RSS polled every millisecond by a thread.
                                           The headline value is the worst method.

    .venv/bin/python bench/merge.py [--repeats 7] [--doge-repeats 3] [--threads 1] [--cache DIR]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _trio import DEFAULT_CACHE, TRIO_NOTE, ensure_trio  # noqa: E402  (sets the offline env, OMP passive)
from _util import PeakRSS, rss_bytes  # noqa: E402

import torch  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()

from gw.merge import merge  # noqa: E402
from workers.scorer_io import load_backbone_state  # noqa: E402

TARGETS = {"ties_bandwidth_fraction": 0.2, "doge_seconds": 60.0, "peak_rss_over_inputs": 2.0}
METHODS = ("task_arithmetic", "ties", "doge")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_inputs(cache: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[str]]:
    """Base and fine-tuned backbones of the trio, as anonymous-memory tensors (clones, not file maps).

    The base checkpoint stores `embeddings.position_ids` (a buffer) that checkpoints saved by current
    transformers omit: base keys that no fine-tune has and that are not floating point are dropped.
    """
    store, manifest, _ = ensure_trio(cache, log=log)
    root = Path(store.uri_for(manifest.base_model)).parent
    finetuned = [load_backbone_state(root / spec.checkpoint) for spec in manifest.scorers]
    base = load_backbone_state(root / manifest.base_model)
    dropped = [k for k, v in base.items() if k not in finetuned[0] and not v.is_floating_point()]
    base = {k: v.clone() for k, v in base.items() if k not in dropped}
    finetuned = [{k: v.clone() for k, v in model.items()} for model in finetuned]
    gc.collect()
    return base, finetuned, dropped


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def median_seconds(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def copy_bandwidth(nbytes: int, repeats: int) -> tuple[float, list[float]]:
    """(read + written) bytes per second of a float32 tensor copy moving `nbytes` in all."""
    numel = nbytes // 8  # half is read, half written
    src, dst = torch.ones(numel), torch.zeros(numel)  # both touched: no page faults in the timing
    times = median_seconds(lambda: dst.copy_(src), repeats)
    return 2 * numel * 4 / statistics.median(times), times


# ---- peak memory, one fresh process per method ----------------------------------------------------


def _hwm_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_memory(method: str, cache: Path, threads: int) -> dict:
    """Run one merge in this (fresh) process and report its peak memory over its inputs."""
    torch.set_num_threads(threads)
    base, finetuned, _ = load_inputs(cache)
    input_bytes = state_bytes(base) + sum(state_bytes(m) for m in finetuned)
    params = {}
    gc.collect()
    before = rss_bytes()
    if _reset_peak():
        how = "VmHWM after clear_refs"
        result = merge(method, base, finetuned, **params)
        peak = max(_hwm_bytes(), rss_bytes())
    else:
        how = "RSS polled every 1 ms"
        with PeakRSS() as poller:
            result = merge(method, base, finetuned, **params)
        peak = poller.peak
    output_bytes = state_bytes(result.state_dict)
    added = max(peak - before, 0)
    return {"method": method, "input_bytes": input_bytes, "output_bytes": output_bytes, "rss_before": before,
            "peak_added_bytes": added, "peak_over_inputs": round((input_bytes + added) / input_bytes, 3), "how": how}


def measure_memory(method: str, cache: Path, threads: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child-memory", method, "--cache", str(cache),
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of TA, TIES and the copy (median)")
    parser.add_argument("--doge-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: on a shared 2-core box two threads are slower)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the trio is built and reused")
    parser.add_argument("--skip-doge", action="store_true", help="leave DOGE out (quick runs)")
    parser.add_argument("--child-memory", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 3 or args.doge_repeats < 1:
        parser.error("--repeats must be at least 3 and --doge-repeats at least 1")
    if args.child_memory:
        report = child_memory(args.child_memory, args.cache, args.threads)
        print(json.dumps(report))
        return report

    torch.set_num_threads(args.threads)
    base, finetuned, dropped = load_inputs(args.cache)
    n_models = len(finetuned)
    model_bytes = state_bytes(base)
    input_bytes = model_bytes * (n_models + 1)
    counted_bytes = (n_models + 1) * model_bytes  # N task vectors read + 1 result written

    log("warming up (one merge of each kind)")
    merge("task_arithmetic", base, finetuned)
    ties_info = merge("ties", base, finetuned).info
    ta_times, ties_times = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        ta_times += median_seconds(lambda: merge("task_arithmetic", base, finetuned), 1)
        ties_times += median_seconds(lambda: merge("ties", base, finetuned), 1)
    bandwidth, copy_times = copy_bandwidth(counted_bytes, args.repeats)
    ta_seconds, ties_seconds = statistics.median(ta_times), statistics.median(ties_times)
    torch.set_num_threads(DEFAULT_THREADS)  # for comparison: torch's own thread count on this machine
    ties_default_threads = statistics.median(median_seconds(lambda: merge("ties", base, finetuned), args.repeats))
    torch.set_num_threads(args.threads)
    log(f"TA {ta_seconds:.3f} s, TIES {ties_seconds:.3f} s, copy {bandwidth / 1e9:.1f} GB/s")

    doge_times, doge_info = [], {}
    if not args.skip_doge:
        for index in range(args.doge_repeats):
            started = time.perf_counter()
            doge_info = merge("doge", base, finetuned).info
            doge_times.append(time.perf_counter() - started)
            log(f"DOGE run {index + 1}: {doge_times[-1]:.1f} s")

    memory = {}
    for method in METHODS if not args.skip_doge else METHODS[:2]:
        memory[method] = measure_memory(method, args.cache, args.threads)
        log(f"memory {method}: {memory[method]['peak_over_inputs']}x inputs ({memory[method]['how']})")
    worst = max(memory.values(), key=lambda m: m["peak_over_inputs"])

    ties_rate = counted_bytes / ties_seconds
    report = {
        "trio": TRIO_NOTE,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "model_bytes": model_bytes,
        "input_bytes": input_bytes,
        "base_keys_dropped": dropped,
        "repeats": args.repeats,
        "ta_seconds": round(ta_seconds, 4),
        "ties_seconds": round(ties_seconds, 4),
        "ties_seconds_all": [round(t, 4) for t in ties_times],
        "ties_over_ta": round(ties_seconds / ta_seconds, 2),
        "ties_seconds_with_default_threads": {"threads": DEFAULT_THREADS, "seconds": round(ties_default_threads, 4)},
        "copy_bandwidth_gbps": round(bandwidth / 1e9, 2),
        "copy_seconds_median": round(statistics.median(copy_times), 5),
        "ties_counted_bytes": counted_bytes,
        "ties_gbps": round(ties_rate / 1e9, 3),
        "ties_bandwidth_fraction": round(ties_rate / bandwidth, 4),
        "ta_bandwidth_fraction": round(counted_bytes / ta_seconds / bandwidth, 4),
        "ties_threshold_method": ties_info.get("threshold_method"),
        "ties_passes_over_inputs": ties_info.get("passes_over_inputs"),
        "doge_seconds": round(statistics.median(doge_times), 2) if doge_times else None,
        "doge_seconds_all": [round(t, 2) for t in doge_times],
        "doge_steps": len(doge_info.get("loss_curve", [])) - 1 if doge_info else None,
        "peak_rss_over_inputs": worst["peak_over_inputs"],
        "peak_rss_over_inputs_by_method": {m: r["peak_over_inputs"] for m, r in memory.items()},
        "peak_added_mb_by_method": {m: round(r["peak_added_bytes"] / 1e6, 1) for m, r in memory.items()},
        "memory_measure": worst["how"] + ", fresh subprocess per method",
        "targets": TARGETS,
    }
    report["meets_targets"] = {
        "ties_bandwidth_fraction": report["ties_bandwidth_fraction"] >= TARGETS["ties_bandwidth_fraction"],
        "doge_seconds": report["doge_seconds"] is not None and report["doge_seconds"] <= TARGETS["doge_seconds"],
        "peak_rss_over_inputs": report["peak_rss_over_inputs"] <= TARGETS["peak_rss_over_inputs"],
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
