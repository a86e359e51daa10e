"""What an answered request is charged (SPEC 4 order: the upstream's cost header, usage x the
answering model's price, an estimate from what was forwarded), one path for whole bodies and
streams."""

from __future__ import annotations

import functools

import aiohttp
import orjson

from app.ledger.contract import Outcome
from app.pricing.cost import COST_HEADER, CostCalculator
from app.pricing.money import ceil_div
from app.proxy.request import MeteredRequest
from app.proxy.usage import StreamMeter, Usage, usage_from_body

# Endpoints priced per unit the request names (images, characters): their bound is their cost.
_PRICED_BY_REQUEST = frozenset({"/images/generations", "/audio/speech"})


def unmetered_outcome(
    costs: CostCalculator,
    header: str | None,
    outcome: str,
    status: int | None,
    unbounded: bool = False,
) -> Outcome:
    """A request with no metered body (an operator's extra route, `unbounded`: its cost could
    not be bounded before it was forwarded), or an upstream error: the header's cost, if any."""
    cost = costs.from_header(header)
    source = "unbounded" if unbounded else "upstream" if cost is not None else "none"
    return Outcome(outcome, cost or 0, source, status_code=status)


def _charge(
    costs: CostCalculator,
    metered: MeteredRequest,
    header: str | None,
    response_model: str | None,
    usage: Usage | None,
    estimate: Usage,
) -> tuple[int, str]:
    return costs.charge(
        header,
        [response_model, metered.model],
        usage,
        None if metered.endpoint in _PRICED_BY_REQUEST else estimate,
        functools.partial(costs.bound, metered),
    )


def body_outcome(
    costs: CostCalculator,
    metered: MeteredRequest,
    header: str | None,
    data: object,
    content_length: int,
    status: int,
) -> Outcome:
    """A whole answer: its usage, or (none given) the input forwarded and a token per four
    bytes of the answer, charged as `estimated`."""
    usage, response_model = usage_from_body(data)
    estimate = Usage(ceil_div(metered.input_bound, 4), ceil_div(content_length, 4))
    cost, source = _charge(costs, metered, header, response_model, usage, estimate)
    return Outcome(
        "ok",
        cost,
        source,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None,
        status,
    )


def stream_outcome(
    costs: CostCalculator,
    metered: MeteredRequest,
    header: str | None,
    meter: StreamMeter,
    outcome: str,
    status: int | None,
) -> Outcome:
    """A stream: its final usage, or (cut before it) the input forwarded, the output relayed
    and the tool calls seen, charged as `estimated`."""
    usage = None if meter.usage_partial else meter.usage
    if usage is not None:
        usage = usage.merged(meter.calls)
    estimate = meter.fallback_usage(ceil_div(metered.input_bound, 4))
    cost, source = _charge(costs, metered, header, meter.model, usage, estimate)
    return Outcome(
        outcome,
        cost,
        source,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else estimate.completion_tokens,
        status,
    )


def outcome_of_body(
    costs: CostCalculator,
    resp: aiohttp.ClientResponse,
    metered: MeteredRequest | None,
    content: bytes,
) -> Outcome:
    """How a request answered with a whole body ended, and what it is charged."""
    header = resp.headers.get(COST_HEADER)
    ok = resp.status < 400
    if metered is None or not ok:
        return unmetered_outcome(
            costs,
            header,
            "ok" if ok else "upstream_error",
            resp.status,
            unbounded=metered is None,
        )
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None
    return body_outcome(costs, metered, header, data, len(content), resp.status)


def outcome_of_stream(
    costs: CostCalculator,
    resp: aiohttp.ClientResponse,
    metered: MeteredRequest | None,
    meter: StreamMeter | None,
    outcome: str,
) -> Outcome:
    """What a streamed request is charged, once its stream ended as `outcome`."""
    header = resp.headers.get(COST_HEADER)
    if metered is None or meter is None:
        return unmetered_outcome(costs, header, outcome, resp.status, unbounded=metered is None)
    return stream_outcome(costs, metered, header, meter, outcome, resp.status)
