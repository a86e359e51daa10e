"""Structured logs. Keys, credentials and prompts are never logged: nothing on the request path
logs request headers or bodies, and the upstream URL is logged without credentials."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.engine import URL, make_url

from app.config import Settings

# The request being handled: every line logged while it is carries its id.
current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = current_request_id.get()
        if request_id is not None:
            entry["request_id"] = request_id
        fields = getattr(record, "access", None) or getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class ConsoleFormatter(logging.Formatter):
    """For a person at a terminal: the time, the level, the message, then `name=value`."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        parts = [when, f"{record.levelname.lower():7}", record.getMessage()]
        fields = dict(getattr(record, "access", None) or getattr(record, "fields", None) or {})
        request_id = current_request_id.get()
        if request_id is not None:
            fields.setdefault("request_id", request_id)
        parts += [f"{k}={v}" for k, v in fields.items() if v is not None]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(settings: Settings) -> None:
    # A line is written per proxied request: skip what no formatter here uses (the caller's
    # source location, found by walking the stack; thread and process names), as the logging
    # documentation's "Optimization" section describes.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif settings.log_format == "console":
        handler.setFormatter(ConsoleFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # On the root logger, so that uvicorn's, asyncpg's and APScheduler's lines are structured
    # too (`budgetgate serve` passes log_config=None to uvicorn for that).
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("budgetgate").setLevel(settings.log_level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def startup_line(settings: Settings, host: str, port: int, workers: int) -> None:
    """Where the gateway listens, which ledger and upstream it uses (without credentials), and
    how it takes keys."""
    logging.getLogger("budgetgate").info(
        "budgetgate starting",
        extra={
            "fields": {
                "address": f"http://{host}:{port}",
                "workers": workers,
                "database": _without_credentials(settings.database_url),
                "upstream": settings.upstream_url,
                "key_mode": settings.key_mode,
            }
        },
    )


def _without_credentials(url: str) -> str:
    # A new URL of the old one's parts: URL.set() leaves a part alone when given None.
    p = make_url(url)
    bare = URL.create(p.drivername, host=p.host, port=p.port, database=p.database, query=p.query)
    return bare.render_as_string(hide_password=True)
