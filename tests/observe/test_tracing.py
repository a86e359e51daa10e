"""Tracing (SPEC 12): with a tracer provider, a proxied request is one span with the gateway's
phases as children -- admit, upstream, settle -- carrying the request id; a streamed request's
upstream span lasts to the stream's end. Without an OTLP endpoint nothing is traced."""

from __future__ import annotations

import asyncio

import httpx
from asgi_lifespan import LifespanManager
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracer

from app.clock import ManualClock
from app.main import create_app
from tests.conftest import ADMIN_KEY, make_settings
from tests.keys.helpers import bearer
from tests.servers import ServerThread

CHAT = {"model": "bg-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def test_a_request_is_a_span_with_its_phases(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(database_url, mock_upstream.url)
    app = create_app(settings, clock, run_scheduler=False, migrate=False, tracer_provider=provider)
    async with LifespanManager(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            r = await client.post("/admin/keys", json={"max_budget": 1}, headers=bearer(ADMIN_KEY))
            key = r.json()["key"]
            request_ids = []
            for stream in (False, True):
                exporter.clear()
                r = await client.post(
                    "/v1/chat/completions", json={**CHAT, "stream": stream}, headers=bearer(key)
                )
                assert r.status_code == 200
                await asyncio.sleep(0)  # the settlement's callback ends its span
                request_ids.append(r.headers["x-request-id"])
                spans = {s.name: s for s in exporter.get_finished_spans()}
                assert set(spans) == {"budgetgate.request", "admit", "upstream", "settle"}
                root = spans["budgetgate.request"]
                assert root.attributes is not None
                assert root.attributes["budgetgate.request_id"] == r.headers["x-request-id"]
                assert root.attributes["http.route"] == "/chat/completions"
                assert root.attributes["budgetgate.outcome"] == "ok"
                for phase in ("admit", "upstream", "settle"):
                    assert spans[phase].parent is not None
                    assert spans[phase].parent.span_id == root.context.span_id
                    assert spans[phase].context.trace_id == root.context.trace_id
                assert spans["admit"].end_time <= spans["upstream"].start_time  # type: ignore[operator]
                assert spans["upstream"].end_time <= spans["settle"].start_time  # type: ignore[operator]
    assert len(set(request_ids)) == 2


async def test_no_endpoint_no_tracing(
    database_url: str, mock_upstream: ServerThread, clock: ManualClock
) -> None:
    settings = make_settings(database_url, mock_upstream.url)
    app = create_app(settings, clock, run_scheduler=False, migrate=False)
    async with LifespanManager(app):
        assert isinstance(app.state.gateway.tracer, NoOpTracer)  # type: ignore[attr-defined]
