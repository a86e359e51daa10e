"""Periodic jobs: roll expired periods, release abandoned reservations, record and send budget
alerts. Thin and idempotent: every replica runs them, and the ledger's conditional statements
make that safe."""

from __future__ import annotations

import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from app.alerts.service import AlertService
from app.ledger.periods import BudgetRepository

log = logging.getLogger("budgetgate.scheduler")


async def run_maintenance(budgets: BudgetRepository) -> tuple[int, int]:
    """One pass of both jobs; returns (periods rolled, reservations swept)."""
    rolled = await budgets.close_expired_periods()
    swept = await budgets.sweep_expired_reservations()
    if rolled or swept:
        log.info("maintenance: %d periods rolled, %d abandoned requests released", rolled, swept)
    return rolled, swept


async def run_alerts(alerts: AlertService) -> tuple[int, int]:
    """One pass: record thresholds reached, soft-budget crossings and overruns, send what is
    due; returns (recorded, sent)."""
    recorded = (
        await alerts.record_thresholds()
        + await alerts.record_soft_crossings()
        + await alerts.record_overruns()
    )
    return recorded, await alerts.deliver_due()


async def _safe_run(budgets: BudgetRepository, alerts: AlertService) -> None:
    for job in (run_maintenance(budgets), run_alerts(alerts)):
        try:
            await job
        except Exception as exc:  # a database outage must not kill the scheduler
            log.warning("maintenance pass failed: %s", type(exc).__name__)


def start_scheduler(
    budgets: BudgetRepository, alerts: AlertService, interval_seconds: float
) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler()
    scheduler.add_job(
        _safe_run,
        "interval",
        seconds=interval_seconds,
        args=[budgets, alerts],
        id="budget-maintenance",
        max_instances=1,
        coalesce=True,
    )
    scheduler.start()
    return scheduler
