"""Identity to the upstream (BUDGETGATE_FORWARD_IDENTITY, on by default): the upstream learns
which key calls, from the gateway only -- a client cannot claim another key's identity."""

from __future__ import annotations

from app.clock import ManualClock
from tests.conftest import Gateway, make_settings, running_gateway
from tests.keys.helpers import bearer, mock_stats
from tests.servers import ServerThread

CHAT = {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_the_upstream_is_told_the_calling_key(
    gateway: Gateway, mock_upstream: ServerThread
) -> None:
    key = await gateway.create_key(alias="team a/ü", max_budget=1)
    forged = {
        "x-budgetgate-key-id": "key_forged",
        "x_budgetgate_key_alias": "forged",
        "x-litellm-tags": "mine, budgetgate-key:key_forged,other",
    }
    for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
        r = await gateway.client.request(
            method,
            path,
            json=CHAT if method == "POST" else None,
            headers={**bearer(key["key"]), **forged},
        )
        assert r.status_code == 200, r.text
        sent = (await mock_stats(mock_upstream.url))["last_headers"]
        assert sent["x-budgetgate-key-id"] == key["id"]
        assert sent["x-budgetgate-key-alias"] == "team%20a%2F%C3%BC"
        assert "x_budgetgate_key_alias" not in sent
        assert sent["x-litellm-tags"] == (
            f"mine,other,budgetgate-key:{key['id']},budgetgate-alias:team%20a%2F%C3%BC"
        )


async def test_identity_can_be_turned_off(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(database_url, mock_upstream.url, forward_identity=False)
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(alias="quiet", max_budget=1)
        headers = {**bearer(key["key"]), "x-budgetgate-key-id": "key_forged"}
        r = await gw.client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert r.status_code == 200, r.text
        sent = (await mock_stats(mock_upstream.url))["last_headers"]
        assert not any(name.startswith("x-budgetgate-") for name in sent), sent
        assert "x-litellm-tags" not in sent
