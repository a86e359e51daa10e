"""The HTTP server's protocol: uvicorn's httptools protocol with a deadline on request heads.

uvicorn times out idle keep-alive connections, but any byte received cancels that timer, and
nothing bounds how long a request's head may take to arrive: a client trickling a head one
byte a second holds its connection forever. Here a head that has not arrived in full within
BUDGETGATE_BODY_TIMEOUT_SECONDS of its first byte closes the connection (its body then has as
long again, app/body.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import get_settings


class HeadTimeoutProtocol(HttpToolsProtocol):
    head_seconds: float | None = None  # None: BUDGETGATE_BODY_TIMEOUT_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout = self.head_seconds or get_settings().body_timeout_seconds
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()  # a client that connects and sends nothing, too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_head_deadline()
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
