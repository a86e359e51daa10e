"""Periodic jobs: roll expired periods, release abandoned reservations, record and send budget
alerts. Thin and idempotent: every replica runs them, and the ledger's conditional statements
make that safe."""

from __future__ import annotations

import logging
from datetime import timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from app.alerts.service import AlertService
from app.ledger.periods import BudgetRepository
from app.ledger.usage_rollup import roll_up_finished_days

log = logging.getLogger("budgetgate.scheduler")


async def run_maintenance(budgets: BudgetRepository) -> tuple[int, int]:
    """One pass of both jobs; returns (periods rolled, reservations swept)."""
    rolled = await budgets.close_expired_periods()
    swept = await budgets.sweep_expired_reservations()
    await budgets.compact_short_periods()
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


async def run_usage_rollup(budgets: BudgetRepository) -> int:
    """Roll up the ledger's finished days for the dashboard; returns the days rolled. A day is
    final an hour past the reservation TTL after its end: no entry can arrive for it later."""
    grace = budgets.ttl + timedelta(hours=1)
    return await roll_up_finished_days(budgets.engine, budgets.clock.now(), grace)


async def _safe_run(budgets: BudgetRepository, alerts: AlertService) -> None:
    for job in (run_maintenance(budgets), run_alerts(alerts), run_usage_rollup(budgets)):
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
