"""The HTTP server's protocol: uvicorn's httptools protocol with limits on request heads.

uvicorn times out idle keep-alive connections, but any byte received cancels that timer, and
nothing bounds how long a request's head may take to arrive (a client trickling a head one
byte a second holds its connection forever) nor how large it may be (httptools buffers a 10 MB
header whole, before any key is checked). Here a head that has not arrived in full within
BUDGETGATE_BODY_TIMEOUT_SECONDS of its first byte closes the connection (its body then has as
long again, app/body.py), and one larger than MAX_HEAD_BYTES is answered 431 and closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings
from app.errors import AppError, error_body

# Request line and headers together (nginx allows 4 x 8 KB by default; LiteLLM's h11 16 KB).
MAX_HEAD_BYTES = 64 * 1024


def head_too_large() -> AppError:
    return AppError(
        f"the request head (request line and headers) is larger than {MAX_HEAD_BYTES} bytes",
        status=431,
        code="request_header_fields_too_large",
    )


_TOO_LARGE = error_body(head_too_large().message, "invalid_request_error", head_too_large().code)
_TOO_LARGE_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: "
    + str(len(_TOO_LARGE)).encode()
    + b"\r\n\r\n"
    + _TOO_LARGE
)


class HeadTimeoutProtocol(HttpToolsProtocol):
    head_seconds: float | None = None  # None: BUDGETGATE_BODY_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = self.head_seconds or get_settings().body_timeout_seconds
        self.head_deadline: asyncio.TimerHandle | None = None
        # Bytes received since the current head began (counted until it is complete; the
        # last chunk may carry body bytes too, so the cap is checked only while incomplete).
        self.in_head = True
        self.head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if self.in_head:
            self.head_bytes += len(data)
        super().data_received(data)
        if self.in_head and self.head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._disarm_head_deadline()
            self.transport.write(_TOO_LARGE_RESPONSE)
            self.transport.close()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.in_head, self.head_bytes = True, 0  # what comes next is the next request's head

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()  # a client that connects and sends nothing, too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_head_deadline()
        self.in_head = False
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        if self.head_deadline is None:
            self.head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_too_slow(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadTimeoutProtocol]:
    """The protocol with another deadline (an app served in-process, with its own settings)."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_seconds": seconds})
