"""Cursors give back exactly what they were made of, and refuse anything else."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.kit.cursors import InvalidCursor, decode_cursor, encode_cursor


@given(st.lists(st.text(), min_size=1, max_size=3))
def test_round_trip(parts: list[str]) -> None:
    cursor = encode_cursor(*parts)
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor
    assert decode_cursor(cursor, len(parts)) == tuple(parts)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    ["", "x", "%%%", "bm9wZQ", _b64(b'{"a": 1}'), _b64(b"[1, 2]"), _b64(b'["a"]'), _b64(b"\xff")],
)
def test_refuses_what_it_did_not_make(cursor: str) -> None:
    with pytest.raises(InvalidCursor, match="not a cursor returned by this API"):
        decode_cursor(cursor, 2)
