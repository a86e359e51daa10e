"""Client side of the stress scenarios: one request, recorded as a `Sent`."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from tests.procs import auth, chat_body


@dataclass
class Sent:
    replica: int
    key_id: str
    status: int  # 0: no HTTP answer (transport error)
    request_id: str | None
    error_type: str | None
    sent_at: float  # time.time() on this machine (the gateways share its clock)
    done_at: float
    detail: str = ""
    body: str = ""


async def chat(
    client: httpx.AsyncClient,
    url: str,
    replica: int,
    key: str,
    key_id: str,
    *,
    max_tokens: int = 10,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> Sent:
    body = chat_body(max_tokens, stream=True) if stream else chat_body(max_tokens)
    h = auth(key, **(headers or {}))
    t0 = time.time()
    try:
        if stream:
            async with client.stream(
                "POST", url + "/v1/chat/completions", json=body, headers=h
            ) as r:
                text = (await r.aread()).decode(errors="replace")
        else:
            r = await client.post(url + "/v1/chat/completions", json=body, headers=h)
            text = r.text
    except httpx.HTTPError as exc:
        return Sent(
            replica, key_id, 0, None, None, t0, time.time(), f"{type(exc).__name__}: {exc}"[:200]
        )
    done = time.time()
    error_type = None
    detail = ""
    if r.status_code >= 400:
        try:
            error_type = json.loads(text)["error"]["type"]
        except (ValueError, KeyError, TypeError):
            error_type = "<not an OpenAI error body>"
    elif stream and "data: [DONE]" not in text:
        detail = "stream incomplete"
    return Sent(
        replica,
        key_id,
        r.status_code,
        r.headers.get("x-request-id"),
        error_type,
        t0,
        done,
        detail,
        text if r.status_code >= 400 else "",
    )


def statuses(results: Iterable[Sent]) -> Counter[int]:
    return Counter(r.status for r in results)


def status_summary(results: Iterable[Sent]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for r in results:
        label = str(r.status) if r.status else f"conn:{r.detail.split(':')[0]}"
        if r.error_type and r.status not in (429,):
            label += f"/{r.error_type}"
        out[label] += 1
    return dict(out)
