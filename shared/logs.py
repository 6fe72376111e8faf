"""Logging setup: one JSON object per line, or a readable console format for local use.

Slipstream's own lines (structlog) are rendered by structlog and written straight to stderr;
only other libraries' lines (uvicorn, redis...) go through the standard library, rendered by
the same processors. Through the standard library bridge an info line cost 26-32 µs of CPU
(a ``LogRecord``, the handler's lock, ``ProcessorFormatter`` running the chain a second time);
the direct path costs 11-12 µs, and a line below the level 0.8 µs (was 2.6 µs): a method that
does nothing (``python -m bench.micro logs``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


class _NamedWriteLogger(structlog.WriteLogger):
    """structlog's line writer, with the name it was asked for (``add_logger_name`` reads
    ``.name``): lines keep their ``"logger": "slipstream.gateway"`` field."""

    def __init__(self, name: str, file: TextIO) -> None:
        super().__init__(file)
        self.name = name


def _logger_factory(*args: Any) -> _NamedWriteLogger:
    return _NamedWriteLogger(str(args[0]) if args else "", sys.stderr)


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Route structlog and the standard library through one renderer on stderr."""
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=_logger_factory,
        # a line below the level is a no-op method: no processor, no timestamp
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for chatty in ("httpx", "httpcore"):  # one INFO line per request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
