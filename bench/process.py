"""Child processes of the harness: start (optionally pinned), wait until ready, account, stop.

Every process the harness starts goes through ``ProcessGroup``, whose ``stop_all`` runs in a
``finally``; children also get ``PR_SET_PDEATHSIG`` so they die with the harness even when it is
killed outright.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PYTHON = sys.executable
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def gateway_split(pin: bool) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """(the gateway's CPUs, everyone else's) when ``pin``: the last CPU for the gateway alone
    (``taskset`` in effect), so a figure about the gateway is not about the load generator,
    Redis and the workers sharing its core. (None, None) unpinned or on one CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return frozenset(cpus[-1:]), frozenset(cpus[:-1])


def _preexec(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if cpus:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cpus)

    return setup


@dataclass
class Proc:
    """One started process; ``component`` names what it is in the CPU accounts."""

    name: str
    component: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    cpu_mark: float = 0.0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU of the process and its live children (nginx/haproxy workers)."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return self.cpu_mark
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_bytes(self) -> int:
        try:
            return int(psutil.Process(self.pid).memory_info().rss)
        except psutil.Error:
            return 0

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class ProcessGroup:
    """The processes of one arm; ``stop_all`` stops them in reverse order of start."""

    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        component: str,
        args: Sequence[str],
        *,
        cpus: frozenset[int] | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / f"{name}.log"
        full_env = {**os.environ, **self.env, **(env or {})}
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                list(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                preexec_fn=_preexec(cpus),  # the harness runs no threads
                cwd=self.workdir,
            )
        proc = Proc(name, component, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        if proc.alive:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self, timeout: float = 10.0) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc, timeout=timeout)

    def mark_cpu(self) -> None:
        for proc in self.procs:
            proc.cpu_mark = proc.cpu_seconds()

    def cpu_since_mark(self) -> dict[str, float]:
        """CPU seconds per component since ``mark_cpu`` (processes started since count fully)."""
        out: dict[str, float] = {}
        for proc in self.procs:
            used = max(0.0, proc.cpu_seconds() - proc.cpu_mark)
            out[proc.component] = round(out.get(proc.component, 0.0) + used, 3)
        return out


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def wait_until(
    check: Callable[[], object],
    *,
    timeout: float,
    what: str,
    procs: Sequence[Proc] = (),
    interval: float = 0.05,
) -> None:
    """Poll ``check`` (sync or async) until truthy; fail early when a watched process died."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for proc in procs:
            if not proc.alive:
                raise RuntimeError(
                    f"{proc.name} exited while waiting for {what}:\n{proc.log_tail()}"
                )
        with contextlib.suppress(Exception):  # not ready yet: refused, 503, not registered...
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
        await asyncio.sleep(interval)
    tails = "\n".join(f"--- {p.name}\n{p.log_tail()}" for p in procs)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


async def terminate(
    group: ProcessGroup, proc: Proc, *, grace: float, sig: int = signal.SIGTERM
) -> float:
    """Signal ``proc`` and wait (without blocking the event loop) for it to exit; SIGKILL after
    ``grace`` seconds. Returns how long it took to exit."""
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        proc.popen.send_signal(sig)
    end = started + grace
    while proc.alive and time.monotonic() < end:
        await asyncio.sleep(0.05)
    group.stop(proc, timeout=5.0, sig=signal.SIGKILL)
    return time.monotonic() - started
