"""Prometheus metrics (SPEC 12), correct under `budgetgate serve --workers N`.

`serve` points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any worker imports
prometheus-client, so that every worker writes its samples there and `/metrics`, answered by
whichever worker, sums them all (the client's multiprocess mode). Without it (tests, an
embedding application) the process's own registry is served.

Labels are bounded: routes are the route table's templates, models are those the price book
knows (others are `other`), statuses and outcomes are small fixed sets. Never a raw path or a
key.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter(
    "budgetgate_requests_total",
    "Proxied requests, by route template, model, HTTP status and ledger outcome",
    ["route", "model", "status", "outcome"],
)
SPEND = Counter(
    "budgetgate_spend_dollars_total",
    "Dollars charged to budgets, by model",
    ["model"],
)
REJECTIONS = Counter(
    "budgetgate_rejections_total",
    "Requests refused for a budget or limit, by the scope of the budget that refused",
    ["scope"],
)
OVERRUNS = Counter(
    "budgetgate_overruns_total",
    "Requests whose real cost exceeded their reservation",
)
UPSTREAM_SECONDS = Histogram(
    "budgetgate_upstream_seconds",
    "Upstream exchange time, from sending the request to the end of the answer",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
LEDGER_SECONDS = Histogram(
    "budgetgate_ledger_seconds",
    "Ledger step time (admission: authenticate and reserve; settlement)",
    ["step"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
)
RESERVATIONS_OPEN = Gauge(
    "budgetgate_reservations_open",
    "Reservations held in the ledger now (requests in flight, on every replica)",
    multiprocess_mode="mostrecent",
)


def metrics_page() -> tuple[bytes, str]:
    """The exposition of every worker's samples (or this process's), and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
