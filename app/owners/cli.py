"""`budgetgate teams|users|end-users|tags ...`: create, list, get, update, delete, reset and
periods, like `budgetgate keys`, straight against the ledger through OwnerService.

app.cli registers these sub-apps with its own helpers (running a service against the ledger,
validating a body, printing rows): a room below app.cli cannot import them.
"""

# No `from __future__ import annotations`: the commands' signatures are built per kind, and
# Typer reads the options from the annotation objects themselves.

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Any

import typer
from pydantic import Json, TypeAdapter, ValidationError

from app.owners.schemas import (
    EndUserCreate,
    EndUserUpdate,
    OwnerCreate,
    OwnerUpdate,
    TagCreate,
    TagUpdate,
    TeamCreate,
    TeamUpdate,
    UserCreate,
    UserUpdate,
)
from app.owners.service import OwnerService, end_user_scope


@dataclass(frozen=True)
class CliHelpers:
    """What app.cli lends the owners' commands, so that they behave as its own."""

    # (--database-url, a call of the owner service) -> its result, or exit 1 naming the problem
    run: Callable[[str | None, Callable[[OwnerService], Awaitable[Any]]], Any]
    body: Callable[..., Any]  # (model, **fields) -> a validated body, or exit 2 naming the field
    print_rows: Callable[..., None]  # (rows, columns, format, json_value=None)
    dollars: Callable[[str | None], Decimal | None]
    json_object: Callable[[str | None], dict[str, Any] | None]
    alert_at: Callable[[str | None], list[str] | None]
    database_url_option: Any  # the Annotated types and default of the shared options
    format_option: Any
    default_format: Any
    json_option: Any
    output_format: Callable[[Any, bool], Any]  # (--format, --json) -> the format


@dataclass(frozen=True)
class _Kind:
    kind: str
    command: str  # the sub-command: teams, users, end-users, tags
    label: str
    name_field: str  # alias, name or user
    create_body: type[OwnerCreate]
    update_body: type[OwnerUpdate]
    extra: tuple[str, ...] = ()  # the kind's own options


_KINDS = (
    _Kind("team", "teams", "team", "alias", TeamCreate, TeamUpdate,
          ("max_parallel_requests", "end_user_budget")),
    _Kind("user", "users", "user", "alias", UserCreate, UserUpdate),
    _Kind("end_user", "end-users", "end user", "user", EndUserCreate, EndUserUpdate),
    _Kind("tag", "tags", "tag", "name", TagCreate, TagUpdate),
)  # fmt: skip

_OPTIONS: dict[str, Any] = {
    "max_budget": Annotated[str | None, typer.Option(help="dollars")],
    "budget_duration": Annotated[str | None, typer.Option(help="30s, 1h, 1d, 1w, 1mo, 1y ...")],
    "soft_budget": Annotated[str | None, typer.Option(help="dollars")],
    "budget_timezone": Annotated[str | None, typer.Option(help="IANA time zone (default UTC)")],
    "budget_anchor": Annotated[str | None, typer.Option(help="RFC 3339 time periods count from")],
    "alert_at": Annotated[
        str | None, typer.Option(help="alert thresholds, fractions of max_budget: 0.5,0.8,1")
    ],
    "metadata": Annotated[str | None, typer.Option(help='JSON object, e.g. \'{"owner": "ann"}\'')],
    "budgets": Annotated[
        str | None,
        typer.Option(
            help='extra budgets, a JSON list: \'[{"max_budget": 5000, "unit": "tokens", '
            '"budget_duration": "1d", "models": ["gpt-4o"]}]\' (update: replaces them)'
        ),
    ],
    "max_parallel_requests": Annotated[
        str | None, typer.Option(help='requests in flight at once ("none": no limit)')
    ],
    "end_user_budget": Annotated[
        str | None, typer.Option(help="budgets each new end user gets, a JSON list like --budgets")
    ],
}
_JSON_LISTS = ("budgets", "end_user_budget")
_PERIOD_COLUMNS = ["budget_id", "unit", "period_start", "period_end", "spend", "reserved",
                   "max_budget", "closed_at", "close_reason"]  # fmt: skip
_DOLLARS = ("max_budget", "soft_budget")


_JSON_LIST: TypeAdapter[list[Any]] = TypeAdapter(Json[list[Any]])


def _json_list(option: str, value: str) -> list[Any]:
    """A JSON list option (each entry is validated with the body)."""
    try:
        return _JSON_LIST.validate_python(value)
    except ValidationError:
        typer.echo(f"error: --{option.replace('_', '-')}: not a JSON list: {value!r}", err=True)
        raise typer.Exit(2) from None


def _fields(given: dict[str, Any], helpers: CliHelpers) -> dict[str, Any]:
    """The options given, as the API's body fields (the API validates them)."""
    fields: dict[str, Any] = {}
    for name, value in given.items():
        if value is None:
            continue
        if name in _DOLLARS:
            value = helpers.dollars(value)
        elif name == "alert_at":
            value = helpers.alert_at(value)
        elif name == "metadata":
            value = helpers.json_object(value)
        elif name in _JSON_LISTS:
            value = _json_list(name, value)
        elif name == "max_parallel_requests" and value.lower() == "none":
            value = None
        fields[name] = value
    return fields


def _param(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def _with_signature(
    fn: Callable[..., None], params: list[inspect.Parameter]
) -> Callable[..., None]:
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return fn


def _owner_app(k: _Kind, helpers: CliHelpers) -> typer.Typer:
    sub = typer.Typer(
        help=f"Manage {k.command} and their budgets (straight against the ledger).",
        no_args_is_help=True,
    )
    columns = ["id", k.name_field, "max_budget", "spend", "reserved", "remaining",
               "budget_duration", "reset_at", "deleted_at"]  # fmt: skip
    if k.kind == "end_user":
        columns[2:2] = ["team_id", "key_id"]
    owner_id_arg = _param("owner_id", Annotated[str, typer.Argument(help=f"the {k.label}'s id")])
    output = [
        _param("database_url", helpers.database_url_option),
        _param("fmt", helpers.format_option, helpers.default_format),
        _param("as_json", helpers.json_option, False),
    ]
    budget_options = [_param(n, _OPTIONS[n]) for n in (*_DOLLARS[:1], "budget_duration",
                      *_DOLLARS[1:], "budget_timezone", "budget_anchor", "alert_at", "metadata",
                      "budgets", *k.extra)]  # fmt: skip

    def show(out: Any, fmt: Any, as_json: bool) -> None:
        row = out.model_dump(mode="json")
        helpers.print_rows([row], columns, helpers.output_format(fmt, as_json), json_value=row)

    def create(database_url: str | None, fmt: Any, as_json: bool, **given: Any) -> None:
        body = helpers.body(k.create_body, **_fields(given, helpers))
        show(helpers.run(database_url, lambda s: s.create(k.kind, body)), fmt, as_json)

    naming = [
        _param(
            k.name_field, Annotated[str, typer.Option(help=f"the {k.label}'s {k.name_field}")], ...
        )
    ]
    if k.kind == "end_user":
        naming += [_param("team_id", Annotated[str | None, typer.Option(help="its team (scope)")]),
                   _param("key_id", Annotated[str | None, typer.Option(help="its key (scope), for a key without a team")])]  # fmt: skip
    article = "an" if k.label[0] in "aeiou" else "a"
    create.__doc__ = f"Create {article} {k.label}; the budget options set its budget (dollars)."
    sub.command("create")(_with_signature(create, [*naming, *budget_options, *output]))

    def update(
        owner_id: str, database_url: str | None, fmt: Any, as_json: bool, **given: Any
    ) -> None:
        body = helpers.body(k.update_body, **_fields(given, helpers))
        show(helpers.run(database_url, lambda s: s.update(k.kind, owner_id, body)), fmt, as_json)

    renaming = [] if k.name_field not in k.update_body.model_fields else [
        _param(k.name_field, Annotated[str | None, typer.Option(help=f"a new {k.name_field}")])]  # fmt: skip
    update.__doc__ = f"Change {article} {k.label}'s settings (only the options given)."
    sub.command("update")(
        _with_signature(update, [owner_id_arg, *renaming, *budget_options, *output])
    )

    def list_owners(database_url: str | None, fmt: Any, as_json: bool, **filters: Any) -> None:
        name = filters.get(k.name_field)
        team_id, key_id = filters.get("team_id"), filters.get("key_id")
        scope = end_user_scope(team_id, key_id) if team_id or key_id else None

        async def every_page(s: OwnerService) -> list[Any]:
            out, cursor = [], None
            while True:
                page, cursor = await s.list_owners(k.kind, cursor, 500, name=name, scope=scope)
                out.extend(page)
                if cursor is None:
                    return out

        rows = [o.model_dump(mode="json") for o in helpers.run(database_url, every_page)]
        helpers.print_rows(rows, columns, helpers.output_format(fmt, as_json))

    filters = [
        _param(k.name_field, Annotated[str | None, typer.Option(help=f"only this {k.name_field}")])
    ]
    if k.kind == "end_user":
        filters += naming[1:]
    list_owners.__doc__ = f"List {k.command} (deleted ones too)."
    sub.command("list")(_with_signature(list_owners, [*filters, *output]))

    def one(action: str, doc: str) -> None:
        def command(owner_id: str, database_url: str | None, fmt: Any, as_json: bool) -> None:
            out = helpers.run(database_url, lambda s: getattr(s, action)(k.kind, owner_id))
            show(out, fmt, as_json)

        command.__doc__ = doc
        sub.command(action)(_with_signature(command, [owner_id_arg, *output]))

    one("get", f"Show one {k.label} with its budgets' current periods.")
    one("delete", f"Delete {article} {k.label} (softly: its budgets retired, its history kept).")
    one(
        "reset",
        f"Close the {k.label}'s current periods early; the new ones end at the same boundary.",
    )

    def periods(
        owner_id: str, limit: int, database_url: str | None, fmt: Any, as_json: bool
    ) -> None:
        rows = helpers.run(database_url, lambda s: s.periods(k.kind, owner_id, limit))
        as_api = {"data": [p.model_dump(mode="json") for p in rows]}
        helpers.print_rows(as_api["data"], _PERIOD_COLUMNS, helpers.output_format(fmt, as_json),
                           json_value=as_api["data"])  # fmt: skip

    periods.__doc__ = f"The {k.label}'s budget periods, newest first."
    limit = _param("limit", Annotated[int, typer.Option(min=1, max=1000, help="how many")], 100)
    sub.command("periods")(_with_signature(periods, [owner_id_arg, limit, *output]))
    return sub


def owner_apps(helpers: CliHelpers) -> list[tuple[str, typer.Typer]]:
    """(sub-command, Typer app) for teams, users, end-users and tags."""
    return [(k.command, _owner_app(k, helpers)) for k in _KINDS]
