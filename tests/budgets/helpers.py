"""Shared helpers for the budget ledger tests (not a test module)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx

from app.budgets.state import PeriodState
from app.keys.service import hash_key
from app.ledger.contract import (
    AdmitRequest,
    Admitted,
    ConcurrentChange,
    KeyContext,
    KeyRefused,
    Outcome,
    PeriodsChanged,
    PeriodsExpired,
    Rejected,
    RequestInfo,
)
from app.ledger.repository import reconcile
from tests.conftest import Gateway

BUDGET_HEADERS = ("x-budget-spend", "x-budget-max-budget", "x-budget-remaining")


@dataclass(frozen=True)
class Flight:
    """A request admitted on the hot ledger, not yet settled."""

    info: RequestInfo
    key: KeyContext
    decision: Admitted | Rejected

    @property
    def admitted(self) -> bool:
        return isinstance(self.decision, Admitted)

    @property
    def periods(self) -> list[PeriodState]:
        """Admitted: every period after the reservation; rejected: the period that refused."""
        if isinstance(self.decision, Admitted):
            return self.decision.periods
        return [self.decision.refusing]


def admit_request(
    gw: Gateway,
    plaintext_key: str,
    amount: int,
    request_id: str | None = None,
    model: str | None = "bg-test",
    endpoint: str = "/chat/completions",
    stream: bool = False,
) -> AdmitRequest:
    """What the request path asks the hot ledger for, starting now."""
    started = gw.clock.now()
    return AdmitRequest(
        key_hash=hash_key(plaintext_key),
        request_id=request_id or f"req_{uuid.uuid4().hex}",
        model=model,
        endpoint=endpoint,
        stream=stream,
        amount=amount,
        started_at=started,
        expires_at=started + timedelta(seconds=gw.settings.reservation_ttl_seconds),
    )


async def admit(
    gw: Gateway,
    plaintext_key: str,
    amount: int,
    *,
    request_id: str | None = None,
    model: str | None = "bg-test",
    endpoint: str = "/chat/completions",
    stream: bool = False,
    reverse_rolls: bool = False,
) -> Flight:
    """Authenticate + reserve `amount` on the gateway's hot ledger as the request path does
    (app.proxy.service.Gateway): roll the periods it reports expired, then try again, at
    most 5 times. `reverse_rolls` hands roll_periods the expired periods in the opposite order
    (the roll must impose its own lock order)."""
    req = admit_request(gw, plaintext_key, amount, request_id, model, endpoint, stream)
    started = req.started_at
    for _ in range(5):
        decision = await gw.state.gateway.hot.admit(req, gw.clock.now())
        match decision:
            case PeriodsExpired(expired=due):
                await gw.state.budgets.roll_periods(list(reversed(due)) if reverse_rolls else due)
            case PeriodsChanged():
                pass
            case KeyRefused():
                raise AssertionError(f"key refused: {decision}")
            case Admitted() | Rejected():
                key = decision.key
                info = RequestInfo(req.request_id, key.id, model, endpoint, stream, started)
                return Flight(info, key, decision)
    raise ConcurrentChange("periods kept expiring during admission")


async def settle(gw: Gateway, info: RequestInfo, outcome: Outcome) -> list[PeriodState] | None:
    """Settle on the gateway's hot ledger, as the request path does; None if already swept."""
    states: list[PeriodState] | None = await gw.state.gateway.hot.settle_soon(
        info, outcome, gw.clock.now()
    )
    return states


def when(text: str) -> datetime:
    """An RFC 3339 timestamp from the API, as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def money(text: str | float) -> Decimal:
    return Decimal(str(text))


async def get_key(gw: Gateway, key_id: str) -> dict[str, Any]:
    r = await gw.admin("GET", f"/admin/keys/{key_id}")
    assert r.status_code == 200, r.text
    return r.json()


async def periods(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    """The key's periods, oldest first."""
    r = await gw.admin("GET", f"/admin/keys/{key_id}/periods")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    starts = [(when(p["period_start"]), p) for p in data]
    # The API lists newest first.
    assert [s for s, _ in starts] == sorted((s for s, _ in starts), reverse=True)
    return [p for _, p in reversed(starts)]


async def ledger(gw: Gateway, key_id: str) -> list[dict[str, Any]]:
    r = await gw.admin("GET", "/admin/ledger", params={"key_id": key_id, "limit": 1000})
    assert r.status_code == 200, r.text
    return r.json()["data"]


async def spend_to_limit(gw: Gateway, key: dict[str, Any], n: int = 10, tokens: int = 100) -> None:
    """`n` requests of `tokens` output tokens ($0.001 each), all admitted."""
    for i in range(n):
        r = await gw.chat(key["key"], max_tokens=tokens)
        assert r.status_code == 200, (i, r.text)


async def chat_billed(gw: Gateway, key: dict[str, Any], cost: str) -> httpx.Response:
    """A chat request reserving $0.01 (10 output tokens) that the upstream bills `cost` (dollars)
    for, in its cost header: over the reservation, an overrun."""
    body = {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    headers = {"authorization": f"Bearer {key['key']}", "x-mock-cost": cost}
    return await gw.client.post("/v1/chat/completions", json=body, headers=headers)


async def assert_reconciled(gw: Gateway) -> None:
    report = await reconcile(gw.state.engine)
    assert report.ok, report.problems
    assert report.periods_checked > 0


def assert_budget_exceeded(
    r: httpx.Response,
    key: dict[str, Any],
    *,
    spend: str,
    max_budget: str,
    reset_at: str | None,
    now: datetime,
) -> None:
    """A 429 in the SPEC 5 shape for `key`."""
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["type"] == "budget_exceeded"
    assert err["code"] == "budget_exceeded"
    assert err["param"] is None
    message = err["message"]
    if key.get("alias"):
        assert key["alias"] in message, message
    assert key["key_prefix"] in message, message
    assert key["key"] not in message, "the full key leaked into the error message"
    assert key["key"] not in r.text
    assert money(r.headers["x-budget-spend"]) == money(spend)
    assert money(r.headers["x-budget-max-budget"]) == money(max_budget)
    assert money(r.headers["x-budget-remaining"]) == max(money(max_budget) - money(spend), 0)
    assert r.headers["x-request-id"]
    if reset_at is None:
        assert "retry-after" not in r.headers
        assert "x-budget-reset-at" not in r.headers
        assert "does not reset" in message or "never" in message, message
    else:
        assert r.headers["x-budget-reset-at"] == reset_at
        assert reset_at in message, message
        expected = (when(reset_at) - now).total_seconds()
        assert int(r.headers["retry-after"]) == max(1, int(-(-expected // 1)))
