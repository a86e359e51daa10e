"""The webhook receiver the alert tests POST to, and small helpers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.alerts.service import AlertService
from tests.conftest import Gateway
from tests.servers import ServerThread


class Receiver:
    """The webhook: records what it is sent (the JSON, and each POST's headers and exact body
    bytes); answers 500 to the first `fail` POSTs; holds every POST while `gate` is closed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.fail = 0
        self.gate = threading.Event()
        self.gate.set()
        self.server = ServerThread(Starlette(routes=[Route("/hook", self.hook, methods=["POST"])]))

    @property
    def url(self) -> str:
        return f"{self.server.url}/hook"

    def reset(self) -> None:
        self.events.clear()
        self.posts.clear()
        self.fail = 0
        self.gate.set()

    async def hook(self, request: Request) -> Response:
        await asyncio.to_thread(self.gate.wait, 10)
        if self.fail > 0:
            self.fail -= 1
            return Response(status_code=500)
        self.posts.append((dict(request.headers), await request.body()))
        self.events.append(await request.json())
        return Response(status_code=204)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == f"budget.{kind}"]


def alerts(gw: Gateway) -> AlertService:
    return gw.app.state.alerts  # type: ignore[no-any-return]


async def until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")
