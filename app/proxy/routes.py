"""The forwarding surface: every route the gateway forwards, and how each one is budgeted.

Default deny. A request is forwarded only when its method and path match a route below;
anything else is a 404 `route_not_found` and never reaches the upstream. The path is judged
exactly as the client sent it (the raw request target, before any decoding or normalisation),
and exactly that path is forwarded: an upstream normalising `/v1/../key/generate` into one of
LiteLLM's admin routes can only ever see a path this module accepted.

Each route is one of:
- metered: the request reserves an upper bound of its cost (SPEC 10) before it is forwarded;
- free: forwarded without a budget check or ledger entry (it cannot cost money);
- refused: costs money that cannot be bounded before forwarding (listed so that the 404 says
  why and how an operator can opt it in);
- extra: opted in by the operator (`BUDGETGATE_EXTRA_ROUTES`): admitted while every budget has
  room, charged the cost the upstream reports.

The OpenAI API's routes are served under `/v1/...` and without the prefix, as LiteLLM serves
them; LiteLLM's own aliases only as LiteLLM names them. A `{model}` part takes one or more
segments (LiteLLM's `{model:path}`) and names the model that is priced.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import unquote

from app.errors import BadRequest, NotFound


class Access(enum.Enum):
    METERED = "metered"
    FREE = "free"
    REFUSED = "refused"
    EXTRA = "extra"


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str  # the API path, without /v1
    access: Access
    endpoint: str = ""  # the metered API the route is (its ledger endpoint); "" = template
    versioned: bool = True  # also served under /v1

    @property
    def api(self) -> str:
        return self.endpoint or self.template


M, F, R = Access.METERED, Access.FREE, Access.REFUSED
CHAT, COMPLETIONS, EMBEDDINGS = "/chat/completions", "/completions", "/embeddings"
IMAGES, RESPONSES = "/images/generations", "/responses"

# fmt: off
ROUTES: tuple[Route, ...] = (
    Route("POST", CHAT,                    M),
    Route("POST", COMPLETIONS,             M),
    Route("POST", RESPONSES,               M),
    Route("POST", EMBEDDINGS,              M),
    Route("POST", "/messages",             M),
    Route("POST", IMAGES,                  M),
    Route("POST", "/audio/speech",         M),
    # LiteLLM's aliases of the metered routes: the model comes from the path.
    Route("POST", "/engines/{model}/chat/completions",            M, CHAT,        versioned=False),
    Route("POST", "/engines/{model}/completions",                 M, COMPLETIONS, versioned=False),
    Route("POST", "/engines/{model}/embeddings",                  M, EMBEDDINGS,  versioned=False),
    Route("POST", "/openai/deployments/{model}/chat/completions", M, CHAT,        versioned=False),
    Route("POST", "/openai/deployments/{model}/completions",      M, COMPLETIONS, versioned=False),
    Route("POST", "/openai/deployments/{model}/embeddings",       M, EMBEDDINGS,  versioned=False),
    Route("POST", "/openai/deployments/{model}/images/generations", M, IMAGES,    versioned=False),
    Route("POST", "/openai/v1/responses",                         M, RESPONSES,   versioned=False),
    # Free: the model list (LiteLLM answers it from its config, nothing is billed).
    Route("GET",  "/models",               F),
    Route("GET",  "/models/{model}",       F),
    # Cost money that cannot be bounded before forwarding: refused unless opted in.
    Route("*",    "/audio/transcriptions", R),
    Route("*",    "/audio/translations",   R),
    Route("*",    "/batches",              R),
    Route("*",    "/files",                R),
    Route("*",    "/fine_tuning",          R),
    Route("*",    "/realtime",             R),
    Route("*",    "/moderations",          R),
    Route("*",    "/assistants",           R),
    Route("*",    "/threads",              R),
    Route("*",    "/vector_stores",        R),
    Route("*",    "/images/edits",         R),
    Route("*",    "/images/variations",    R),
    Route("*",    "/rerank",               R),
    Route("*",    "/videos",               R),
)
# fmt: on

# -- the path as sent -------------------------------------------------------------------------

# Percent-encodings that change what a path means once an upstream decodes it: `.` (dot
# segments), `/` and `\` (segment boundaries), `?` and `#` (the end of the path), NUL and any
# other control character, and `%` itself (decoded twice, `%252e` is a dot).
_ESCAPE = re.compile(rb"%(?P<hex>[0-9A-Fa-f]{2})")
_FORBIDDEN_DECODED = frozenset(b"./\\?#%") | frozenset(range(0x20)) | {0x7F}
# What may stand in a request target's path at all (RFC 3986 pchar and "/", plus "%").
_PATH_CHARS = re.compile(rb"^/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*$")


class InvalidPath(BadRequest):
    code = "invalid_path"


class RouteNotFound(NotFound):
    code = "route_not_found"


def path_segments(raw_path: bytes) -> list[str]:
    """The path's segments, still percent-encoded; 400 `invalid_path` for any path an upstream
    could read differently from the gateway: dot segments, empty segments (`//`, a trailing
    `/`), a backslash, percent-encoded `.`, `/`, `\\`, `?`, `#`, NUL or control characters,
    malformed escapes, anything outside RFC 3986's path characters."""
    if not _PATH_CHARS.match(raw_path):
        raise InvalidPath(_invalid("it has characters a path may not have unencoded"))
    if raw_path.count(b"%") != len(_ESCAPE.findall(raw_path)):
        raise InvalidPath(_invalid("it has a malformed percent-encoding"))
    for escape in _ESCAPE.finditer(raw_path):
        if int(escape["hex"], 16) in _FORBIDDEN_DECODED:
            raise InvalidPath(
                _invalid(f"it encodes a character that changes its meaning ({escape[0].decode()})")
            )
    segments = raw_path.decode("ascii").split("/")[1:]
    if any(s in ("", ".", "..") for s in segments):
        raise InvalidPath(_invalid("it has an empty, '.' or '..' segment"))
    return segments


def _invalid(why: str) -> str:
    return f"invalid request path: {why}; send the path of an API route as is"


# -- matching ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    model: str | None  # from the path ({model}), decoded
    endpoint: str  # what the ledger records: the metered API, or an extra route's own path


@dataclass(frozen=True, slots=True)
class _Pattern:
    route: Route
    head: tuple[str, ...]  # literal segments before {model} (all of them when there is none)
    tail: tuple[str, ...] | None  # literal segments after {model}; None: no {model}
    prefix: bool  # a refused route covers everything below it


def _patterns(routes: tuple[Route, ...]) -> list[_Pattern]:
    out = []
    for route in routes:
        bases = [route.template, "/v1" + route.template] if route.versioned else [route.template]
        for base in bases:
            segments = tuple(base.split("/")[1:])
            if "{model}" in segments:
                at = segments.index("{model}")
                head, tail = segments[:at], segments[at + 1 :]
            else:
                head, tail = segments, None
            prefix = route.access is Access.REFUSED
            out.append(_Pattern(route, head, tail, prefix))
    return out


class RouteTable:
    """The built-in routes plus the operator's extra routes, matched segment by segment."""

    def __init__(self, extra: tuple[Route, ...] = ()) -> None:
        # Extra routes first: an operator may opt in a route the table refuses.
        self.routes = extra + ROUTES
        self._patterns = _patterns(self.routes)
        # The routes without a parameter, by their exact bytes (valid paths by construction):
        # nearly every request takes one of them, and a dictionary finds it at once.
        self._literal: dict[tuple[str, bytes], Match] = {}
        for pattern in reversed(self._patterns):  # the first pattern listed wins
            route = pattern.route
            if pattern.tail is None and not pattern.prefix and "{" not in route.template:
                path = "/" + "/".join(pattern.head)
                self._literal[(route.method, path.encode())] = Match(route, None, route.api)

    def match(self, method: str, raw_path: bytes) -> Match:
        literal = self._literal.get((method, raw_path))
        if literal is not None and literal.route.access is not Access.EXTRA:
            return literal
        segments = path_segments(raw_path)
        path = raw_path.decode("ascii")
        refused: Route | None = None
        wrong_method: Route | None = None
        for pattern in self._patterns:
            model = _match_segments(pattern, segments)
            if model is False:
                continue
            route = pattern.route
            if route.access is Access.REFUSED:
                refused = refused or route
                continue
            if route.method != method:
                wrong_method = wrong_method or route
                continue
            endpoint = route.api
            if route.access is Access.EXTRA:
                endpoint = path[3:] if path.startswith("/v1/") else path
            return Match(route, _decode_model(model) if isinstance(model, str) else None, endpoint)
        if refused is not None:
            raise RouteNotFound(
                f"budgetgate does not forward {method} {path}: its cost cannot be bounded "
                "before it is forwarded (an operator can opt it in with BUDGETGATE_EXTRA_ROUTES)"
            )
        if wrong_method is not None:
            raise RouteNotFound(
                f"budgetgate forwards {path} only as {wrong_method.method}, not {method}"
            )
        raise RouteNotFound(f"budgetgate does not forward {method} {path}: no such API route")


def _match_segments(pattern: _Pattern, segments: list[str]) -> str | None | bool:
    """False: no match; None: a match without a model; str: the model's raw segments."""
    head, tail = pattern.head, pattern.tail
    if tail is None:
        if pattern.prefix:
            return None if _same(head, segments[: len(head)]) else False
        return None if _same(head, segments) else False
    if len(segments) < len(head) + len(tail) + 1:
        return False
    if not _same(head, segments[: len(head)]):
        return False
    if tail and not _same(tail, segments[len(segments) - len(tail) :]):
        return False
    return "/".join(segments[len(head) : len(segments) - len(tail)])


def _same(template: tuple[str, ...], segments: list[str]) -> bool:
    """Literal segments equal, to the byte; a `{name}` takes any one segment."""
    return len(template) == len(segments) and all(
        t == s or (t.startswith("{") and t.endswith("}"))
        for t, s in zip(template, segments, strict=True)
    )


def _decode_model(raw: str) -> str:
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise InvalidPath(_invalid("the model in it is not UTF-8")) from None


# -- the operator's extra routes --------------------------------------------------------------

_EXTRA_ROUTE = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) (/[A-Za-z0-9\-._~/{}]+)$")


def parse_extra_routes(value: str | None) -> tuple[Route, ...]:
    """`BUDGETGATE_EXTRA_ROUTES`: comma-separated `METHOD /path` entries, e.g.
    `POST /v1/audio/transcriptions, GET /v1/files/{id}`. `{name}` stands for one segment; a
    path is served under /v1 and without, like the OpenAI routes."""
    routes = []
    for entry in (value or "").split(","):
        entry = " ".join(entry.split())
        if not entry:
            continue
        found = _EXTRA_ROUTE.match(entry)
        if found is None:
            raise ValueError(
                f"{entry!r} is not 'METHOD /path' (methods GET, POST, PUT, PATCH, DELETE)"
            )
        method, path = found.groups()
        template = path[3:] if path.startswith("/v1/") else path
        segments = template.split("/")[1:]
        if any(s in ("", ".", "..") for s in segments):
            raise ValueError(f"{entry!r}: the path has an empty, '.' or '..' segment")
        routes.append(Route(method, template, Access.EXTRA))
    return tuple(routes)
