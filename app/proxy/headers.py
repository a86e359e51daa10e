"""Which headers cross the gateway, and the budget headers it adds."""

from __future__ import annotations

import math
from datetime import datetime
from urllib.parse import quote

from starlette.datastructures import Headers

from app.budgets.state import PeriodState, tightest
from app.keys.credentials import CLIENT_KEY_HEADERS

# RFC 9110 hop-by-hop headers, plus what the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "x-request-id",
    }
)
# Every header an upstream may read a credential from (LiteLLM-ROUTES.md section 4): all are
# removed, and the gateway sets exactly one credential of its own. Compared with `_` read as
# `-`, since servers and proxies in front of an upstream may treat them alike.
CREDENTIAL_HEADERS = frozenset(
    {
        *CLIENT_KEY_HEADERS,
        "x-litellm-api-key",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
        "litellm-user-api-key",
        "proxy-authorization",
        "cookie",
        "cookie2",
        "sec-websocket-protocol",
    }
)
# Set by the gateway from what it saw (the client's address, scheme and host), never taken
# from the client (nor any other x-forwarded-*); and LiteLLM's header that picks a deployment
# apart from the priced model.
_GATEWAY_SET = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-real-ip"}
)
# Headers some servers and frameworks read to rewrite what the request is (its origin, URL or
# method): none of the client's are passed on.
_GATEWAY_SET_PREFIXES = ("x-forwarded-", "x-original-")
_REWRITES = frozenset(
    {"x-rewrite-url", "x-http-method-override", "x-http-method", "x-method-override"}
)
_REQUEST_DROP = HOP_BY_HOP | _GATEWAY_SET | _REWRITES | {"accept-encoding", "x-litellm-model"}
# The caller's identity, as the gateway tells it to the upstream (never as a client says it).
IDENTITY_PREFIX = "x-budgetgate-"
IDENTITY_TAG_PREFIX = "budgetgate-"
LITELLM_TAGS = "x-litellm-tags"
# What an upstream says about its own credentials and deployments is not the client's to see.
_RESPONSE_DROP = HOP_BY_HOP | {
    "content-encoding",
    "date",
    "server",
    "set-cookie",
    "x-litellm-key-spend",
    "x-litellm-key-max-budget",
    "x-litellm-model-api-base",
}


def upstream_headers(
    headers: Headers,
    request_id: str,
    credential: str | None,
    client: tuple[str, str, str],
    json_body: bool,
) -> dict[str, str]:
    """The client's headers as the upstream gets them: hop-by-hop headers and every header
    `Connection` names dropped, every credential-bearing header removed and exactly one set
    (`credential`: the gateway's upstream key, or the client's budgeted key in passthrough
    mode), the forwarding headers set from what the gateway saw (`client`: address, scheme,
    host). A body the gateway read as JSON (`json_body`) goes with that content type, so that
    the upstream reads it as the gateway did (LiteLLM reads a body as a form when its
    content type so much as mentions one)."""
    # Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1); what the gateway sets
    # below is set after, so Connection cannot remove it.
    named = {
        t.strip().lower().replace("_", "-")
        for v in headers.getlist("connection")
        for t in v.split(",")
    }
    drop = _REQUEST_DROP | named | CREDENTIAL_HEADERS
    # Names compared with `_` read as `-`: an intermediary may treat them alike.
    out = {
        k: v
        for k, v in headers.items()
        if (n := k.replace("_", "-")) not in drop
        and not n.startswith(_GATEWAY_SET_PREFIXES)
        and not n.startswith(IDENTITY_PREFIX)
    }
    if json_body:
        out["content-type"] = "application/json"
    if credential:
        out["authorization"] = f"Bearer {credential}"
    address, scheme, host = client
    out["x-forwarded-for"] = address
    out["x-forwarded-proto"] = scheme
    if host:
        out["x-forwarded-host"] = host
    out["x-request-id"] = request_id
    out["accept-encoding"] = "identity"
    return out


def add_identity(out: dict[str, str], key_id: str, alias: str | None) -> None:
    """Tells the upstream who is calling (LiteLLM sees one credential for everyone in managed
    mode): `x-budgetgate-key-id` and `-key-alias` (percent-encoded), and the same as tags in
    `x-litellm-tags`, after the client's own tags (minus any that claim to be the gateway's)."""
    out[IDENTITY_PREFIX + "key-id"] = key_id
    tags = [f"{IDENTITY_TAG_PREFIX}key:{key_id}"]
    if alias:
        out[IDENTITY_PREFIX + "key-alias"] = quote(alias, safe="")
        tags.append(f"{IDENTITY_TAG_PREFIX}alias:{quote(alias, safe='')}")
    name = next((k for k in out if k.lower().replace("_", "-") == LITELLM_TAGS), None)
    own = out.pop(name) if name is not None else ""
    kept = [t.strip() for t in own.split(",") if t.strip()]
    kept = [t for t in kept if not t.startswith(IDENTITY_TAG_PREFIX)]
    out[LITELLM_TAGS] = ",".join(kept + tags)


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
