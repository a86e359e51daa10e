"""Raw HTTP tools for the forwarding-surface tests (not a test module).

- `RecordingUpstream`: a tiny HTTP/1.1 server (asyncio, its own thread and loop) that records
  every request exactly as it arrives on the wire (request line, headers in order, body) and
  answers a JSON completion with usage. No framework in between: nothing is decoded,
  normalised or merged before it is recorded.
- `raw_http`: sends hand-written request bytes over a socket (httpx and aiohttp normalise dot
  segments client-side, so hostile targets cannot be sent with them) and reads the answer.
- `asgi_call`: calls the ASGI app directly with a hand-built scope whose `raw_path` is the
  hostile bytes and whose `path` is what uvicorn would decode from them.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

# Every header name an upstream (LiteLLM) may read a credential from, compared with `_` read
# as `-` (LITELLM-ROUTES.md section 4, SPEC 9).
CREDENTIAL_NAMES = frozenset(
    {
        "authorization",
        "api-key",
        "x-api-key",
        "x-litellm-api-key",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
        "proxy-authorization",
        "cookie",
        "cookie2",
        "litellm-user-api-key",
        "sec-websocket-protocol",
    }
)


def is_credential_header(name: str) -> bool:
    return name.lower().replace("_", "-") in CREDENTIAL_NAMES


@dataclass
class Recorded:
    request_line: bytes
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def method(self) -> str:
        return self.request_line.split(b" ")[0].decode()

    @property
    def target(self) -> bytes:
        return self.request_line.split(b" ")[1]

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def credentials(self) -> list[tuple[str, str]]:
        return [(k.lower(), v) for k, v in self.headers if is_credential_header(k)]

    def head_text(self) -> str:
        return (
            self.request_line.decode("latin-1")
            + "\n"
            + "\n".join(f"{k}: {v}" for k, v in self.headers)
        )


@dataclass
class RecordingUpstream:
    """Start with `.start()`; `records` holds what arrived, `hold()` makes requests wait (they
    are recorded first) until `release()`."""

    records: list[Recorded] = field(default_factory=list)
    port: int = 0
    _gate: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingUpstream:
        self._gate.set()
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def serve() -> None:
                self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()
                async with self._server:
                    try:
                        await self._server.serve_forever()
                    except asyncio.CancelledError:
                        pass

            try:
                loop.run_until_complete(serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("recording upstream did not start")
        return self

    def stop(self) -> None:
        self._gate.set()
        loop = self._loop
        if loop is not None:

            def cancel_all() -> None:
                for task in asyncio.all_tasks(loop):
                    task.cancel()

            try:
                loop.call_soon_threadsafe(cancel_all)
            except RuntimeError:  # the loop already ended
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)

    def clear(self) -> None:
        self.records.clear()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def wait_for(self, count: int, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while len(self.records) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"upstream got {len(self.records)} requests, not {count}")
            await asyncio.sleep(0.005)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head[:-4].split(b"\r\n")
                headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
                lower = {k.lower(): v for k, v in headers}
                if lower.get("transfer-encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                        if size == 0:
                            await reader.readuntil(b"\r\n")
                            break
                        body += await reader.readexactly(size)
                        await reader.readexactly(2)
                else:
                    body = await reader.readexactly(int(lower.get("content-length", "0")))
                self.records.append(Recorded(lines[0], headers, body))
                # A threading.Event: set from the test's thread, not this server's loop.
                while not self._gate.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.005)
                writer.write(_answer(body))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def _answer(body: bytes) -> bytes:
    try:
        model = json.loads(body).get("model") or "bg-priced"
    except (ValueError, AttributeError):
        model = "bg-priced"
    payload = json.dumps(
        {
            "id": "chatcmpl-rec",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }
    ).encode()
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
    )


# -- a raw client -----------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("latin-1")


def build_request(
    method: str,
    target: bytes,
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    body: bytes = b"",
) -> bytes:
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"host: 127.0.0.1"]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}".encode())
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return RawResponse(status, headers, body)


async def raw_http(port: int, data: bytes, seconds: float = 10) -> RawResponse:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader), seconds)
    finally:
        writer.close()


# -- the ASGI app called directly ----------------------------------------------------------


def uvicorn_path(raw_path: bytes) -> str:
    """What uvicorn puts in scope["path"] for a raw target (httptools: unquote if any `%`)."""
    path = raw_path.decode("ascii")
    return unquote(path) if "%" in path else path


async def asgi_call(
    app: Any,
    method: str,
    raw_path: bytes,
    query: bytes = b"",
    headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
    body: bytes = b"",
) -> RawResponse:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": uvicorn_path(raw_path),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"gateway")]
        + [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        + [(b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("gateway", 80),
        "state": {},
    }
    sent_body = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start["headers"]}
    return RawResponse(start["status"], hdrs, content)
