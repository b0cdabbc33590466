"""The reaper: what a killed command started is stopped; what it did not start is left alone (issue 13)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]

# A command that starts the reaper, a child and a grandchild (in its own session, as Ray starts some of
# its processes), prints their pids, then waits to be killed.
COMMAND = textwrap.dedent("""
    import subprocess, sys, time
    from infra.reaper import start_reaper
    reaper = start_reaper()
    child = subprocess.Popen(["sleep", "300"])
    shell = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    print(reaper.pid, child.pid, shell.pid, shell.stdout.readline().strip(), flush=True)
    time.sleep(300)
""")


def _gone(pids, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_a_killed_command_leaves_nothing_running(how):
    bystander = subprocess.Popen(["sleep", "300"])  # not the command's: must survive
    command = subprocess.Popen([sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        reaper, *started = (int(pid) for pid in command.stdout.readline().split())
        time.sleep(3 * 0.5 + 1.5)  # the reaper notes descendants every 0.5 s (and needs to start)
        command.send_signal(how)
        command.wait(timeout=10)
        assert _gone(started, timeout_s=15) == [], "the command's children outlived it"
        assert _gone([reaper], timeout_s=5) == [], "the reaper did not end after its work"
        assert bystander.poll() is None, "the reaper stopped a process the command did not start"
    finally:
        bystander.kill()
        command.kill()


def test_the_reaper_ends_with_nothing_to_do():
    from infra.reaper import watch

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert watch(done.pid, poll_s=0.1) == []


@pytest.mark.slow
def test_a_killed_consolidation_leaves_no_ray_or_prefect_server(fleet, tmp_path):
    """The real command, killed once its local Ray and its ephemeral Prefect server are up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    command = subprocess.Popen([str(Path(sys.executable).parent / "fleetmerge"), "consolidate", "--store", str(fleet)],
                               env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and command.poll() is None:
            for p in psutil.Process(command.pid).children(recursive=True):
                try:
                    seen.setdefault(p.pid, " ".join(p.cmdline()))
                except psutil.Error:
                    pass
            if any("raylet" in c for c in seen.values()) and any("prefect" in c and "server" in c
                                                                   for c in seen.values()):
                break
            time.sleep(0.2)
        assert command.poll() is None, "the run ended before Ray and Prefect were both up"
        time.sleep(1.0)  # the reaper's next look
        command.kill()
        command.wait(timeout=10)
        left = _gone(list(seen), timeout_s=30)
        assert left == [], f"still running after the command was killed: {[seen[p][:80] for p in left]}"
    finally:
        command.kill()
        for pid in seen:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
