"""``slipstream up`` (the quickstart's ``make run``): Ctrl-C stops every process it started,
also when pressed twice (a second signal used to abort the stop and leave the gateway
running, orphaned)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import free_port


def descendants(pid: int) -> set[int]:
    """Every process whose chain of parents leads to ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - out
        out |= frontier
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_ctrl_c_twice_stops_everything() -> None:
    port, redis_port = free_port(), free_port()
    env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    args = [sys.executable, "-m", "slipstream", "up", "--engine", "sim", "--port", str(port)]
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    children: set[int] = set()
    try:
        assert proc.stdout is not None
        end = time.monotonic() + 60
        seen = []
        for line in proc.stdout:  # the banner comes once the gateway answers
            seen.append(line)
            if "Slipstream is up" in line or time.monotonic() > end:
                break
        assert any("Slipstream is up" in line for line in seen), seen
        children = descendants(proc.pid)
        assert len(children) >= 3  # redis-server, the gateway, the worker
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # impatient: again, while it stops
        assert proc.wait(timeout=90) == 0
        end = time.monotonic() + 30
        while any(alive(p) for p in children) and time.monotonic() < end:
            time.sleep(0.2)
        assert not [p for p in children if alive(p)]
    finally:
        for pid in [*children, proc.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
