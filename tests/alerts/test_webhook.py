"""SPEC 12: alert POSTs are signed (`x-budgetgate-signature`, HMAC-SHA256 of the exact body with
BUDGETGATE_ALERT_SECRET), and a Slack incoming webhook gets Slack's message format (a Teams one
a MessageCard). A real HTTP receiver; the signature is checked as the README tells a receiver
to check it."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from app.alerts.service import AlertService
from app.alerts.webhook import Webhook, detect_format, summary
from app.config import Settings
from app.scheduler import run_alerts
from tests.alerts.helpers import Receiver, alerts
from tests.budgets.helpers import chat_billed
from tests.conftest import Gateway, make_settings, running_gateway
from tests.servers import ServerThread

SECRET = "whsec-test-8f3a1c9e"


def verified(secret: str, body: bytes, signature: str) -> bool:
    """The receiver's check, as in the README."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


async def send_with(gw: Gateway, **settings: Any) -> None:
    """A scheduler pass of an alert service with these settings, on the gateway's ledger."""
    configured = make_settings(
        gw.settings.database_url,
        gw.settings.upstream_url,
        alert_webhook_url=gw.settings.alert_webhook_url,
        **settings,
    )
    service = AlertService.from_settings(gw.state.engine, gw.clock, configured)
    try:
        await run_alerts(service)
    finally:
        await service.close()


async def test_every_post_is_signed_with_the_secret(gw: Gateway, receiver: Receiver) -> None:
    key = await gw.create_key(alias="signed", max_budget=0.02, soft_budget=0, alert_at=[0.5])
    assert (await gw.chat(key["key"])).status_code == 200
    await send_with(gw, alert_secret=SECRET)
    assert sorted(e["type"] for e in receiver.events) == [
        "budget.soft_budget_crossed",
        "budget.threshold",
    ]
    for headers, body in receiver.posts:
        signature = headers["x-budgetgate-signature"]
        assert signature.startswith("sha256=") and verified(SECRET, body, signature)
        assert not verified("another-secret", body, signature)
        assert not verified(SECRET, body.replace(b"signed", b"sign3d"), signature)
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["key_id"] == key["id"]


async def test_without_a_secret_nothing_is_signed(gw: Gateway, receiver: Receiver) -> None:
    key = await gw.create_key(max_budget=1, soft_budget=0)
    assert (await gw.chat(key["key"])).status_code == 200
    await run_alerts(alerts(gw))
    ((headers, _),) = receiver.posts
    assert "x-budgetgate-signature" not in headers


async def test_the_gateway_signs_with_its_configured_secret(
    database_url: str, mock_upstream: ServerThread, clock: Any, receiver: Receiver
) -> None:
    receiver.reset()
    settings = make_settings(
        database_url, mock_upstream.url, alert_webhook_url=receiver.url, alert_secret=SECRET
    )
    async with running_gateway(settings, clock) as gw:
        key = await gw.create_key(max_budget=1, soft_budget=0)
        assert (await gw.chat(key["key"])).status_code == 200
        await run_alerts(alerts(gw))
    ((headers, body),) = receiver.posts
    assert verified(SECRET, body, headers.get("x-budgetgate-signature", ""))


def test_slack_and_teams_incoming_webhooks_are_recognised_by_their_url() -> None:
    assert detect_format("https://hooks.slack.com/services/T000/B000/XXXX") == "slack"
    assert detect_format("https://HOOKS.SLACK.COM/services/T000/B000/XXXX") == "slack"
    teams = "https://contoso.webhook.office.com/webhookb2/a1@b2/IncomingWebhook/c3/d4"
    assert detect_format(teams) == "teams"
    for other in (
        "https://hooks.slack.com/triggers/T000/123/abc",  # a workflow: it takes the fields
        "https://hooks.slack.com.example.net/services/T000",
        "https://webhook.office.com.example.net/webhookb2/x",
        "https://example.net/hooks.slack.com/services",
        "https://alerts.example.net/budget",
        "http://127.0.0.1:9000/hook",
    ):
        assert detect_format(other) == "json", other
    event = {"type": "budget.exhausted", "key_id": "key_1", "alias": "a", "key_prefix": "sk-bg"}
    event.update(spend=1, max_budget=1, period_end=None)
    body, _ = Webhook.for_url("https://hooks.slack.com/services/T0/B0/x").request(event)
    assert json.loads(body) == {"text": summary(event)}
    body, _ = Webhook.for_url("https://hooks.slack.com/services/T0/B0/x", "json").request(event)
    assert json.loads(body) == event
    event["alias"] = "<b>a</b> & co"
    body, _ = Webhook.for_url(teams).request(event)
    assert json.loads(body) == {
        "@type": "MessageCard",
        "@context": "https://schema.org/extensions",
        "summary": summary(event),
        "text": summary(event).replace("<b>a</b> & co", "&lt;b&gt;a&lt;/b&gt; &amp; co"),
    }


def test_the_format_setting_is_auto_json_slack_or_teams() -> None:
    assert Settings(_env_file=None).alert_webhook_format == "auto"  # type: ignore[call-arg]
    assert Settings(_env_file=None, alert_webhook_format="Slack").alert_webhook_format == "slack"  # type: ignore[call-arg]
    assert Settings(_env_file=None, alert_webhook_format="teams").alert_webhook_format == "teams"  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="alert_webhook_format"):
        Settings(_env_file=None, alert_webhook_format="discord")  # type: ignore[call-arg]


async def test_a_slack_webhook_gets_one_readable_line_per_event(
    gw: Gateway, receiver: Receiver
) -> None:
    """The receiver stands for Slack (BUDGETGATE_ALERT_WEBHOOK_FORMAT=slack, which a
    hooks.slack.com URL selects by itself). Slack would read `<!channel>` in an alias as a
    mention: it is escaped."""
    key = await gw.create_key(
        alias="<!channel> team-a",
        max_budget=0.03,
        soft_budget=0.015,
        budget_duration="1mo",
        alert_at=[0.5, 0.9],
    )
    assert (await gw.chat(key["key"], max_tokens=15)).status_code == 200
    await send_with(gw, alert_webhook_format="slack", alert_secret=SECRET)
    over = await chat_billed(gw, key, "0.012")  # reserved $0.01: an overrun
    assert over.status_code == 200
    request_id = over.headers["x-request-id"]
    await send_with(gw, alert_webhook_format="slack", alert_secret=SECRET)
    label = "key '&lt;!channel&gt; team-a' (" + key["key_prefix"] + "…)"
    period = "period ends 2026-02-01T00:00:00Z"
    for headers, body in receiver.posts:  # Slack's messages are signed too
        assert verified(SECRET, body, headers["x-budgetgate-signature"])
    texts = sorted(message["text"] for message in receiver.events)
    assert texts == sorted(
        [
            f"budgetgate: {label} reached 50% of its 1mo budget: $0.015 of $0.03 spent; {period}",
            f"budgetgate: {label} crossed its soft budget of $0.015: $0.015 of $0.03 spent; "
            f"{period}",
            f"budgetgate: {label} reached 90% of its 1mo budget: $0.027 of $0.03 spent; {period}",
            f"budgetgate: request {request_id} of {label} cost $0.012, $0.002 more than it "
            f"reserved; $0.027 of $0.03 spent; {period}",
        ]
    ), texts
    assert all(set(message) == {"text"} for message in receiver.events)


def test_summaries_of_keys_without_alias_or_limit() -> None:
    event = {
        "type": "budget.overrun",
        "key_id": "key_1",
        "alias": None,
        "key_prefix": "sk-bg-abc",
        "spend": 1234.5,
        "max_budget": None,
        "period_end": None,
        "request_id": "req_1",
        "cost": 0.5,
        "overrun": 0.25,
    }
    assert summary(event) == (
        "budgetgate: request req_1 of key sk-bg-abc… (key_1) cost $0.50, $0.25 more than it "
        "reserved; $1,234.50 (no limit); lifetime budget"
    )
