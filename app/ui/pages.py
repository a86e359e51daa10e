"""Rendering a dashboard page: the template, the session's CSRF token, and the headers every
page carries (no caching of figures, no framing, nothing loaded from another origin)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from app.ui import format as fmt
from app.ui.session import COOKIE, Session, SessionSigner

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(
    money=fmt.money,
    amount=fmt.amount,
    dollars=fmt.dollars,
    percent=fmt.percent,
    when=fmt.when,
    number=fmt.number,
)

# Scripts, styles, images and requests: this origin only. Charts are drawn by a script file
# (no inline script), bars are SVG attributes (no inline style).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def signer_of(request: Request) -> SessionSigner:
    return request.app.state.ui_signer  # type: ignore[no-any-return]


def is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def set_session_cookie(request: Request, response: Response, session: Session) -> None:
    signer = signer_of(request)
    response.set_cookie(
        COOKIE,
        signer.dump(session),
        max_age=max(session.expires - _now(), 0),
        path="/ui",
        httponly=True,
        secure=is_https(request),
        samesite="strict",
    )


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        COOKIE, path="/ui", httponly=True, secure=is_https(request), samesite="strict"
    )


def _now() -> int:
    return int(time.time())


def render(
    request: Request,
    session: Session,
    template: str,
    context: dict[str, Any] | None = None,
    status: int = 200,
    nav: str | None = None,
) -> HTMLResponse:
    signer = signer_of(request)
    ctx = {
        "session": session,
        "csrf": signer.csrf_token(session) if signer.enabled else "",
        "nav": nav,
        "path": request.url.path,
        **(context or {}),
    }
    response = templates.TemplateResponse(request, template, ctx, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def redirect(url: str) -> RedirectResponse:
    response = RedirectResponse(url, status_code=303)
    response.headers.update(SECURITY_HEADERS)
    return response
