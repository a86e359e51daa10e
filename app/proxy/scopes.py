"""Whom else a request is made for (SPEC 11): its end user and its tags, from the headers and
the body, checked before its budgets are."""

from __future__ import annotations

from starlette.datastructures import Headers

from app.errors import InvalidField
from app.proxy.request import MeteredRequest

# Where a request names its end user, in order: budgetgate's header, LiteLLM's two, the body's
# `user` field.
END_USER_HEADERS = ("x-budget-end-user", "x-litellm-end-user-id", "x-litellm-customer-id")
# Where it names its tags: comma-separated headers, and the body's metadata.tags.
TAG_HEADERS = ("x-budget-tags", "x-litellm-tags")
MAX_TAGS = 32
MAX_NAME = 255


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidField(f"{what}: must be a non-empty string", param=what)
    value = value.strip()
    if len(value) > MAX_NAME or any(ord(c) < 32 for c in value):
        raise InvalidField(
            f"{what}: at most {MAX_NAME} characters, no control characters", param=what
        )
    return value


def end_user_of(headers: Headers, metered: MeteredRequest | None) -> str | None:
    """The end user the request names (a header first, then the body's `user`); None."""
    for name in END_USER_HEADERS:
        value = headers.get(name)
        if value is not None:
            return _name(value, name)
    if metered is not None and metered.end_user is not None:
        return _name(metered.end_user, "user")
    return None


def tags_of(headers: Headers, metered: MeteredRequest | None) -> tuple[str, ...]:
    """The tags the request carries, from every place it may name them, each once."""
    found: list[str] = []
    for name in TAG_HEADERS:
        for value in headers.getlist(name):
            found += [_name(t, name) for t in value.split(",") if t.strip()]
    if metered is not None and metered.tags is not None:
        if not isinstance(metered.tags, list):
            raise InvalidField("metadata.tags: must be a list of strings", param="metadata.tags")
        found += [_name(t, "metadata.tags") for t in metered.tags]
    tags = tuple(dict.fromkeys(found))
    if len(tags) > MAX_TAGS:
        raise InvalidField(f"a request carries at most {MAX_TAGS} tags", param="tags")
    return tags
