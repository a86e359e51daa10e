"""The key a client presents: where it may be sent, and when what it sent is ambiguous."""

from __future__ import annotations

from starlette.datastructures import Headers

from app.errors import Unauthorized

# Where a client presents its budgetgate (or, in passthrough mode, upstream) key.
CLIENT_KEY_HEADERS = ("authorization", "api-key", "x-api-key")
_CLIENT_KEY_RAW = frozenset(h.encode() for h in CLIENT_KEY_HEADERS)


class AmbiguousCredentials(Unauthorized):
    code = "ambiguous_credentials"


def presented_key(headers: Headers) -> str | None:
    """The key the client presents in `Authorization: Bearer`, `api-key` or `x-api-key`; None
    when there is none. Several of them (or one sent twice) with different values are a 401:
    the gateway would budget one key while an upstream might read another."""
    values: set[str] = set()
    unusable = False
    for name, raw in headers.raw:
        if name not in _CLIENT_KEY_RAW:
            continue
        value = raw.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = value.partition(" ")
            # Anything but `Bearer <token>` (Basic, a bare scheme, ...) is a credential the
            # gateway cannot budget: never a key, and beside a key it makes the request
            # ambiguous (an upstream may read it first).
            if scheme.lower() != "bearer" or not token.strip():
                unusable = unusable or bool(value)
                continue
            value = token.strip()
        if value:
            values.add(value)
    if len(values) > 1 or (values and unusable):
        raise AmbiguousCredentials(
            "more than one credential with different values (Authorization, api-key, "
            "x-api-key): send the key once"
        )
    return values.pop() if values else None
