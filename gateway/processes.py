"""``slipstream gateway --processes N``: N gateway processes on one port, for every core.

The supervisor binds the listening socket once and forks N children that all accept on it
(as uvicorn's and gunicorn's process managers do). A shared socket rather than one
``SO_REUSEPORT`` socket per process: when a process dies, connections still waiting in the
accept queue are taken by the others instead of being reset with the dead process's own
queue. Each child is a whole gateway (its own Redis pool, pub/sub connection, multiplexer
and admission cache); they share everything else through Redis already, so a stream, a
resume or a cancel works whichever process the request reaches.

Metrics: each child keeps its own registry and also listens on ``metrics_port + index``
(when ``metrics_port`` is set); Prometheus scrapes each as one more gateway replica. Not
prometheus-client's multiprocess mode: it would add the Redis-read cluster gauges of every
process together, drop the ``process_*`` collectors and the callback gauges, and the
dashboard reads the same registry. ``/metrics`` on the shared port answers for whichever
process took the connection.

The supervisor restarts a child that dies (at most one restart per slot per second) and, on
SIGTERM or SIGINT, sends SIGTERM to every child, which drains as a single gateway does.
Children live in their own process group (a terminal's Ctrl-C reaches only the supervisor,
which forwards one SIGTERM) and drain by themselves if the supervisor disappears.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

import structlog

log = structlog.get_logger("slipstream.gateway")
RESTART_MIN_S = 1.0  # a slot crashing at once is restarted at most this often


def _watch_parent(parent: int) -> None:
    """Drain this child (SIGTERM to itself) once its supervisor is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _child_main(serve: Callable[[list[socket.socket]], None], sockets: list[socket.socket]) -> None:
    os.setpgid(0, 0)
    parent = os.getppid()
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    serve(sockets)


class Supervisor:
    """Keeps ``processes`` children serving ``listener``; ``serve(sockets)`` runs one."""

    def __init__(
        self,
        serve: Callable[[list[socket.socket]], None],
        listener: socket.socket,
        processes: int,
        *,
        extra_socket: Callable[[int], socket.socket | None],
        grace_s: float,
    ) -> None:
        self.serve = serve
        self.listener = listener
        self.processes = processes
        self.extra_socket = extra_socket  # the child's own metrics socket, by index
        self.grace_s = grace_s
        self.children: dict[int, BaseProcess] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self._ctx = multiprocessing.get_context("fork")  # the app is built in the child

    def _start(self, index: int) -> None:
        sockets = [self.listener]
        own = self.extra_socket(index)
        if own is not None:
            sockets.append(own)
        child = self._ctx.Process(
            target=_child_main, args=(self.serve, sockets), name=f"gateway-{index}"
        )
        child.start()
        if own is not None:
            own.close()  # the child holds it now
        self.children[index] = child
        self.started_at[index] = time.monotonic()
        log.info("gateway_process_started", index=index, pid=child.pid)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        for index in range(self.processes):
            self._start(index)
        while not self.stopping:
            alive = [c.sentinel for c in self.children.values() if c.is_alive()]
            if len(alive) == len(self.children):
                wait(alive, timeout=0.5)  # wakes as soon as one dies
            else:
                time.sleep(0.1)
            for index, child in list(self.children.items()):
                if child.is_alive() or self.stopping:
                    continue
                if time.monotonic() - self.started_at[index] >= RESTART_MIN_S:
                    log.warning("gateway_process_died", index=index, exitcode=child.exitcode)
                    self._start(index)
        return self._stop()

    def _stop(self) -> int:
        """SIGTERM every child (each drains), wait out the grace, then SIGKILL the rest."""
        for child in self.children.values():
            if child.pid is not None and child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        end = time.monotonic() + self.grace_s + 5.0
        for child in self.children.values():
            child.join(max(0.0, end - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join(5.0)
        return 0
