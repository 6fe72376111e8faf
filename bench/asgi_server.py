"""The gateway's app under another ASGI server, for a like-for-like comparison with uvicorn.

    python -m bench.asgi_server granian --host 127.0.0.1 --port 8000 --model sim-model
    python -m bench.asgi_server hypercorn --host 127.0.0.1 --port 8000 --model sim-model

A benchmark tool, not a way to run Slipstream: ``slipstream gateway`` (uvicorn, draining on
SIGTERM) is the product. Neither server is a dependency; install it into the venv to measure
(``pip install granian hypercorn``). The bench arms take it through ``BENCH_ASGI_SERVER``
(``bench.arms.SlipstreamArm``). Both run one worker process with one event loop, as
``slipstream gateway`` does; granian on its Rust HTTP stack with uvloop, hypercorn on uvloop.
"""

from __future__ import annotations

import argparse
from typing import Any

SERVERS = ("uvicorn", "granian", "hypercorn")


def _app() -> Any:
    """The gateway's ASGI app from the environment (granian imports it by name)."""
    import os

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from shared.logs import configure_logging

    settings = GatewaySettings(models=os.environ["BENCH_ASGI_MODELS"].split(","))
    configure_logging(settings.log_format, settings.log_level)
    # not through ``direct_send``: granian's ``send`` is no coroutine that the inline relay
    # can drive (``shared.aio.start_now``), so each inline write would become a task
    return create_app(settings)


def _granian(host: str, port: int) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    Granian(
        "bench.asgi_server:_app",
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=1,
        runtime_threads=1,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        log_enabled=False,
    ).serve()


def _hypercorn(host: str, port: int) -> None:
    import uvloop
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 5
    uvloop.run(serve(_app(), config))  # type: ignore[arg-type]


def main() -> None:
    import os
    import sys
    from pathlib import Path

    # run as a script from any directory: ``bench`` importable here and in granian's worker
    root = str(Path(__file__).resolve().parent.parent)
    sys.path.append(root)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root) if p)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("server", choices=SERVERS[1:])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[])
    args = parser.parse_args()
    os.environ["BENCH_ASGI_MODELS"] = ",".join(args.model)
    if args.server == "granian":
        _granian(args.host, args.port)
    else:
        _hypercorn(args.host, args.port)


if __name__ == "__main__":
    main()
