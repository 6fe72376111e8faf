"""``slipstream gateway``: serve ``create_app`` with uvicorn, draining on SIGTERM; with
``processes`` > 1, that many gateway processes on one port (``gateway/processes.py``)."""

from __future__ import annotations

import socket
from functools import partial
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.entry import entry
from gateway.processes import Supervisor
from gateway.settings import GatewaySettings
from shared.gc_policy import tune_gc
from shared.logs import configure_logging


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: mark the gateway draining (``/readyz`` 503, new requests 503), then
    let uvicorn stop accepting and give open streams ``drain_grace_s`` to finish. Streams still
    open then are closed without cancelling their jobs, so clients resume elsewhere."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = getattr(self.app.state, "gateway", None)
        if state is not None:
            state.draining = True
        super().handle_exit(sig, frame)


def bound_socket(host: str, port: int, send_buffer: int = 0) -> socket.socket:
    """A listening socket; accepted connections inherit its bounded send buffer."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def listening_socket(settings: GatewaySettings) -> socket.socket:
    """The gateway's listening socket (shared by every process when there are several)."""
    return bound_socket(settings.host, settings.port, settings.socket_send_buffer_bytes)


def serve(settings: GatewaySettings, sockets: list[socket.socket]) -> None:
    """One gateway process: the app (its own Redis pool and pub/sub) on ``sockets``."""
    app = create_app(settings)
    tune_gc(settings.gc_thresholds)
    config = uvicorn.Config(
        entry(app),
        interface="asgi3",
        host=settings.host,
        port=settings.port,
        log_config=None,
        # uvicorn's access log is at WARNING (shared/logs.py), so never written, but with a
        # handler anywhere above it uvicorn still formats each line's arguments: ~15 µs a
        # request (py-spy). Off, it does neither.
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_grace_s) + 1,
        lifespan="on",
    )
    DrainingServer(config, app).run(sockets=sockets)


def main(settings: GatewaySettings, processes: int = 1, metrics_port: int = 0) -> None:
    """Serve; ``processes`` > 1 forks that many gateways on the one port, the i-th also on
    ``metrics_port + i`` (0: none) so that each process's metrics can be scraped."""
    configure_logging(settings.log_format, settings.log_level)
    listener = listening_socket(settings)
    if processes <= 1:
        extra = [bound_socket(settings.host, metrics_port)] if metrics_port else []
        serve(settings, [listener, *extra])
        return

    def own_socket(index: int) -> socket.socket | None:
        return bound_socket(settings.host, metrics_port + index) if metrics_port else None

    supervisor = Supervisor(
        partial(serve, settings),
        listener,
        processes,
        extra_socket=own_socket,
        grace_s=settings.drain_grace_s,
    )
    raise SystemExit(supervisor.run())
