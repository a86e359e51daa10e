"""The `budgetgate` command: serve, migrate, keys, usage, reconcile, mock-upstream."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import datetime
from decimal import Decimal, InvalidOperation
from importlib.metadata import version as package_version
from typing import Annotated, Any, TypeVar

import orjson
import typer
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from app.clock import as_utc
from app.config import Settings, get_settings

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
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
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


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        # Not str(exc): pydantic's message repeats each input, and a URL carries its password.
        for error in exc.errors():
            name = "BUDGETGATE_" + "_".join(map(str, error["loc"])).upper()
            typer.echo(f"invalid settings: {name}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


# prometheus-client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    workers: Annotated[int, typer.Option(min=1, help="worker processes (one ledger, shared)")] = 1,
) -> None:
    """Run the gateway."""
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
    from app.main import SchemaOutdated, prepare_schema
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
        typer.echo(f"invalid settings: BUDGETGATE_PRICES_FILE: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        asyncio.run(check())
    except SchemaOutdated as exc:
        typer.echo(f"budgetgate: {exc}", err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"budgetgate: cannot reach the ledger database: {exc}", err=True)
        raise typer.Exit(1) from None
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


@app.command()
def migrate() -> None:
    """Bring the ledger database to the latest schema, then exit."""
    from app.migrate import upgrade_to_head

    upgrade_to_head(_settings().database_url)
    typer.echo("ledger schema is at the latest migration")


@app.command("mock-upstream")
def mock_upstream(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 9100,
) -> None:
    """Run a fake OpenAI-compatible upstream (usage in every answer), for trying things out."""
    from app.mock_upstream import run

    run(host=host, port=port)


# -- admin tasks straight against the ledger ------------------------------------------------


def _run_with_services(fn: Callable[[Any], Awaitable[T]]) -> T:
    from app.clock import SystemClock
    from app.db import create_engine
    from app.errors import AppError
    from app.keys.service import KeyService
    from app.ledger.periods import BudgetRepository
    from app.main import prepare_schema

    settings = _settings()

    async def main() -> T:
        engine = create_engine(settings)
        try:
            if settings.is_sqlite:  # the embedded ledger migrates itself, as `serve` does
                await prepare_schema(settings, engine)
            budgets = BudgetRepository(engine, SystemClock(), settings.reservation_ttl_seconds)
            return await fn(KeyService(engine, budgets, settings))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except AppError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except (SQLAlchemyError, OSError) as exc:
        typer.echo(f"error: the ledger database cannot be used: {exc}", err=True)
        raise typer.Exit(1) from None


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
        typer.echo(f"error: --metadata: not a JSON object: {value!r}", err=True)
        raise typer.Exit(2)
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
        typer.echo(f"error: not a dollar amount: {value!r}", err=True)
        raise typer.Exit(2) from None


def _print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        typer.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2, default=str).decode())
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    typer.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _print_key(out: Any, columns: list[str], as_json: bool) -> None:
    """One key: its object in JSON (as the admin API returns it), else a one-row table."""
    row = _key_dict(out)
    if as_json:
        typer.echo(orjson.dumps(row, option=orjson.OPT_INDENT_2, default=str).decode())
    else:
        _print_rows([row], columns, as_json=False)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, list):
        return ",".join(map(str, value)) or "*"
    return str(value)


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


def _key_dict(out: Any) -> dict[str, Any]:
    return out.model_dump(mode="json") if hasattr(out, "model_dump") else dict(out)


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
    _print_key(_run_with_services(lambda s: s.create(body)), ["key", *KEY_COLUMNS], as_json)
    if not as_json:
        typer.echo("\nThe key is shown only once: store it now.")


@keys_app.command("list")
def keys_list(
    alias: Annotated[str | None, typer.Option()] = None, as_json: JsonOpt = False
) -> None:
    """List keys."""

    async def all_keys(s: Any) -> list[Any]:
        out, cursor = [], None
        while True:
            page, cursor = await s.list_keys(alias, cursor, 500)
            out.extend(page)
            if cursor is None:
                return out

    rows = [_key_dict(k) for k in _run_with_services(all_keys)]
    _print_rows(rows, KEY_COLUMNS, as_json)


@keys_app.command("show")
def keys_show(key_id: str, as_json: JsonOpt = False) -> None:
    """Show one key with its current period."""
    _print_key(_run_with_services(lambda s: s.get(key_id)), KEY_COLUMNS, as_json)


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
    _print_key(_run_with_services(lambda s: s.update(key_id, body)), KEY_COLUMNS, as_json)


@keys_app.command("revoke")
def keys_revoke(key_id: str, as_json: JsonOpt = False) -> None:
    """Revoke a key: later requests get 401; its history is kept."""
    _print_key(_run_with_services(lambda s: s.revoke(key_id)), KEY_COLUMNS, as_json)


@keys_app.command("reset")
def keys_reset(key_id: str, as_json: JsonOpt = False) -> None:
    """Close the key's current periods early; the new ones end at the same boundary."""
    _print_key(_run_with_services(lambda s: s.reset(key_id)), KEY_COLUMNS, as_json)


@app.command()
def usage(
    group_by: Annotated[str, typer.Option(help="key, model or day")] = "key",
    since: Annotated[datetime | None, typer.Option()] = None,
    until: Annotated[datetime | None, typer.Option()] = None,
    as_json: JsonOpt = False,
) -> None:
    """Spend report from the ledger."""
    from app.keys.service import dollars
    from app.ledger import repository as ledger

    if group_by not in ("key", "model", "day"):
        typer.echo("error: --group-by must be key, model or day", err=True)
        raise typer.Exit(2)

    async def report(s: Any) -> list[dict[str, Any]]:
        return await ledger.usage(s.engine, group_by, as_utc(since), as_utc(until))

    rows = _run_with_services(report)
    for r in rows:
        r["spend"] = dollars(r.pop("cost_nanos"))
    _print_rows(
        rows, [group_by, "requests", "spend", "prompt_tokens", "completion_tokens"], as_json
    )


@app.command()
def reconcile(as_json: JsonOpt = False) -> None:
    """Check the ledger invariants; exit 1 with a report if any is broken. Overruns (requests
    charged more than they reserved) are listed; they do not fail the check."""
    from app.keys.service import dollars, iso
    from app.ledger import repository as ledger
    from app.pricing.money import nanos_to_dollars

    report = _run_with_services(lambda s: ledger.reconcile(s.engine))
    overruns = [
        {
            "request_id": o.request_id,
            "key_id": o.key_id,
            "reservation": dollars(o.reservation),
            "cost": dollars(o.cost),
            "overrun": dollars(o.overrun),
            "finished_at": iso(o.finished_at),
        }
        for o in report.overruns
    ]
    if as_json:
        typer.echo(
            orjson.dumps(
                {
                    "ok": report.ok,
                    "periods_checked": report.periods_checked,
                    "entries_checked": report.entries_checked,
                    "problems": report.problems,
                    "overruns": overruns,
                }
            ).decode()
        )
    else:
        typer.echo(
            f"checked {report.periods_checked} periods and {report.entries_checked} ledger entries"
        )
        for o in report.overruns:
            typer.echo(
                f"OVERRUN: request {o.request_id} (key {o.key_id}, {iso(o.finished_at)}): "
                f"reserved ${nanos_to_dollars(o.reservation)}, cost ${nanos_to_dollars(o.cost)}, "
                f"overrun ${nanos_to_dollars(o.overrun)}"
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
