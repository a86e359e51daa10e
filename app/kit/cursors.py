"""Opaque page cursors: the sort key of a page's last row, for keyset pagination.

A cursor is URL-safe base64 (unpadded) of a JSON list of strings. Clients pass it back as it
is; anything else is refused, never trusted to build a query."""

from __future__ import annotations

import base64
import binascii

import orjson

__all__ = ["InvalidCursor", "decode_cursor", "encode_cursor"]


class InvalidCursor(ValueError):
    def __init__(self) -> None:
        super().__init__("not a cursor returned by this API")


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode().rstrip("=")


def decode_cursor(cursor: str, parts: int) -> tuple[str, ...]:
    """The `parts` strings `encode_cursor` was given; InvalidCursor for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = orjson.loads(raw)
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise InvalidCursor() from None
    if (
        not isinstance(values, list)
        or len(values) != parts
        or not all(isinstance(v, str) for v in values)
    ):
        raise InvalidCursor()
    return tuple(values)
