"""structlog set up for one JSON object per line on stdout.

Never log a credential: callers log header *names*, and :func:`_redact` drops any field whose
name says it holds a secret, as a second line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from aiohttp import web
from structlog.typing import FilteringBoundLogger

# Per-request fields for the access log line: name, reference, cache result, upstream, ...
LOG = web.RequestKey("log", dict[str, Any])
# Its ``aborted`` for a client that hung up before the end of its answer.
CLIENT_DISCONNECTED = "client disconnected"

_SECRET_WORDS = ("authorization", "password", "token", "secret", "credential", "cookie")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if any(word in key.lower() for word in _SECRET_WORDS):
            event[key] = "[redacted]"
    return event


class _CurrentStream:
    """``sys.stdout`` or ``sys.stderr`` as it is when written to, not when logging was set up
    (test runners swap them)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def write(self, text: str) -> int:
        written: int = getattr(sys, self._name).write(text)
        return written

    def flush(self) -> None:
        getattr(sys, self._name).flush()


def configure_logging(level: str = "info", *, stream: str = "stdout") -> None:
    """JSON lines on ``stream`` ("stdout" or "stderr"), for structlog and stdlib loggers."""
    out = _CurrentStream(stream)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        structlog.processors.format_exc_info,
    ]
    # Libraries' own records (aiohttp's) become the same JSON lines.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),  # type: ignore[arg-type]
        # Not cached: a cached logger keeps the configuration current at its first use, so a
        # second ``configure_logging`` (an in-process command after a server, in the tests)
        # would leave some modules' loggers at the old level. A log line costs a bind more.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> FilteringBoundLogger:
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
