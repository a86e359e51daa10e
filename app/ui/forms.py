"""The dashboard's forms read as the admin API's bodies: key settings, days."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from app.ui.access import PageError

DURATIONS = ("", "1h", "1d", "1w", "1mo", "3mo", "1y")


def key_fields(form: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The key settings a form gives, as the admin API's body would; blank is none."""
    out: dict[str, Any] = {}
    errors: list[str] = []
    out["alias"] = form.get("alias", "").strip() or None
    for name in ("max_budget", "soft_budget"):
        raw = form.get(name, "").strip().lstrip("$").replace(",", "")
        if raw:
            try:
                out[name] = Decimal(raw)
            except InvalidOperation:
                errors.append(f"{name.replace('_', ' ')}: not a dollar amount")
        else:
            out[name] = None
    out["budget_duration"] = form.get("budget_duration", "").strip() or None
    out["budget_timezone"] = form.get("budget_timezone", "").strip() or "UTC"
    out["models"] = [m.strip() for m in form.get("models", "").split(",") if m.strip()]
    expires = form.get("expires_at", "").strip()
    if expires:
        try:
            out["expires_at"] = datetime.fromisoformat(expires).replace(tzinfo=UTC)
        except ValueError:
            errors.append("expires: not a date and time")
    else:
        out["expires_at"] = None
    return out, errors


def validation_messages(exc: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e['loc']).replace('_', ' ')}: {e['msg']}" for e in exc.errors()
    ]


def form_values(form: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in form.items() if k != "csrf"}


def day_param(value: str | None, default: date) -> date:
    if not value:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise PageError(422, f"Not a date (YYYY-MM-DD): {value[:40]}") from None
