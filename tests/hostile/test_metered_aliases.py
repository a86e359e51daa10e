"""Every metered route and every LiteLLM alias of one is metered (issue 12, "What it must show"
2; SPEC 3, 9): a spent key gets 429 on each and nothing is forwarded; an admitted request holds
a reservation above 0 while it is upstream; for the aliases the model is the path's (a body or
query model that differs is a 400). Both key modes, SQLite and PostgreSQL.

A 429 alone does not show a reservation above 0 (an exhausted budget refuses even a request
reserving 0, e.g. an unpriced model under BUDGETGATE_UNPRICED_MODEL=free): the reservation is
observed directly, while the upstream holds the request.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qsl

from app.clock import ManualClock
from app.proxy.routes import ROUTES, Access
from tests.conftest import Gateway, make_settings, running_gateway
from tests.hostile.helpers import assert_reconciled
from tests.hostile.raw import RecordingUpstream
from tests.hostile.test_forwarding_surface import expected_credential, key_body
from tests.keys.helpers import assert_openai_error

MODEL = "bg-priced"  # both sides priced: every endpoint's bound is above 0

BODIES: dict[str, dict[str, Any]] = {
    "/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    "/completions": {"prompt": "hi", "max_tokens": 5},
    "/responses": {"input": "hi", "max_output_tokens": 5},
    "/embeddings": {"input": "hi"},
    "/messages": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    "/images/generations": {"prompt": "a cat", "n": 1},
    "/audio/speech": {"input": "hello", "voice": "alloy"},
}

# Written out (not derived), so that a route dropped from the table fails here; the test below
# also checks that every metered route of the table is in this list.
METERED_PATHS: list[tuple[str, str]] = [  # (path, metered API)
    ("/v1/chat/completions", "/chat/completions"),
    ("/chat/completions", "/chat/completions"),
    ("/v1/completions", "/completions"),
    ("/completions", "/completions"),
    ("/v1/responses", "/responses"),
    ("/responses", "/responses"),
    ("/v1/embeddings", "/embeddings"),
    ("/embeddings", "/embeddings"),
    ("/v1/messages", "/messages"),
    ("/messages", "/messages"),
    ("/v1/images/generations", "/images/generations"),
    ("/images/generations", "/images/generations"),
    ("/v1/audio/speech", "/audio/speech"),
    ("/audio/speech", "/audio/speech"),
    (f"/engines/{MODEL}/chat/completions", "/chat/completions"),
    (f"/engines/{MODEL}/completions", "/completions"),
    (f"/engines/{MODEL}/embeddings", "/embeddings"),
    (f"/openai/deployments/{MODEL}/chat/completions", "/chat/completions"),
    (f"/openai/deployments/{MODEL}/completions", "/completions"),
    (f"/openai/deployments/{MODEL}/embeddings", "/embeddings"),
    (f"/openai/deployments/{MODEL}/images/generations", "/images/generations"),
    ("/openai/v1/responses", "/responses"),
]
ALIASES = [(p, api) for p, api in METERED_PATHS if "/engines/" in p or "/deployments/" in p]


def is_alias(path: str) -> bool:
    return MODEL in path


def body_for(path: str, api: str, **extra: Any) -> bytes:
    body = dict(BODIES[api])
    if not is_alias(path):
        body["model"] = MODEL
    body.update(extra)
    return json.dumps(body).encode()


def headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


def test_every_metered_route_of_the_table_is_covered() -> None:
    table = set()
    for route in ROUTES:
        if route.access is not Access.METERED:
            continue
        path = route.template.replace("{model}", MODEL)
        table.add((path, route.api))
        if route.versioned:
            table.add(("/v1" + path, route.api))
    assert table == set(METERED_PATHS)


async def test_a_spent_key_gets_429_on_every_metered_route_and_alias(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        created = await gw.create_key(**key_body(key_mode, max_budget=0.0))
        for path, api in METERED_PATHS:
            r = await gw.client.post(
                path, content=body_for(path, api), headers=headers(created["key"])
            )
            assert_openai_error(r, 429)
            assert r.headers["x-budget-max-budget"] == "0.0", r.headers
            assert recorder.records == [], (path, recorder.records[0].head_text())
        # Also with a budget used up by real spend (not only max_budget 0).
        spent = await _spend_all(gw, recorder, key_mode)
        for path, api in METERED_PATHS:
            r = await gw.client.post(path, content=body_for(path, api), headers=headers(spent))
            assert_openai_error(r, 429)
        assert recorder.records == []
        await assert_reconciled(gw)


async def _spend_all(gw: Gateway, recorder: RecordingUpstream, key_mode: str) -> str:
    """A key whose one request spent (overran) its small budget; the recorder cleared."""
    body = key_body(key_mode, max_budget=0.000001)
    if key_mode == "passthrough":
        body["key"] = "sk-litellm-client-key-spent-7e1d2c"
    # bg-priced: 3 prompt + 2 completion tokens answered = $0.0023 > $0.000001, but a request
    # with max_tokens 1 and a short body reserves more than the budget: admit first with a
    # roomy budget, then shrink it.
    created = await gw.create_key(**{**body, "max_budget": 1.0})
    r = await gw.client.post(
        "/v1/chat/completions",
        content=body_for("/v1/chat/completions", "/chat/completions"),
        headers=headers(created["key"]),
    )
    assert r.status_code == 200, r.text
    spent = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()["spend"]
    assert spent > 0
    r = await gw.admin("PATCH", f"/admin/keys/{created['id']}", json={"max_budget": spent})
    assert r.status_code == 200, r.text
    recorder.clear()
    return str(created["key"])


async def test_an_admitted_request_on_every_route_holds_a_reservation_above_zero(
    database_url: str, recorder: RecordingUpstream, key_mode: str, clock: ManualClock
) -> None:
    settings = make_settings(database_url, recorder.url, key_mode=key_mode)
    async with running_gateway(settings, clock) as gw:
        created = await gw.create_key(**key_body(key_mode))
        key = created["key"]
        for n, (path, api) in enumerate(METERED_PATHS, start=1):
            recorder.hold()
            task = asyncio.create_task(
                gw.client.post(path, content=body_for(path, api), headers=headers(key))
            )
            try:
                await recorder.wait_for(n)
                during = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()
                assert during["reserved"] > 0, (path, during)
            finally:
                recorder.release()
            r = await task
            assert r.status_code == 200, (path, r.text)
            assert float(r.headers["x-budget-spend"]) > 0
            seen = recorder.records[-1]
            assert seen.target == path.encode()
            assert seen.credentials() == [("authorization", expected_credential(key_mode, key))]
        after = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()
        assert after["reserved"] == 0
        entries = (await gw.admin("GET", "/admin/ledger", params={"limit": 1000})).json()["data"]
        assert len(entries) == len(METERED_PATHS)
        assert {e["model"] for e in entries} == {MODEL}
        assert sorted(e["endpoint"] for e in entries) == sorted(api for _, api in METERED_PATHS)
        assert all(e["cost"] > 0 for e in entries), entries
        await assert_reconciled(gw)


async def test_aliases_price_the_path_model_and_refuse_another_in_body_or_query(
    database_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    async with running_gateway(make_settings(database_url, recorder.url), clock) as gw:
        key = (await gw.create_key(max_budget=10.0))["key"]
        for path, api in ALIASES:
            # A cheaper model in the body (bg-test: input free) than the one in the path.
            r = await gw.client.post(
                path, content=body_for(path, api, model="bg-test"), headers=headers(key)
            )
            assert_openai_error(r, 400, param="model")
            # The same via LiteLLM's ?model= override.
            r = await gw.client.post(
                path + "?model=bg-test", content=body_for(path, api), headers=headers(key)
            )
            assert_openai_error(r, 400, code="invalid_query", param="model")
            # And on the plain route: the body's model priced, another served via ?model=.
            r = await gw.client.post(
                "/v1/chat/completions?model=bg-priced&model=bg-test",
                content=json.dumps({**BODIES["/chat/completions"], "model": "bg-priced"}),
                headers=headers(key),
            )
            assert_openai_error(r, 400, code="invalid_query", param="model")
        assert recorder.records == []
        # The same body model as the path's is fine.
        path, api = ALIASES[0]
        r = await gw.client.post(
            path, content=body_for(path, api, model=MODEL), headers=headers(key)
        )
        assert r.status_code == 200, r.text
        assert len(recorder.records) == 1


async def test_an_alias_with_an_encoded_model_is_priced_as_that_model(
    sqlite_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    """`/engines/bg%2Dpriced/...` is the model bg-priced to LiteLLM (uvicorn decodes it): it
    reserves and is charged as bg-priced, not as an unknown model (which, under
    BUDGETGATE_UNPRICED_MODEL=free, would reserve 0 and be charged 0), and a spent key gets 429."""
    settings = make_settings(sqlite_url, recorder.url, unpriced_model="free")
    async with running_gateway(settings, clock) as gw:
        spent = (await gw.create_key(max_budget=0.0))["key"]
        created = await gw.create_key(max_budget=10.0)
        paths = (
            "/engines/bg%2Dpriced/chat/completions",
            "/openai/deployments/bg%2dpriced/chat/completions",
            "/engines/%62%67%2d%70%72%69%63%65%64/chat/completions",
        )
        body = json.dumps(BODIES["/chat/completions"])
        for path in paths:
            r = await gw.client.post(path, content=body, headers=headers(spent))
            assert_openai_error(r, 429)
        assert recorder.records == []
        for n, path in enumerate(paths, start=1):
            recorder.hold()
            task = asyncio.create_task(
                gw.client.post(path, content=body, headers=headers(created["key"]))
            )
            try:
                await recorder.wait_for(n)
                during = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()
            finally:
                recorder.release()
            assert (await task).status_code == 200
            assert during["reserved"] > 0, (path, during)
            assert recorder.records[-1].target == path.encode()  # forwarded as sent
        ledger = await gw.admin("GET", "/admin/ledger", params={"key_id": created["id"]})
        entries = ledger.json()["data"]
        assert [e["model"] for e in entries] == [MODEL] * len(paths)
        assert all(e["cost"] > 0 and e["cost_source"] != "free" for e in entries), entries


# -- what the upstream reads is what was priced ---------------------------------------------

# LiteLLM reads a body whose content-type contains "form" as a form, not as JSON
# (litellm/proxy/common_utils/http_parsing_utils.py `_read_request_body`: `if "form" in
# content_type: parsed_body = dict(await request.form())`). A body that is valid JSON for the
# gateway and an urlencoded form for LiteLLM is priced as one model and served as another.
CONFUSED = json.dumps(
    {
        "model": "bg-test",
        "prompt": "hi",
        "max_tokens": 1,
        "x": "&model=bg-priced&prompt=write+a+novel&",
    }
).encode()
FORM_TYPES = [
    [("content-type", "application/x-www-form-urlencoded")],
    [("content-type", "multipart/form-data; boundary=b")],
    [("content-type", "application/json"), ("content-type", "application/x-www-form-urlencoded")],
    [("content-type", "application/json; x=form")],
]


def upstream_reads(seen: Any) -> dict[str, Any]:
    """The body as LiteLLM's `_read_request_body` reads it: a form when the content-type says
    "form" (urlencoded shown with parse_qsl, as Starlette's form parser splits it), else JSON."""
    content_type = ",".join(seen.header_values("content-type"))
    if "form" in content_type:
        if "urlencoded" in content_type:
            return dict(parse_qsl(seen.body.decode("latin-1"), keep_blank_values=True))
        return {"<multipart>": True}
    return json.loads(seen.body)  # type: ignore[no-any-return]


async def test_the_upstream_reads_the_model_that_was_priced_whatever_the_content_type(
    sqlite_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    async with running_gateway(make_settings(sqlite_url, recorder.url), clock) as gw:
        key = (await gw.create_key(max_budget=10.0))["key"]
        for content_type in FORM_TYPES:
            recorder.clear()
            r = await gw.client.post(
                "/v1/completions",
                content=CONFUSED,
                headers=[("authorization", f"Bearer {key}"), *content_type],
            )
            if r.status_code >= 400:  # refused (415/400): fine, if nothing went upstream
                assert_openai_error(r, r.status_code)
                assert recorder.records == [], content_type
                continue
            assert len(recorder.records) == 1
            read = upstream_reads(recorder.records[0])
            assert read.get("model") == "bg-test", (content_type, read)
            assert read.get("max_tokens") == 1, (content_type, read)


async def test_an_image_request_reserves_at_least_n_images(
    sqlite_url: str, recorder: RecordingUpstream, clock: ManualClock
) -> None:
    """gpt-image-1 (genai-prices): output image tokens at $40/M; the cheapest image (low
    quality, 1024x1024) is 272 output tokens, $0.01088: ten of them cost at least $0.1088."""
    settings = make_settings(sqlite_url, recorder.url, prices_file=None)
    async with running_gateway(settings, clock) as gw:
        created = await gw.create_key(max_budget=100.0)
        recorder.hold()
        task = asyncio.create_task(
            gw.client.post(
                "/v1/images/generations",
                json={"model": "gpt-image-1", "prompt": "a cat", "n": 10, "quality": "high"},
                headers=headers(created["key"]),
            )
        )
        try:
            await recorder.wait_for(1)
            during = (await gw.admin("GET", f"/admin/keys/{created['id']}")).json()
        finally:
            recorder.release()
        assert (await task).status_code == 200
        assert during["reserved"] >= 0.1088, during
