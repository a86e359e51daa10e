"""How an alert event is POSTed: the body for the receiver's format, and its signature.

* Format: a Slack incoming webhook (`https://hooks.slack.com/services/...`) gets Slack's message
  (`{"text": ...}`, one line per event), a Microsoft Teams incoming webhook
  (`https://<tenant>.webhook.office.com/...`) a MessageCard with the same line; any other URL
  the event itself, as JSON. BUDGETGATE_ALERT_WEBHOOK_FORMAT names the format instead, for a
  compatible receiver elsewhere (Mattermost, a relay in front of Slack).
* Signature: with BUDGETGATE_ALERT_SECRET, `x-budgetgate-signature: sha256=<hex>` is the
  HMAC-SHA256 of the exact body bytes (GitHub's scheme). No timestamp is signed: a delivery is
  at least once, so receivers drop repeated event ids anyway, which also drops a replay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import SecretStr

from app.kit.money import format_usd

WebhookFormat = Literal["json", "slack", "teams"]
SIGNATURE_HEADER = "x-budgetgate-signature"


def detect_format(url: str) -> WebhookFormat:
    """Slack for a Slack incoming webhook (`https://hooks.slack.com/services/...`; Slack's
    workflow webhooks, `/triggers/...`, take the event's own fields like any other URL), Teams
    for a Teams incoming webhook (`https://<tenant>.webhook.office.com/...`)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if host == "hooks.slack.com" and parts.path.startswith("/services/"):
        return "slack"
    if host.endswith(".webhook.office.com"):
        return "teams"
    return "json"


def sign(secret: str, body: bytes) -> str:
    """The x-budgetgate-signature value of a body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Webhook:
    """Where alerts go, and how they are written there."""

    url: str
    format: WebhookFormat
    secret: SecretStr | None = None

    @classmethod
    def for_url(
        cls,
        url: str,
        format: WebhookFormat | Literal["auto"] = "auto",
        secret: SecretStr | None = None,
    ) -> Webhook:
        return cls(url, detect_format(url) if format == "auto" else format, secret)

    def request(self, event: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The body and headers of the POST of one event."""
        message: dict[str, Any] = event
        if self.format == "slack":
            message = {"text": _escape_markup(summary(event))}
        elif self.format == "teams":
            message = {
                "@type": "MessageCard",
                "@context": "https://schema.org/extensions",
                "summary": summary(event),  # the notification's plain text
                "text": _escape_markup(summary(event)),
            }
        body = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {"content-type": "application/json"}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret.get_secret_value(), body)
        return body, headers


def summary(event: dict[str, Any]) -> str:
    """One line a person reads in a chat channel at 3 a.m.: what happened, to which key, the
    money, and until when."""
    kind = event["type"]
    key = f"key {event['alias']!r} ({event['key_prefix']}…)" if event.get("alias") else None
    key = key or f"key {event['key_prefix']}… ({event['key_id']})"
    spent = f"{_usd(event['spend'])} (no limit)"
    if event.get("max_budget") is not None:
        spent = f"{_usd(event['spend'])} of {_usd(event['max_budget'])} spent"
    until = f"period ends {event['period_end']}" if event.get("period_end") else "lifetime budget"
    if kind == "budget.threshold":
        percent = Decimal(str(event["threshold"])).scaleb(2).normalize()
        budget = f"{event['budget_duration']} budget" if event.get("budget_duration") else "budget"
        return f"budgetgate: {key} reached {percent:f}% of its {budget}: {spent}; {until}"
    if kind == "budget.soft_budget_crossed":
        return (
            f"budgetgate: {key} crossed its soft budget of {_usd(event['soft_budget'])}: "
            f"{spent}; {until}"
        )
    if kind == "budget.exhausted":
        return f"budgetgate: {key} is out of budget, requests refused: {spent}; {until}"
    if kind == "budget.overrun":
        return (
            f"budgetgate: request {event['request_id']} of {key} cost {_usd(event['cost'])}, "
            f"{_usd(event['overrun'])} more than it reserved; {spent}; {until}"
        )
    return f"budgetgate: {kind} for {key}"


def _usd(amount: float) -> str:
    """Dollars with cents, and the smaller digits only when there are any ($0.015)."""
    return format_usd(int(Decimal(str(amount)).scaleb(9)))


def _escape_markup(text: str) -> str:
    """Slack reads `<...>` as links and mentions (`<!channel>`), Teams as HTML: an alias is
    shown as written, never pings or links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
