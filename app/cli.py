"""The `budgetgate` command: serve, migrate, keys, usage, ledger, reconcile, mock-upstream.

Exit codes: 0 done; 1 a failed check, something not found, or a ledger database that cannot
be used (unreachable, or not migrated); 2 a usage or settings error."""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, cast

import orjson
import typer
from pydantic import ValidationError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from app.config import Settings, get_settings
from app.kit.money import format_dollars_nanos
from app.kit.times import InvalidTime, parse_time, rfc3339

if TYPE_CHECKING:
    from alembic.script import Script

    from app.keys.service import KeyService
    from app.ledger.reads import LedgerReads, UsageGroup

app = typer.Typer(
    help="budgetgate: a budget-enforcing proxy for OpenAI-compatible LLM APIs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    help="Manage API keys and their budgets (straight against the ledger).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"budgetgate {package_version('budgetgate')}")
        raise typer.Exit()


@app.callback()
def global_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """budgetgate: a budget-enforcing proxy for OpenAI-compatible LLM APIs."""


T = TypeVar("T")


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


DatabaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="ledger database (default: BUDGETGATE_DATABASE_URL, else ./budgetgate.db)",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    OutputFormat,
    typer.Option("--format", help="table, json (as the admin API returns it) or csv"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="the same as --format json")]
ModelsOpt = Annotated[list[str] | None, typer.Option("--model", help="allowed model (repeat)")]
AnchorOpt = Annotated[
    str | None,
    typer.Option(help="RFC 3339 time the periods count from (default: the unit's start)"),
]
ExpiresOpt = Annotated[
    str | None, typer.Option(help="RFC 3339 time after which the key is refused")
]
MetadataOpt = Annotated[str | None, typer.Option(help='JSON object, e.g. \'{"team": "a"}\'')]
AlertAtOpt = Annotated[
    str | None,
    typer.Option(help='alert thresholds, fractions of max_budget: 0.5,0.8,1 ("" for none)'),
]
SinceOpt = Annotated[
    str | None,
    typer.Option(help="from this time on (RFC 3339, or a date; without an offset: UTC)"),
]
UntilOpt = Annotated[str | None, typer.Option(help="before this time (RFC 3339, or a date)")]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


def _settings(database_url: str | None = None) -> Settings:
    try:
        return get_settings() if database_url is None else Settings(database_url=database_url)
    except ValidationError as exc:
        # Not str(exc): pydantic's message repeats each input, and a URL carries its password.
        for error in exc.errors():
            name = "BUDGETGATE_" + "_".join(map(str, error["loc"])).upper()
            typer.echo(f"invalid settings: {name}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


def describe_database(settings: Settings) -> str:
    """The ledger database for a person: a SQLite file's full path, or the server's URL
    without its credentials."""
    url = make_url(settings.database_url)
    if settings.is_sqlite:
        return f"SQLite {Path(url.database or '').resolve()}"
    return URL.create(
        url.drivername, host=url.host, port=url.port, database=url.database
    ).render_as_string()


def _database_error(exc: Exception) -> str:
    """Why the database refused, in one line: the driver's own message, never the SQL
    statement SQLAlchemy adds to it."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def _time(option: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value)
    except InvalidTime as exc:
        _fail(f"error: {option}: {exc}", 2)


# prometheus-client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="worker processes (one ledger, shared)")] = 1,
    database_url: DatabaseUrlOpt = None,
) -> None:
    """Run the gateway."""
    if database_url is not None:
        # Every worker reads its settings from the environment (app.main.create_app).
        os.environ["BUDGETGATE_DATABASE_URL"] = database_url
        get_settings.cache_clear()
    # Every worker counts its metrics in this directory and /metrics sums them (app/metrics.py):
    # set before any worker imports prometheus-client, this process's imports included.
    own_metrics_dir = MULTIPROC_ENV not in os.environ
    if own_metrics_dir:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="budgetgate-metrics-")
    try:
        _serve(host, port, workers)
    finally:
        if own_metrics_dir:
            shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)


def _serve(host: str, port: int, workers: int) -> None:
    import uvicorn

    from app.db import create_engine
    from app.logs import configure_logging, startup_line
    from app.main import prepare_schema
    from app.pricing import PriceBook, PricesFileError
    from app.server import HeadTimeoutProtocol

    settings = _settings()

    async def check() -> None:
        engine = create_engine(settings)
        try:
            await prepare_schema(settings, engine)
        finally:
            await engine.dispose()

    try:
        PriceBook.load(settings.prices_file)  # (each worker loads it again: fail here, once)
    except PricesFileError as exc:
        _fail(f"invalid settings: BUDGETGATE_PRICES_FILE: {exc}", 2)
    if settings.is_sqlite:
        typer.echo(f"budgetgate: ledger database: {describe_database(settings)}", err=True)
    _on_ledger_errors(lambda: asyncio.run(check()), settings)
    configure_logging(settings)
    startup_line(settings, host, port, workers)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        log_config=None,  # app.logs formats every logger (JSON by default)
        access_log=False,
        loop="uvloop",
        http=HeadTimeoutProtocol,  # httptools, with a deadline on request heads
        timeout_graceful_shutdown=30,
        # Longer than clients keep idle connections (httpx / the OpenAI SDK: 5 s, the same
        # as uvicorn's default, so a client could reuse a connection the server was closing).
        timeout_keep_alive=75,
    )


def _on_ledger_errors(run: Callable[[], T], settings: Settings) -> T:
    """Run `run`; a ledger database that cannot be used ends the command with one line that
    says why (exit 1), never a traceback or an SQL statement."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    from app.errors import AppError
    from app.main import SchemaOutdated

    where = describe_database(settings)
    try:
        return run()
    except SchemaOutdated:
        _fail(
            f"budgetgate: the ledger database ({where}) is not at the latest migration: "
            "run `budgetgate migrate`"
        )
    except AppError as exc:
        _fail(f"error: {exc.message}")
    except (CommandError, RevisionError) as exc:  # e.g. a revision this version does not know
        _fail(f"budgetgate: cannot migrate the ledger database ({where}): {exc}")
    except (SQLAlchemyError, OSError) as exc:
        _fail(f"budgetgate: cannot use the ledger database ({where}): {_database_error(exc)}")


@app.command()
def migrate(database_url: DatabaseUrlOpt = None) -> None:
    """Bring the ledger database to the latest schema, then exit."""
    from app.db import create_engine
    from app.migrate import current_revisions, pending_revisions, upgrade_to_head

    settings = _settings(database_url)
    typer.echo(f"ledger database: {describe_database(settings)}")

    async def revisions() -> set[str]:
        engine = create_engine(settings)
        try:
            return await current_revisions(engine)
        finally:
            await engine.dispose()

    def run() -> list[Script]:
        pending = pending_revisions(settings.database_url, asyncio.run(revisions()))
        upgrade_to_head(settings.database_url)
        return pending

    applied = _on_ledger_errors(run, settings)
    if not applied:
        typer.echo("already up to date")
        return
    for script in applied:
        typer.echo(f"applied {script.revision}: {(script.doc or '').splitlines()[0]}")
    typer.echo(f"ledger schema is at the latest migration ({applied[-1].revision})")


@app.command("mock-upstream")
def mock_upstream(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 9100,
) -> None:
    """Run a fake OpenAI-compatible upstream (usage in every answer), for trying things out."""
    from app.mock_upstream import run

    run(host=host, port=port)


# -- admin tasks straight against the ledger ------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    """What a command reads and changes the ledger through: the services the admin API uses."""

    keys: KeyService
    reads: LedgerReads


def _against_ledger(database_url: str | None, fn: Callable[[Ledger], Awaitable[T]]) -> T:
    from app.clock import SystemClock
    from app.db import create_engine
    from app.keys.service import KeyService
    from app.ledger.periods import BudgetRepository
    from app.ledger.reads import LedgerReads
    from app.main import prepare_schema

    settings = _settings(database_url)

    async def main() -> T:
        engine = create_engine(settings)
        try:
            # The embedded SQLite ledger migrates itself, as `serve` does; a server's is
            # migrated as a deploy step, and a command refuses one that is not.
            await prepare_schema(settings, engine)
            budgets = BudgetRepository(engine, SystemClock(), settings.reservation_ttl_seconds)
            return await fn(
                Ledger(KeyService(engine, budgets, settings), LedgerReads(engine, budgets))
            )
        finally:
            await engine.dispose()

    return _on_ledger_errors(lambda: asyncio.run(main()), settings)


def _body(model: type[T], **fields: Any) -> T:
    """Build an admin request body from options, with the API's validation and messages."""
    try:
        return model(**fields)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "input"
            typer.echo(f"error: {field}: {err['msg']}", err=True)
        raise typer.Exit(2) from None


def _json_object(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        _fail(f"error: --metadata: not a JSON object: {value!r}", 2)
    return parsed


def _alert_at(value: str | None) -> list[str] | None:
    """`--alert-at 0.5,0.8,1` as the API's list (the API validates each fraction)."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def _dollars(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(value)
    except InvalidOperation:
        _fail(f"error: not a dollar amount: {value!r}", 2)


# -- output ---------------------------------------------------------------------------------


def _format(fmt: OutputFormat, as_json: bool) -> OutputFormat:
    return OutputFormat.json if as_json else fmt


def _print_json(value: Any) -> None:
    options = orjson.OPT_INDENT_2 | orjson.OPT_PASSTHROUGH_DATETIME
    typer.echo(orjson.dumps(value, option=options, default=_json_default).decode())


def _json_default(value: Any) -> str:
    # Times as the admin API writes them (RFC 3339, `Z`), so that the two outputs compare.
    return rfc3339(value) if isinstance(value, datetime) else str(value)


def _print_rows(
    rows: list[dict[str, Any]], columns: list[str], fmt: OutputFormat, json_value: Any = None
) -> None:
    """Rows as a table (the columns given), as JSON (`json_value`, else the rows as they
    are), or as CSV (every field; the columns given when there are no rows)."""
    if fmt is OutputFormat.json:
        _print_json(rows if json_value is None else json_value)
    elif fmt is OutputFormat.csv:
        _print_csv(rows, columns)
    else:
        _print_table(rows, columns)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    # A pipe or a file gets whole lines, however wide: ids and keys are copied from them.
    Console(width=None if sys.stdout.isatty() else 10_000, highlight=False).print(table)


def _print_csv(rows: list[dict[str, Any]], columns: list[str]) -> None:
    fields = list(dict.fromkeys(c for row in rows for c in row)) or columns
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(fields)
    for row in rows:
        out.writerow([_csv_cell(row.get(c)) for c in fields])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, float):
        return f"{Decimal(repr(value)):f}"  # 0.000000001, not 1e-09
    if isinstance(value, list):
        return ",".join(map(str, value)) or "*"
    return str(value)


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return orjson.dumps(
            value, option=orjson.OPT_PASSTHROUGH_DATETIME, default=_json_default
        ).decode()
    return _cell(value)


def _print_key(out: Any, columns: list[str], fmt: OutputFormat) -> None:
    """One key: its object in JSON (as the admin API returns it), else a one-row table."""
    row = _key_dict(out)
    _print_rows([row], columns, fmt, json_value=row)


KEY_COLUMNS = [
    "id",
    "alias",
    "key_prefix",
    "status",
    "max_budget",
    "spend",
    "reserved",
    "remaining",
    "budget_duration",
    "reset_at",
]
PERIOD_COLUMNS = [
    "budget_id",
    "period_start",
    "period_end",
    "spend",
    "reserved",
    "max_budget",
    "closed_at",
    "close_reason",
]
ENTRY_COLUMNS = [
    "finished_at",
    "request_id",
    "key_id",
    "model",
    "endpoint",
    "outcome",
    "cost",
    "cost_source",
    "prompt_tokens",
    "completion_tokens",
]
OVERRUN_COLUMNS = ["request_id", "key_id", "reservation", "cost", "overrun", "finished_at"]


def _key_dict(out: Any) -> dict[str, Any]:
    return out.model_dump(mode="json") if hasattr(out, "model_dump") else dict(out)


# -- keys -----------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    alias: Annotated[str | None, typer.Option()] = None,
    max_budget: Annotated[str | None, typer.Option(help="dollars")] = None,
    budget_duration: Annotated[
        str | None, typer.Option(help="30s, 1h, 1d, 1w, 1mo, 1y ...")
    ] = None,
    soft_budget: Annotated[str | None, typer.Option(help="dollars")] = None,
    budget_timezone: Annotated[str, typer.Option()] = "UTC",
    budget_anchor: AnchorOpt = None,
    alert_at: AlertAtOpt = None,
    models: ModelsOpt = None,
    expires_at: ExpiresOpt = None,
    metadata: MetadataOpt = None,
    key: Annotated[
        str | None, typer.Option(help="passthrough mode: the existing upstream key")
    ] = None,
    database_url: DatabaseUrlOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    as_json: JsonOpt = False,
) -> None:
    """Issue a key (managed mode) or register an upstream key (passthrough mode)."""
    from app.keys.schemas import KeyCreate

    body = _body(
        KeyCreate,
        alias=alias,
        max_budget=_dollars(max_budget),
        budget_duration=budget_duration,
        soft_budget=_dollars(soft_budget),
        budget_timezone=budget_timezone,
        budget_anchor=budget_anchor,
        alert_at=_alert_at(alert_at),
        models=models or [],
        expires_at=expires_at,
        metadata=_json_object(metadata) or {},
        key=key,
    )
    created = _against_ledger(database_url, lambda ledger: ledger.keys.create(body))
    fmt = _format(fmt, as_json)
    _print_key(created, ["key", *KEY_COLUMNS], fmt)
    if fmt is OutputFormat.table:
        typer.echo("\nThe key is shown only once: store it now.")


@keys_app.command("list")
def keys_list(
    alias: Annotated[str | None, typer.Option()] = None,
    database_url: DatabaseUrlOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    as_json: JsonOpt = False,
) -> None:
    """List keys (JSON: a list of key objects)."""

    async def all_keys(ledger: Ledger) -> list[Any]:
        out, cursor = [], None
        while True:
            page, cursor = await ledger.keys.list_keys(alias, cursor, 500)
            out.extend(page)
            if cursor is None:
                return out

    rows = [_key_dict(k) for k in _against_ledger(database_url, all_keys)]
    _print_rows(rows, KEY_COLUMNS, _format(fmt, as_json))


def _key_command(
    name: str, summary: str, action: Callable[[KeyService, str], Awaitable[Any]]
) -> None:
    """`budgetgate keys NAME KEY_ID`: one call of the key service, printing the key object."""

    def command(
        key_id: str,
        database_url: DatabaseUrlOpt = None,
        fmt: FormatOpt = OutputFormat.table,
        as_json: JsonOpt = False,
    ) -> None:
        key = _against_ledger(database_url, lambda ledger: action(ledger.keys, key_id))
        _print_key(key, KEY_COLUMNS, _format(fmt, as_json))

    command.__doc__ = summary
    keys_app.command(name)(command)


_key_command("show", "Show one key with its current period.", lambda keys, key_id: keys.get(key_id))


@keys_app.command("update")
def keys_update(
    key_id: str,
    alias: Annotated[str | None, typer.Option()] = None,
    max_budget: Annotated[str | None, typer.Option(help="dollars")] = None,
    soft_budget: Annotated[str | None, typer.Option(help="dollars")] = None,
    budget_duration: Annotated[str | None, typer.Option()] = None,
    budget_timezone: Annotated[str | None, typer.Option()] = None,
    budget_anchor: AnchorOpt = None,
    alert_at: AlertAtOpt = None,
    models: Annotated[
        list[str] | None,
        typer.Option("--model", help="allowed model (repeat; replaces the allow-list)"),
    ] = None,
    expires_at: ExpiresOpt = None,
    metadata: MetadataOpt = None,
    database_url: DatabaseUrlOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    as_json: JsonOpt = False,
) -> None:
    """Change a key's settings (only the options given)."""
    from app.keys.schemas import KeyUpdate

    given: dict[str, Any] = {
        "alias": alias,
        "max_budget": _dollars(max_budget),
        "soft_budget": _dollars(soft_budget),
        "budget_duration": budget_duration,
        "budget_timezone": budget_timezone,
        "budget_anchor": budget_anchor,
        "alert_at": _alert_at(alert_at),
        "models": models,
        "expires_at": expires_at,
        "metadata": _json_object(metadata),
    }
    body = _body(KeyUpdate, **{k: v for k, v in given.items() if v is not None})
    key = _against_ledger(database_url, lambda ledger: ledger.keys.update(key_id, body))
    _print_key(key, KEY_COLUMNS, _format(fmt, as_json))


_key_command(
    "revoke",
    "Revoke a key: later requests get 401; its history is kept.",
    lambda keys, key_id: keys.revoke(key_id),
)
_key_command(
    "reset",
    "Close the key's current periods early; the new ones end at the same boundary.",
    lambda keys, key_id: keys.reset(key_id),
)


@keys_app.command("periods")
def keys_periods(
    key_id: str,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="at most this many")] = 100,
    database_url: DatabaseUrlOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    as_json: JsonOpt = False,
) -> None:
    """The key's budget periods, newest first (JSON: as GET /admin/keys/{id}/periods)."""
    from app.keys.schemas import PeriodList

    rows = _against_ledger(database_url, lambda ledger: ledger.reads.periods(key_id, limit))
    as_api = PeriodList.model_validate({"data": rows}).model_dump(mode="json")
    _print_rows(rows, PERIOD_COLUMNS, _format(fmt, as_json), json_value=as_api)


# -- the ledger -----------------------------------------------------------------------------


@app.command()
def usage(
    group_by: Annotated[str, typer.Option(help="key, model or day")] = "key",
    since: SinceOpt = None,
    until: UntilOpt = None,
    database_url: DatabaseUrlOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    as_json: JsonOpt = False,
) -> None:
    """Spend report from the ledger (JSON: the rows of GET /admin/usage)."""
    from app.ledger.reads import USAGE_GROUPS

    if group_by not in USAGE_GROUPS:
        _fail("error: --group-by must be key, model or day", 2)
    start, end = _time("--since", since), _time("--until", until)
    grouping = cast("UsageGroup", group_by)
    report = _against_ledger(database_url, lambda ledger: ledger.reads.usage(grouping, start, end))
    fmt = _format(fmt, as_json)
    _print_rows(
        report["data"], [group_by, "requests", "spend", "prompt_tokens", "completion_tokens"], fmt
    )
    if fmt is OutputFormat.table:
        typer.echo(f"total spend: {_cell(report['total_spend'])}")


@app.command("ledger")
def ledger_entries(
    key_id: Annotated[str | None, typer.Option(help="only this key's entries")] = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="at most this many")] = 100,
    cursor: Annotated[str | None, typer.Option(help="the next page, as printed")] = None,
    database_url: DatabaseUrlOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    as_json: JsonOpt = False,
) -> None:
    """Ledger entries, newest first (JSON: as GET /admin/ledger, with next_cursor)."""
    start, end = _time("--since", since), _time("--until", until)
    page = _against_ledger(
        database_url,
        lambda ledger: ledger.reads.entries(
            key_id=key_id, since=start, until=end, limit=limit, cursor=cursor
        ),
    )
    fmt = _format(fmt, as_json)
    _print_rows(page["data"], ENTRY_COLUMNS, fmt, json_value=page)
    if fmt is OutputFormat.table and page["next_cursor"] is not None:
        typer.echo(f"more: --cursor {page['next_cursor']}")


@app.command()
def reconcile(
    database_url: DatabaseUrlOpt = None,
    fmt: FormatOpt = OutputFormat.table,
    as_json: JsonOpt = False,
) -> None:
    """Check the ledger invariants; exit 1 with a report if any is broken. Overruns (requests
    charged more than they reserved) are listed; they do not fail the check. (CSV: the
    overruns.)"""
    from app.ledger.reads import reconcile_out

    report = _against_ledger(database_url, lambda ledger: ledger.reads.reconcile())
    fmt = _format(fmt, as_json)
    if fmt is OutputFormat.json:
        typer.echo(orjson.dumps(reconcile_out(report)).decode())
    elif fmt is OutputFormat.csv:
        _print_csv(reconcile_out(report)["overruns"], OVERRUN_COLUMNS)
    else:
        typer.echo(
            f"checked {report.periods_checked} periods and {report.entries_checked} ledger entries"
        )
        for o in report.overruns:
            typer.echo(
                f"OVERRUN: request {o.request_id} (key {o.key_id}, {rfc3339(o.finished_at)}): "
                f"reserved ${format_dollars_nanos(o.reservation)}, "
                f"cost ${format_dollars_nanos(o.cost)}, "
                f"overrun ${format_dollars_nanos(o.overrun)}"
            )
        for problem in report.problems:
            typer.echo(f"PROBLEM: {problem}")
        if report.overruns:
            typer.echo(f"{len(report.overruns)} overrun(s) recorded: charged in full, alerted")
        typer.echo(
            "ledger is consistent" if report.ok else f"{len(report.problems)} problem(s) found"
        )
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
