"""Schemathesis against the served OpenAPI schema (/openapi.json), on a real uvicorn server:
for every operation, positive and negative data, with the admin key, no response is a 5xx,
every status is documented, bodies and content types match the schema, and every error is in
the OpenAI error format (which the schema documents as ErrorResponse)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.clock import ManualClock
from app.main import create_app
from tests.conftest import ADMIN_KEY, START, make_settings
from tests.hostile.helpers import ERROR_KEYS
from tests.servers import ServerThread

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
EXAMPLES = 25


@pytest.fixture
def server(database_url: str, mock_upstream: ServerThread) -> Iterator[ServerThread]:
    settings_ = make_settings(database_url, mock_upstream.url)
    app = create_app(settings_, ManualClock(START), run_scheduler=False, migrate=False)
    srv = ServerThread(app).start()
    yield srv
    srv.stop()


def assert_openai_error_body(response: Any, label: str) -> None:
    """`response`: schemathesis' Response (headers are lists of values)."""
    if response.status_code < 400:
        return
    content_type = {k.lower(): v for k, v in response.headers.items()}["content-type"]
    assert content_type[0].startswith("application/json"), (label, content_type)
    body = json.loads(response.content)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, (label, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], (label, body)
    assert b"Traceback" not in response.content, label


def fuzz(
    op: Any,
    base_url: str,
    session: requests.Session,
    headers: dict[str, str],
    mode: GenerationMode,
    seen: dict[str, list[int]],
    tag: str = "",
    **fixed: Any,
) -> bool:
    """Runs EXAMPLES cases of `op`; False when `mode` has nothing to generate (a negative
    case for an operation whose every input is valid)."""
    label = f"{op.label} [{mode.value}{' ' + tag if tag else ''}]"

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode, **fixed))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        seen.setdefault(label, []).append(response.status_code)
        case.validate_response(response, checks=CHECKS, headers=headers)
        assert_openai_error_body(response, label)

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        return False
    return True


def test_admin_api_conforms_to_its_openapi_schema(server: ServerThread) -> None:
    session = requests.Session()
    base = server.url
    # Some state for the operations to read: a key with spend, a ledger entry, periods.
    r = session.post(
        f"{base}/admin/keys", json={"max_budget": 5, "budget_duration": "1d"}, headers=ADMIN
    )
    assert r.status_code == 201, r.text
    key = r.json()
    client = {"authorization": f"Bearer {key['key']}"}
    r = session.post(
        f"{base}/v1/chat/completions",
        json={"model": "bg-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers=client,
    )
    assert r.status_code == 200, r.text

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in ops}
    assert {
        "POST /admin/keys",
        "GET /admin/keys",
        "GET /admin/keys/{key_id}",
        "PATCH /admin/keys/{key_id}",
        "DELETE /admin/keys/{key_id}",
        "POST /admin/keys/{key_id}/reset",
        "GET /admin/keys/{key_id}/periods",
        "GET /admin/ledger",
        "GET /admin/usage",
        "GET /v1/budget",
    } <= labels

    seen: dict[str, list[int]] = {}
    negative_ran = set()
    # Operations on a real key last: DELETE revokes it (the others still answer for it).
    ops.sort(key=lambda op: (op.method.upper() == "DELETE", op.label))
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if fuzz(op, base, session, ADMIN, mode, seen) and mode is GenerationMode.NEGATIVE:
                negative_ran.add(op.label)
            if "{key_id}" in op.path:
                fuzz(
                    op,
                    base,
                    session,
                    ADMIN,
                    mode,
                    seen,
                    "real key",
                    path_parameters={"key_id": key["id"]},
                )
        if op.path == "/v1/budget":  # the client route, with a client key
            fuzz(op, base, session, client, GenerationMode.POSITIVE, seen, "client key")

    # Negative data was generated wherever an input can be invalid.
    assert {
        "POST /admin/keys",
        "GET /admin/keys",
        "PATCH /admin/keys/{key_id}",
        "GET /admin/keys/{key_id}/periods",
        "GET /admin/ledger",
        "GET /admin/usage",
    } <= negative_ran, negative_ran
    statuses = {s for codes in seen.values() for s in codes}
    # The fuzzing reached real answers and real refusals, not only one kind.
    assert {200, 201, 404, 422} <= statuses, statuses
    assert all(s < 500 for s in statuses), statuses
    assert set(seen["GET /v1/budget [positive]"]) == {401}  # the admin key is no client key
    assert set(seen["GET /v1/budget [positive client key]"]) == {200}
    assert 200 in seen["GET /admin/keys/{key_id} [positive real key]"]
