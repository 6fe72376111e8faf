"""``slipstream gateway``: serve ``create_app`` with uvicorn."""

from __future__ import annotations

import uvicorn

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.logs import configure_logging


def main(settings: GatewaySettings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_grace_s),
        lifespan="on",
    )
    uvicorn.Server(config).run()
