"""Structured logs. Keys, credentials and prompts are never logged: nothing on the request path
logs request headers or bodies, and the upstream URL is logged without credentials."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson

from app.config import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # On the root logger, so that uvicorn's, asyncpg's and APScheduler's lines are structured
    # too (`budgetgate serve` passes log_config=None to uvicorn for that).
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("budgetgate").setLevel(settings.log_level.upper())
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
