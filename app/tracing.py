"""OpenTelemetry tracing, off unless an OTLP endpoint is configured (SPEC 12).

A proxied request is one span (`budgetgate.request`) with a child per phase of the gateway's
own: `admit` (authenticate and reserve), `upstream` (from sending the request to the end of
the answer, a stream's last byte included) and `settle`. Off, the tracer is OpenTelemetry's
no-op one: starting a span costs a function call.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Tracer

from app.config import Settings

TRACER_NAME = "budgetgate"


def create_tracer_provider(settings: Settings) -> TracerProvider | None:
    """A provider exporting to BUDGETGATE_OTLP_ENDPOINT (OTLP over HTTP), or None when unset."""
    if settings.otlp_endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": "budgetgate"}))
    endpoint = settings.otlp_endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def tracer_of(provider: TracerProvider | None) -> Tracer:
    return provider.get_tracer(TRACER_NAME) if provider is not None else trace.NoOpTracer()


def start_request(tracer: Tracer, method: str, request_id: str) -> Span | None:
    """The request's span; None when tracing is off (then its phases cost nothing at all)."""
    if isinstance(tracer, trace.NoOpTracer):
        return None
    span = tracer.start_span("budgetgate.request", kind=SpanKind.SERVER)
    span.set_attribute("http.request.method", method)
    span.set_attribute("budgetgate.request_id", request_id)
    return span


def start_phase(tracer: Tracer, name: str, parent: Span | None) -> Span:
    if parent is None:
        return trace.INVALID_SPAN
    return tracer.start_span(name, context=trace.set_span_in_context(parent))
