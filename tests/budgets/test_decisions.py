"""The hot ledger's decision (app/ledger/contract.py): one tagged value per admission, on both
ledgers. The key-status rule is written once in Python (key_refusal) and stated again in the
PostgreSQL admission statement, which needs it to reserve in the same statement; the
PostgreSQL ledger raises when the two disagree, so every refusal here holds them together."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.ledger.contract import (
    Admitted,
    KeyContext,
    KeyRefused,
    PeriodsExpired,
    Rejected,
    key_refusal,
)
from tests.budgets.helpers import admit_request
from tests.conftest import Gateway

CENT = 10_000_000  # nano-dollars


async def test_each_decision_is_its_own_tagged_value(gateway: Gateway) -> None:
    gw = gateway
    hot = gw.state.gateway.hot
    now = gw.clock.now
    ok = await gw.create_key(alias="ok", max_budget=0.05, models=["bg-test"])
    decision = await hot.admit(admit_request(gw, ok["key"], CENT), now())
    assert isinstance(decision, Admitted) and decision.amount == CENT
    assert decision.key.alias == "ok" and decision.periods[0].reserved == CENT

    rejected = await hot.admit(admit_request(gw, ok["key"], 5 * CENT), now())
    assert isinstance(rejected, Rejected) and rejected.amount == 5 * CENT
    assert rejected.refusing.remaining == 4 * CENT

    unknown = await hot.admit(admit_request(gw, "sk-bg-" + "0" * 40, CENT), now())
    assert unknown == KeyRefused(None, "unknown")

    other_model = await hot.admit(admit_request(gw, ok["key"], CENT, model="other"), now())
    assert isinstance(other_model, KeyRefused) and other_model.reason == "model"

    revoked = await gw.create_key(alias="revoked", max_budget=1)
    assert (await gw.admin("DELETE", f"/admin/keys/{revoked['id']}")).status_code in (200, 204)
    decision = await hot.admit(admit_request(gw, revoked["key"], CENT), now())
    assert isinstance(decision, KeyRefused) and decision.reason == "revoked"

    soon = (now() + timedelta(hours=1)).isoformat()
    expiring = await gw.create_key(alias="expiring", max_budget=1, expires_at=soon)
    hourly = await gw.create_key(alias="hourly", max_budget=1, budget_duration="1h")
    gw.clock.advance(timedelta(hours=2))
    decision = await hot.admit(admit_request(gw, expiring["key"], CENT), now())
    assert isinstance(decision, KeyRefused) and decision.reason == "expired"
    decision = await hot.admit(admit_request(gw, hourly["key"], CENT), now())
    assert isinstance(decision, PeriodsExpired) and len(decision.expired) == 1


def test_key_refusal_orders_its_reasons() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    key = KeyContext("k", None, "sk-bg-abc", "active", ["a"], None, [])
    assert key_refusal(key, now, "a") is None and key_refusal(key, now) is None
    assert key_refusal(key, now, "b") == "model"
    assert key_refusal(None, now, "a") == "unknown"
    expired = KeyContext("k", None, "sk-bg-abc", "active", [], now, [])
    assert key_refusal(expired, now, "b") == "expired"
    revoked = KeyContext("k", None, "sk-bg-abc", "revoked", ["a"], now, [])
    assert key_refusal(revoked, now, "b") == "revoked"  # revoked before expired before model
