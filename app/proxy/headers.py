"""Which headers cross the gateway, and the budget headers it adds."""

from __future__ import annotations

import math
from datetime import datetime

from starlette.datastructures import Headers

from app.budgets.state import PeriodState, tightest

# RFC 9110 hop-by-hop headers, plus what the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "x-request-id",
    }
)
CREDENTIAL_HEADERS = frozenset({"authorization", "api-key", "x-api-key"})
_CREDENTIAL_RAW = frozenset(h.encode() for h in CREDENTIAL_HEADERS)
# The gateway reads upstream bodies (usage), so it asks for them uncompressed.
_REQUEST_DROP = HOP_BY_HOP | {"accept-encoding"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-encoding", "date", "server"}


def presented_key(headers: Headers) -> str | None:
    # A credential header sent twice is ambiguous: the gateway would check the first value
    # while passthrough mode forwarded the last one. That is no key (401).
    sent = [name for name, _ in headers.raw if name in _CREDENTIAL_RAW]
    if len(sent) > 1 and len(sent) != len(set(sent)):
        return None
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return headers.get("api-key") or headers.get("x-api-key") or None


def upstream_headers(
    headers: Headers, request_id: str, upstream_key: str | None, passthrough: bool
) -> dict[str, str]:
    """The client's headers minus hop-by-hop ones; in managed mode the client's credential is
    replaced by the gateway's upstream credential (passthrough forwards it unchanged)."""
    drop = _REQUEST_DROP if passthrough else _REQUEST_DROP | CREDENTIAL_HEADERS
    # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    drop = drop | {t.strip().lower() for v in headers.getlist("connection") for t in v.split(",")}
    out = {k: v for k, v in headers.items() if k not in drop}
    if not passthrough and upstream_key:
        out["authorization"] = f"Bearer {upstream_key}"
    out["x-request-id"] = request_id
    out["accept-encoding"] = "identity"
    return out


def response_headers(raw: list[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in raw if k.lower() not in _RESPONSE_DROP}


def format_dollars(nanos: int) -> str:
    """Nano-dollars as a decimal number of dollars, exact, without trailing zeros: 1.5, 0.0."""
    whole, frac = divmod(abs(nanos), 1_000_000_000)
    text = f"{'-' if nanos < 0 else ''}{whole}.{frac:09d}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def rfc3339(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def budget_headers(states: list[PeriodState], request_id: str) -> dict[str, str]:
    """x-budget-* for the tightest budget that applies, and x-request-id."""
    out = {"x-request-id": request_id}
    state = tightest(states)
    if state is None:
        return out
    out["x-budget-spend"] = format_dollars(state.spend)
    if state.max_budget is not None:
        out["x-budget-max-budget"] = format_dollars(state.max_budget)
        out["x-budget-remaining"] = format_dollars(state.remaining or 0)
    if state.period_end is not None:
        out["x-budget-reset-at"] = rfc3339(state.period_end)
    return out


def retry_after(state: PeriodState, now: datetime) -> dict[str, str]:
    if state.period_end is None:
        return {}
    return {"retry-after": str(max(1, math.ceil((state.period_end - now).total_seconds())))}
