"""Settlement: the actual cost replaces a request's reservation, and its one ledger entry is
written -- whatever happens to the request meanwhile.

The ledger runs a settlement to its end even when the request's client leaves or the server
shuts down (it is awaited shielded); one that fails because the ledger is unavailable is
retried in the background for as long as the reservation lives (after that the sweeper charges
it as abandoned); the shutdown drains what is still pending.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry.trace import Span, Tracer

from app.budgets.state import PeriodState
from app.clock import Clock
from app.ledger.contract import LEDGER_ERRORS, HotLedger, Outcome, RequestInfo
from app.metrics import LEDGER_SECONDS
from app.tracing import start_phase

log = logging.getLogger("budgetgate.ledger")


class Settlement:
    def __init__(
        self, hot: HotLedger, clock: Clock, reservation_ttl_seconds: float, tracer: Tracer
    ) -> None:
        self.hot = hot
        self.clock = clock
        self.reservation_ttl_seconds = reservation_ttl_seconds
        self.tracer = tracer
        self._pending_settlements: set[asyncio.Future[Any]] = set()

    async def settle(
        self, info: RequestInfo, outcome: Outcome, parent: Span | None = None
    ) -> list[PeriodState] | None:
        """The periods' state after the settlement; None if it did not land (yet). `parent`:
        the request's trace span, for the settlement's own.

        The ledger runs it to its end whatever happens to this request (its client left, the
        server shuts down and cancels it): it is awaited shielded, and its outcome is handled
        by _settled, a callback, in either case (the shutdown drains what is still pending)."""
        settling = self.hot.settle_soon(info, outcome, self.clock.now())
        span = start_phase(self.tracer, "settle", parent)
        settling.add_done_callback(_observe_settle(time.perf_counter(), span))
        self._pending_settlements.add(settling)
        settling.add_done_callback(functools.partial(self._settled, info, outcome))
        try:
            return await asyncio.shield(settling)
        except LEDGER_ERRORS:
            return None

    def _settled(
        self,
        info: RequestInfo,
        outcome: Outcome,
        settling: asyncio.Future[list[PeriodState] | None],
    ) -> None:
        self._pending_settlements.discard(settling)
        if settling.cancelled():
            return
        exc = settling.exception()
        if isinstance(exc, LEDGER_ERRORS):
            # The upstream answered and may have billed: keep trying in the background (the
            # reservation stays held meanwhile, so the budget stays closed for it).
            log.warning(
                "settlement of %s failed (%s); retrying in the background",
                info.request_id,
                type(exc).__name__,
            )
            task = asyncio.ensure_future(self._settle_in_background(info, outcome))
            self._pending_settlements.add(task)
            task.add_done_callback(self._pending_settlements.discard)
        elif exc is not None:
            log.error("settlement of %s failed", info.request_id, exc_info=exc)
        elif settling.result() is None:
            log.warning("request %s was already released by the sweeper", info.request_id)

    async def _settle_in_background(self, info: RequestInfo, outcome: Outcome) -> None:
        """Retry a settlement until the ledger is back, for as long as the reservation lives
        (after that the sweeper has released it and recorded it as abandoned)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reservation_ttl_seconds
        delay = 0.1
        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            try:
                settling = self.hot.settle_soon(info, outcome, self.clock.now())
                if await asyncio.shield(settling) is None:
                    log.warning("request %s was already released by the sweeper", info.request_id)
                return
            except LEDGER_ERRORS:
                continue
        log.error("gave up settling %s; the sweeper releases it", info.request_id)

    async def drain(self, seconds: float) -> None:
        """At shutdown: give settlements still running or retrying a last chance to land."""
        if self._pending_settlements:
            await asyncio.wait(set(self._pending_settlements), timeout=seconds)


def _observe_settle(started: float, span: Span) -> Callable[[asyncio.Future[Any]], None]:
    def observe(_: asyncio.Future[Any]) -> None:
        span.end()
        LEDGER_SECONDS.labels("settle").observe(time.perf_counter() - started)

    return observe
