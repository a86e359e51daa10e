"""The query string is part of what is judged (SPEC 9): LiteLLM reads a credential from
`?key=` and lets `?model=` override the body's model, so neither may pass unchecked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from app.errors import BadRequest

CREDENTIAL_PARAMS = frozenset({"key", "api_key", "api-key", "litellm_user_api_key"})
# RFC 3986 query characters (and "%" escapes): the upstream gets the query as sent.
_QUERY_CHARS = re.compile(rb"^[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*$")


class InvalidQuery(BadRequest):
    code = "invalid_query"


@dataclass(frozen=True, slots=True)
class Query:
    models: tuple[str, ...]  # every `model` parameter's value

    def check_model(self, priced: str) -> None:
        """A `model` parameter other than the model the gateway priced would be served in its
        place: 400."""
        for model in self.models:
            if model != priced:
                raise InvalidQuery(
                    f"the query's model '{model}' differs from the request's model '{priced}': "
                    "name the model once, in the body",
                    param="model",
                )


def judge_query(raw: bytes) -> Query:
    if not raw:
        return Query(())
    if not _QUERY_CHARS.match(raw):
        raise InvalidQuery("the query string has characters a query may not have unencoded")
    # Read as Starlette (and so LiteLLM) reads it.
    params = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    for name, _ in params:
        if name.strip().lower() in CREDENTIAL_PARAMS:
            raise InvalidQuery(
                f"credentials are not accepted in the query string ('{name}'): send the key in "
                "the Authorization header",
                param=name,
            )
    return Query(tuple(value for name, value in params if name == "model"))
