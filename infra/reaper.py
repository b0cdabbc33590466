"""Stop what a command started even when the command itself is killed (issue 13).

`fleetmerge consolidate` starts a local Ray (gcs_server, raylet, workers) and an ephemeral Prefect server
as child processes and stops them on its way out, on Ctrl-C and on SIGTERM. A SIGKILL or the kernel's
OOM killer gives it no way out: its children are re-parented to init and run on (a killed benchmark
once left a Prefect server running for 1 h 45 min). `start_reaper()` starts a small watchdog in its own
session that notes the command's descendants while it lives and, once it is gone, stops those still
running: SIGTERM, then SIGKILL after a grace period. A process is identified by pid and start time, so a
reused pid is never touched.

    python -m infra.reaper PID   # what start_reaper() runs
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

POLL_S = 0.5  # how often the watchdog notes descendants and checks on the command
GRACE_S = 5.0  # SIGTERM first; SIGKILL what is still running after this long


def start_reaper(pid: int | None = None) -> subprocess.Popen:
    """Watch process `pid` (default: this one) from a separate session; it ends on its own afterwards."""
    # A new session: Ctrl-C in the terminal reaches the command's process group, not the watchdog.
    return subprocess.Popen([sys.executable, "-m", "infra.reaper", str(pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def _alive(process) -> bool:
    import psutil

    try:  # is_running() compares start times, so a reused pid reads as gone
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def watch(pid: int, *, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> list[int]:
    """Block until `pid` is gone, then stop every descendant it ever had; returns the pids stopped."""
    import psutil

    try:
        command = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    me = os.getpid()
    seen: dict[tuple[int, float], psutil.Process] = {}

    def note(processes) -> None:
        for p in processes:
            try:
                if p.pid != me:
                    seen.setdefault((p.pid, p.create_time()), p)
            except psutil.Error:
                pass

    while _alive(command):
        note(_descendants(command))
        time.sleep(poll_s)
    # Re-parented now: what they started since the last look (a Ray worker of a raylet) is theirs.
    for p in list(seen.values()):
        note(_descendants(p))
    left = [p for p in seen.values() if _alive(p)]
    for p in left:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, stubborn = psutil.wait_procs(left, timeout=grace_s)
    for p in stubborn:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in left]


if __name__ == "__main__":
    watch(int(sys.argv[1]))
