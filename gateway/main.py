"""``slipstream gateway``: serve ``create_app`` with uvicorn, draining on SIGTERM."""

from __future__ import annotations

import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import GatewaySettings
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


def listening_socket(settings: GatewaySettings) -> socket.socket:
    """The listening socket; accepted connections inherit its bounded send buffer."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if settings.socket_send_buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def main(settings: GatewaySettings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_grace_s) + 1,
        lifespan="on",
    )
    DrainingServer(config, app).run(sockets=[listening_socket(settings)])
