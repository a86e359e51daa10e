"""Who may see a dashboard page and post its forms: the session in the cookie, the role, and
the CSRF token of every form. Failures are exceptions that app/ui/mount.py turns into a
redirect to the sign-in page or an error page."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request

from app.keys.service import KeyService
from app.owners.service import OwnerService
from app.ui.pages import signer_of
from app.ui.session import COOKIE, Session


class SignInRequired(Exception):
    """No signed-in session: the browser goes to the sign-in page."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class PageError(Exception):
    """An error shown as a page (not the API's JSON error)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def session_of(request: Request) -> Session | None:
    return signer_of(request).load(request.cookies.get(COOKIE))


def signed_in(request: Request) -> Session:
    session = session_of(request)
    if session is None or not session.signed_in:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target)
    return session


def admin_only(session: Session) -> None:
    if not session.can_write:
        raise PageError(403, "Signed in with the viewer key: this dashboard is read-only.")


async def form_of(request: Request, session: Session) -> dict[str, str]:
    """The posted form, once its CSRF token is checked against the session."""
    body = (await request.body()).decode("utf-8", "replace")
    form = dict(parse_qsl(body, keep_blank_values=True))
    if not signer_of(request).csrf_ok(session, form.get("csrf")):
        raise PageError(403, "The form's security token is missing or stale: reload the page.")
    return form


def safe_next(target: str | None) -> str:
    """Only a dashboard path (never another site) is a place to go after sign-in."""
    if target and (target == "/ui" or target.startswith("/ui/")) and "\\" not in target:
        return target
    return "/ui/"


def keys_of(request: Request) -> KeyService:
    return request.app.state.key_service  # type: ignore[no-any-return]


def owners_of(request: Request) -> OwnerService:
    return request.app.state.owner_service  # type: ignore[no-any-return]


def engine_of(request: Request) -> Any:
    return request.app.state.engine


def now_of(request: Request) -> datetime:
    return request.app.state.clock.now()  # type: ignore[no-any-return]
