"""Dashboard sessions: a signed cookie, CSRF tokens bound to it, and who may sign in.

The cookie holds a random session id, the role and the expiry, signed with HMAC-SHA256 under a
key derived from the admin key (or, without one, the viewer key): every replica derives the
same key, so no session store is shared, and neither the key nor anything that reveals it is in
the cookie or the page. Changing the admin key ends every session. A session is also created
(role "anonymous") for the sign-in form, so that it too carries a CSRF token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import orjson

from app.config import Settings

COOKIE = "budgetgate_session"
Role = Literal["anonymous", "viewer", "admin"]
ANONYMOUS_SECONDS = 3600  # a sign-in form left open this long must be reloaded


@dataclass(frozen=True)
class Session:
    sid: str
    role: Role
    expires: int  # unix seconds

    @property
    def signed_in(self) -> bool:
        return self.role != "anonymous"

    @property
    def can_write(self) -> bool:
        return self.role == "admin"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Signs and reads session cookies and CSRF tokens. None of it works without a key: with
    neither BUDGETGATE_ADMIN_KEY nor BUDGETGATE_VIEWER_KEY set, nobody can sign in."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        secret = settings.admin_key or settings.viewer_key
        self._key = (
            None
            if secret is None
            else hmac.new(
                secret.get_secret_value().encode(), b"budgetgate-ui-session", hashlib.sha256
            ).digest()
        )
        self.lifetime = int(settings.ui_session_minutes * 60)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _mac(self, purpose: bytes, payload: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, purpose + b"\x00" + payload, hashlib.sha256).digest()

    def new(self, role: Role) -> Session:
        seconds = ANONYMOUS_SECONDS if role == "anonymous" else self.lifetime
        return Session(secrets.token_urlsafe(24), role, int(time.time()) + seconds)

    def dump(self, session: Session) -> str:
        payload = orjson.dumps([session.sid, session.role, session.expires])
        return _b64(payload) + "." + _b64(self._mac(b"session", payload))

    def load(self, cookie: str | None) -> Session | None:
        """The session in a cookie, if it is ours, intact and not expired."""
        if not cookie or self._key is None or "." not in cookie:
            return None
        body, _, mac = cookie.partition(".")
        try:
            payload = _unb64(body)
            if not hmac.compare_digest(_unb64(mac), self._mac(b"session", payload)):
                return None
            sid, role, expires = orjson.loads(payload)
        except (ValueError, TypeError, orjson.JSONDecodeError):
            return None
        if role not in ("anonymous", "viewer", "admin") or int(expires) <= time.time():
            return None
        return Session(str(sid), role, int(expires))

    def csrf_token(self, session: Session) -> str:
        return _b64(self._mac(b"csrf", session.sid.encode()))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(
            (token or "").encode(), self.csrf_token(session).encode()
        )

    def role_for(self, presented: str) -> Role | None:
        """The role a presented key signs in as: the admin key, or the read-only viewer key.
        Both are compared in constant time, whichever matches."""
        role: Role | None = None
        for candidate, name in (
            (self.settings.viewer_key, "viewer"),
            (self.settings.admin_key, "admin"),  # last: the same key for both is the admin
        ):
            if candidate is not None and hmac.compare_digest(
                presented.encode(), candidate.get_secret_value().encode()
            ):
                role = name  # type: ignore[assignment]
        return role
