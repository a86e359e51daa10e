"""x-litellm-response-cost: trusted by default (cost_source "upstream"); ignored with
trust_upstream_cost=False (priced from usage instead)."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import pytest

from tests.e2e.conftest import LiveGateway

MOCK_COST = {"x-mock-cost": "0.0123"}


def chat(gw: LiveGateway, key: dict, stream: bool = False):  # noqa: ANN201
    return gw.http.post(
        "/v1/chat/completions",
        json={
            "model": "bg-test",
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 10,
            "stream": stream,
        },
        headers={"authorization": f"Bearer {key['key']}", **MOCK_COST},
    )


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_cost_header_is_charged_exactly(live: LiveGateway, stream: bool) -> None:
    key = live.create_key()
    r = chat(live, key, stream)
    assert r.status_code == 200, r.text
    if not stream:
        assert r.headers["x-budget-spend"] == "0.0123"
    [entry] = live.wait_ledger(key["id"], 1)
    assert (entry["outcome"], entry["cost"], entry["cost_source"]) == (
        "ok",
        Decimal("0.0123"),
        "upstream",
    )
    assert entry["completion_tokens"] == 10
    assert live.assert_settled(key["id"])["spend"] == Decimal("0.0123")


@pytest.mark.parametrize("stream", [False, True])
def test_untrusted_upstream_cost_is_priced_from_usage(
    live_factory: Callable[..., LiveGateway], stream: bool
) -> None:
    gw = live_factory(trust_upstream_cost=False)
    key = gw.create_key()
    r = chat(gw, key, stream)
    assert r.status_code == 200, r.text
    [entry] = gw.wait_ledger(key["id"], 1)
    assert (entry["outcome"], entry["cost"], entry["cost_source"]) == (
        "ok",
        Decimal("0.01"),  # 10 output tokens x $0.001
        "prices",
    )
    assert gw.assert_settled(key["id"])["spend"] == Decimal("0.01")
