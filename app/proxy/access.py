"""The access record of a proxied request: filled in step by step by the gateway, written as one
JSON log line and counted in the metrics once the response has gone out (SPEC 12).

Nothing secret goes in: the key's id and alias, never the key; the route's template, never the
raw path or query; the model only as the request named it.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from opentelemetry.trace import Span

from app.kit.money import dollars
from app.metrics import OVERRUNS, REJECTIONS, REQUESTS, SPEND, UPSTREAM_SECONDS

log = logging.getLogger("budgetgate.access")


@dataclass(slots=True)
class AccessRecord:
    request_id: str
    method: str
    started: float = field(default_factory=time.perf_counter)
    route: str = "unmatched"  # the route table's template
    key_id: str | None = None
    key_alias: str | None = None
    team: str | None = None
    end_user: str | None = None
    model: str | None = None
    priced_model: bool = False  # the model is one the price book knows (a bounded label)
    status: int | None = None
    outcome: str | None = None  # the ledger entry's outcome; None: no entry (free, refused)
    cost: int | None = None  # nano-dollars
    reservation: int | None = None  # nano-dollars
    rejected_by: str | None = None  # the scope of the budget that refused
    upstream_status: int | None = None
    upstream_started: float | None = None
    upstream_seconds: float | None = None
    span: Span | None = None  # the request's trace span (app/tracing.py)
    upstream_span: Span | None = None

    def upstream_done(self) -> None:
        if self.upstream_started is not None and self.upstream_seconds is None:
            self.upstream_seconds = time.perf_counter() - self.upstream_started
        if self.upstream_span is not None:
            self.upstream_span.end()
            self.upstream_span = None


# The record of the request being handled. It travels with the request's context (into the
# stream's task too), so that the settlement, wherever it runs, can note what it charged.
current_access: ContextVar[AccessRecord | None] = ContextVar("current_access", default=None)


def finish(record: AccessRecord, status: int) -> None:
    """Write the access line and count the request."""
    record.status = status
    latency = time.perf_counter() - record.started
    if record.span is not None:
        record.span.set_attribute("http.route", record.route)
        record.span.set_attribute("http.response.status_code", status)
        if record.outcome is not None:
            record.span.set_attribute("budgetgate.outcome", record.outcome)
        record.span.end()
    log.info(
        "request",
        extra={
            "access": {
                "request_id": record.request_id,
                "key_id": record.key_id,
                "key_alias": record.key_alias,
                "team": record.team,
                "end_user": record.end_user,
                "method": record.method,
                "route": record.route,
                "model": record.model,
                "status": status,
                "outcome": record.outcome,
                "cost": dollars(record.cost),
                "reservation": dollars(record.reservation),
                "upstream_status": record.upstream_status,
                "latency_ms": round(latency * 1000, 3),
                "upstream_latency_ms": (
                    None
                    if record.upstream_seconds is None
                    else round(record.upstream_seconds * 1000, 3)
                ),
            }
        },
    )
    model = (record.model if record.priced_model else "other") if record.model else "none"
    REQUESTS.labels(record.route, model, str(status), record.outcome or "none").inc()
    if record.cost:
        SPEND.labels(model).inc(dollars(record.cost))
        if record.reservation is not None and record.cost > record.reservation:
            OVERRUNS.inc()  # the ledger records the same excess on the entry
    if record.rejected_by is not None:
        REJECTIONS.labels(record.rejected_by).inc()
    if record.upstream_seconds is not None:
        UPSTREAM_SECONDS.labels(record.route).observe(record.upstream_seconds)
