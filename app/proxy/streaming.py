"""Streaming responses that notice a client leaving at once and always run their cleanup."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import anyio
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class RelayResponse(StreamingResponse):
    """A StreamingResponse that always listens for the client's disconnect while streaming
    (Starlette only does so for ASGI < 2.4 servers; otherwise a client that leaves while the
    upstream is quiet goes unnoticed until the next write), and that always closes its body
    iterator, so the iterator's `finally` (settlement) runs promptly, exactly once."""

    body_iterator: AsyncIterator[bytes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:

            async def run_then_cancel(func: Callable[[], Awaitable[None]]) -> None:
                try:
                    await func()
                except OSError:  # the client's socket is gone
                    pass
                tg.cancel_scope.cancel()

            tg.start_soon(run_then_cancel, partial(self._stream_and_close, send))
            await run_then_cancel(partial(self.listen_for_disconnect, receive))

    async def _stream_and_close(self, send: Send) -> None:
        try:
            await self.stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()


def sse_error_event(message: str, type_: str, code: str) -> bytes:
    """How a stream that failed after it began tells the client: an OpenAI error event (the
    openai SDK raises on it), never a clean end that looks complete."""
    body = orjson.dumps({"error": {"message": message, "type": type_, "code": code, "param": None}})
    return b"event: error\ndata: " + body + b"\n\n"
