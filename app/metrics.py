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
from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily

from app.kit.money import dollars

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# In multiprocess mode every sample write asks for the process id (a system call each time:
# ~8 per request); it only changes in a forked child, so it is read once and again after a fork
# (the client's documented hook for a custom process identifier).
_pid = os.getpid()


def _process_id() -> int:
    return _pid


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
if os.environ.get(MULTIPROC_ENV):
    values.ValueClass = values.MultiProcessValue(process_identifier=_process_id)

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


def metrics_page(budgets: Sequence[BudgetFigures] | None = None) -> tuple[bytes, str]:
    """The exposition of every worker's samples (or this process's), then the per-budget
    gauges when given, and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        page = generate_latest(registry)
    else:
        page = generate_latest(REGISTRY)
    if budgets is not None:
        page += generate_latest(_BudgetCollector(budgets))  # type: ignore[arg-type]
    return page, CONTENT_TYPE_LATEST


class BudgetFigures(Protocol):
    key_id: str
    alias: str | None
    window: str
    spend: int  # nano-dollars
    max_budget: int | None


class _BudgetCollector:
    """Spend and remaining of every budget in its open period, read from the ledger at scrape
    time (so exact across replicas, and gone with the key): one series per budget, which is
    why they are opt-in."""

    def __init__(self, budgets: Sequence[BudgetFigures]) -> None:
        self.budgets = budgets

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["key_id", "alias", "window"]
        spend = GaugeMetricFamily(
            "budgetgate_budget_spend_dollars", "Spend in the budget's open period", labels=labels
        )
        remaining = GaugeMetricFamily(
            "budgetgate_budget_remaining_dollars",
            "What the budget's open period has left (limited budgets only)",
            labels=labels,
        )
        for b in self.budgets:
            values = [b.key_id, b.alias or "", b.window]
            spend.add_metric(values, dollars(b.spend))
            if b.max_budget is not None:
                remaining.add_metric(values, dollars(max(b.max_budget - b.spend, 0)))
        yield spend
        yield remaining
