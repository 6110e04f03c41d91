"""structlog setup, called once per process entry point (gateway, worker, tools)."""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any

import msgspec
import structlog

_json = msgspec.json.Encoder()


def _dumps(obj: Any, default: Any = None) -> str:
    """structlog's JSONRenderer passes `default=` (the same function on every line); msgspec
    takes `enc_hook`, on an encoder made once."""
    return (_encoder(default) if default else _json).encode(obj).decode()


@functools.cache
def _encoder(enc_hook: Any) -> msgspec.json.Encoder:
    return msgspec.json.Encoder(enc_hook=enc_hook)


def configure_logging(level: str = "info", json: bool | None = None, **static: str) -> None:
    """JSON lines in production (stderr not a TTY), coloured console otherwise.

    `static` fields (process kind, instance id) are bound to every line of the process;
    `message_id` / `session_id` come from contextvars bound per generation.
    """
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if static:
        structlog.contextvars.bind_contextvars(**static)
