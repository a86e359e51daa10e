"""A real webhook receiver (one per module) and the gateway, on both ledgers, sending to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.alerts.helpers import Receiver
from tests.conftest import Gateway, make_settings, running_gateway
from tests.servers import ServerThread


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.server.start()
    yield r
    r.server.stop()


@pytest.fixture
async def gw(
    database_url: str, mock_upstream: ServerThread, clock: Any, receiver: Receiver
) -> AsyncIterator[Gateway]:
    receiver.reset()
    settings = make_settings(database_url, mock_upstream.url, alert_webhook_url=receiver.url)
    async with running_gateway(settings, clock) as gateway:
        yield gateway
