"""Reading a request body: whole, within a size limit and a time limit, or not at all.

One reader for every route, the proxy's and the admin API's, so that a body that is too large
(413) or too slow (408) gets the same answer everywhere, and a client trickling bytes cannot
hold a connection and a buffer forever.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive, Scope

from app.errors import BadRequest, PayloadTooLarge, RequestTimeout


class ClientLeft(BadRequest):
    """The client disconnected before its body arrived (nobody reads this answer)."""


def is_json_media(content_types: list[str]) -> bool:
    """Whether every content type given (none at all counts) is JSON's."""
    for content_type in content_types:
        media = content_type.split(";", 1)[0].strip().lower()
        if not (
            media == "application/json"
            or (media.startswith("application/") and media.endswith("+json"))
        ):
            return False
    return True


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes")


def declares_more_than(scope: Scope, limit: int) -> bool:
    """The request's Content-Length announces a body over `limit`: refused before reading it."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.isdigit() and int(value) > limit
    return False


async def read_body(receive: Receive, limit: int, seconds: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    # A timer that cancels this task, rather than asyncio.timeout(): the same effect for a
    # fraction of the cost, on a step every request takes.
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(seconds, expire)
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft("client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    except asyncio.CancelledError:
        if not expired:
            raise
        task.uncancel()
        raise RequestTimeout(
            f"the request body did not arrive within {seconds:g} seconds "
            "(BUDGETGATE_BODY_TIMEOUT_SECONDS)"
        ) from None
    finally:
        timer.cancel()


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands over a body already read, then waits as the server's does."""
    pending = True

    async def receive_again() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
