"""The dashboard's routes (/ui): thin, each one call into a service or a reader, then a page.

Every page needs a signed-in session (admin or viewer); every form POST needs the session's
CSRF token; the pages that change keys need the admin role (app/ui/access.py)."""

from __future__ import annotations

from datetime import UTC, date, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from app.errors import AppError
from app.keys.schemas import KeyCreate, KeyOut, KeyUpdate
from app.ledger.usage_rollup import day_start
from app.ui import reads
from app.ui.access import (
    PageError,
    admin_only,
    engine_of,
    form_of,
    keys_of,
    now_of,
    owners_of,
    safe_next,
    session_of,
    signed_in,
)
from app.ui.export import usage_csv_text
from app.ui.forms import DURATIONS, day_param, form_values, key_fields, validation_messages
from app.ui.overview import CHART_DAYS, chart_amount, read_overview
from app.ui.owners import owner_readers
from app.ui.pages import (
    SECURITY_HEADERS,
    clear_session_cookie,
    redirect,
    render,
    set_session_cookie,
    signer_of,
)
from app.ui.session import Session

router = APIRouter(prefix="/ui", include_in_schema=False)

KEYS_PAGE = 50
OWNERS_PAGE = 50
LEDGER_PAGE = 100
OWNER_PERIODS = 24
OWNER_ENTRIES = 25
USAGE_ROWS = 200  # on the page; the CSV has every row
# The ledger page's filter for each kind of owner (a tag's is its name, the others' their id).
LEDGER_PARAMS = {
    "key": "key_id",
    "team": "team_id",
    "user": "user_id",
    "end_user": "end_user_id",
    "tag": "tag",
}
OWNER_FILTERS = {param: scope for scope, param in LEDGER_PARAMS.items() if scope != "key"}


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str | None = None) -> Response:
    signer = signer_of(request)
    if not signer.enabled:
        raise PageError(
            503,
            "The dashboard is disabled: set BUDGETGATE_ADMIN_KEY (or BUDGETGATE_VIEWER_KEY).",
        )
    session = session_of(request)
    if session is not None and session.signed_in:
        return redirect(safe_next(next))
    session = session or signer.new("anonymous")
    response = render(request, session, "login.html", {"next": safe_next(next)})
    set_session_cookie(request, response, session)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    signer = signer_of(request)
    if not signer.enabled:
        raise PageError(503, "The dashboard is disabled.")
    session = session_of(request)
    if session is None:
        raise PageError(403, "The form's security token is missing or stale: reload the page.")
    form = await form_of(request, session)
    role = signer.role_for(form.get("key", ""))
    if role is None:
        return render(
            request,
            session,
            "login.html",
            {
                "next": safe_next(form.get("next")),
                "error": "That key is neither the admin key nor the viewer key.",
            },
            status=401,
        )
    # A new session id on sign-in: a session id seen before it is worth nothing after.
    fresh = signer.new(role)
    response = redirect(safe_next(form.get("next")))
    set_session_cookie(request, response, fresh)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = signed_in(request)
    await form_of(request, session)
    response = redirect("/ui/login")
    clear_session_cookie(request, response)
    return response


# -- overview --------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request) -> Response:
    session = signed_in(request)
    figures = await read_overview(engine_of(request), now_of(request))
    return render(request, session, "overview.html", {"o": figures}, nav="overview")


# -- owners ----------------------------------------------------------------------------------


@router.get("/owners", response_class=HTMLResponse)
async def owners_list(request: Request, q: str = "", scope: str = "all", page: int = 1) -> Response:
    """Teams, users, end users and tags (one kind, or all) whose name or id contains `q`."""
    session = signed_in(request)
    scope, page = list_filter(scope, reads.OWNER_SCOPES), max(page, 1)
    rows, count = await reads.search_owners(
        engine_of(request),
        None if scope == "all" else scope,
        q.strip(),
        (page - 1) * OWNERS_PAGE,
        OWNERS_PAGE,
    )
    filters = {"q": q, "scope": scope}
    context: dict[str, object] = {**filters, "scopes": reads.OWNER_SCOPES}
    context |= listing("/ui/owners", filters, rows, page, count, OWNERS_PAGE)
    return render(request, session, "owners.html", context, nav="owners")


@router.get("/owners/{scope}/{owner_id}", response_class=HTMLResponse)
async def owner_page(request: Request, scope: str, owner_id: str) -> Response:
    session = signed_in(request)
    readers = owner_readers(keys_of(request), owners_of(request), engine_of(request))
    reader = readers.get(scope)
    if reader is None:
        raise PageError(404, f"No such kind of owner: {scope}.")
    owner = await reader.owner(owner_id)
    periods = await reader.periods(owner_id, OWNER_PERIODS)
    entries = await reader.entries(owner, OWNER_ENTRIES)
    # Another owner's entries come from any of its keys: say which.
    keys = [] if scope == "key" else [e.key_id for e in entries]
    primary = owner.budgets[0] if owner.budgets else None
    history = [
        p
        for p in reversed(periods)
        if primary is not None and (p.window, p.unit) == (primary.window, primary.unit)
    ]
    return render(
        request,
        session,
        "owner.html",
        {
            "owner": owner,
            "periods": periods,
            "entries": entries,
            **({"aliases": await reads.key_aliases(engine_of(request), keys)} if keys else {}),
            "ledger_url": "/ui/ledger?" + urlencode({LEDGER_PARAMS[scope]: owner.ledger_match}),
            "done": request.query_params.get("done"),
            "chart": {
                "labels": [p.period_start.strftime("%Y-%m-%d %H:%M") for p in history],
                "spend": [chart_amount(p.spend, p.unit) for p in history],
                "limit": [
                    None if p.max_budget is None else chart_amount(p.max_budget, p.unit)
                    for p in history
                ],
            },
        },
        nav="keys" if scope == "key" else "owners",
    )


# -- keys ------------------------------------------------------------------------------------


@router.get("/keys", response_class=HTMLResponse)
async def keys_list(request: Request, q: str = "", status: str = "all", page: int = 1) -> Response:
    session = signed_in(request)
    status, page = list_filter(status, reads.KEY_FILTERS), max(page, 1)
    rows, count = await reads.search_keys(
        engine_of(request), q.strip(), status, (page - 1) * KEYS_PAGE, KEYS_PAGE
    )
    filters = {"q": q, "status": status}
    context: dict[str, object] = {**filters, "filters": reads.KEY_FILTERS}
    context |= listing("/ui/keys", filters, rows, page, count, KEYS_PAGE)
    return render(request, session, "keys.html", context, nav="keys")


def list_filter(value: str, choices: tuple[str, ...]) -> str:
    """A list's filter as asked, or "all" for one the list does not know."""
    return value if value in choices else "all"


def listing(
    path: str, filters: dict[str, str], rows: list[Any], page: int, count: int, size: int
) -> dict[str, object]:
    """A list page's rows and its place among `count` rows, `size` a page: its number, how
    many there are, and the links to the pages before and after it (with the same filters)."""
    pages = max((count + size - 1) // size, 1)

    def link(p: int) -> str:
        return f"{path}?" + urlencode({**filters, "page": p})

    return {
        "rows": rows,
        "count": count,
        "page": page,
        "pages": pages,
        "prev": link(page - 1) if page > 1 else None,
        "next": link(page + 1) if page < pages else None,
    }


@router.get("/keys/new", response_class=HTMLResponse)
async def new_key_page(request: Request) -> Response:
    session = signed_in(request)
    admin_only(session)
    return render(
        request,
        session,
        "key_form.html",
        {"mode": "create", "values": {"budget_timezone": "UTC"}, "durations": DURATIONS},
        nav="keys",
    )


@router.post("/keys/new", response_class=HTMLResponse)
async def create_key(request: Request) -> Response:
    session = signed_in(request)
    admin_only(session)
    form = await form_of(request, session)
    fields, errors = key_fields(form)
    if not errors:
        try:
            created = await keys_of(request).create(KeyCreate(**fields))
        except ValidationError as exc:
            errors = validation_messages(exc)
        except AppError as exc:
            errors = [exc.message]
    if errors:
        return refused_key_form(request, session, form, errors)
    return render(request, session, "key_created.html", {"key": created}, status=201, nav="keys")


@router.get("/keys/{key_id}/edit", response_class=HTMLResponse)
async def edit_key_page(request: Request, key_id: str) -> Response:
    session = signed_in(request)
    admin_only(session)
    k = await keys_of(request).get(key_id)
    values = {
        "alias": k.alias or "",
        "max_budget": "" if k.max_budget is None else format(Decimal(repr(k.max_budget)), "f"),
        "soft_budget": "" if k.soft_budget is None else format(Decimal(repr(k.soft_budget)), "f"),
        "budget_duration": k.budget_duration or "",
        "budget_timezone": k.budget_timezone,
        "models": ", ".join(k.models),
        "expires_at": k.expires_at.strftime("%Y-%m-%dT%H:%M") if k.expires_at else "",
    }
    return render(
        request,
        session,
        "key_form.html",
        {"mode": "edit", "key": k, "values": values, "durations": DURATIONS},
        nav="keys",
    )


@router.post("/keys/{key_id}/edit", response_class=HTMLResponse)
async def edit_key(request: Request, key_id: str) -> Response:
    session = signed_in(request)
    admin_only(session)
    form = await form_of(request, session)
    keys = keys_of(request)
    k = await keys.get(key_id)
    fields, errors = key_fields(form)
    if not errors:
        try:
            await keys.update(key_id, KeyUpdate(**fields))
        except ValidationError as exc:
            errors = validation_messages(exc)
        except AppError as exc:
            errors = [exc.message]
    if errors:
        return refused_key_form(request, session, form, errors, k)
    return redirect(f"/ui/owners/key/{key_id}?done=saved")


def refused_key_form(
    request: Request,
    session: Session,
    form: dict[str, str],
    errors: list[str],
    key: KeyOut | None = None,
) -> Response:
    """The key form again, as it was sent, with what was wrong with it (422)."""
    return render(
        request,
        session,
        "key_form.html",
        {
            "mode": "create" if key is None else "edit",
            "key": key,
            "values": form_values(form),
            "errors": errors,
            "durations": DURATIONS,
        },
        status=422,
        nav="keys",
    )


CONFIRMS = {
    "reset": (
        "Reset this key's budgets?",
        "Every budget of the key closes its current period now and opens a new one at $0 that "
        "ends at the same scheduled boundary. The spend so far stays in the ledger and in the "
        "period history.",
        "Reset the period",
    ),
    "revoke": (
        "Revoke this key?",
        "Every later request with this key is refused (401). Its history stays. This cannot "
        "be undone.",
        "Revoke the key",
    ),
}


@router.get("/keys/{key_id}/{action}", response_class=HTMLResponse)
async def confirm_page(request: Request, key_id: str, action: str) -> Response:
    session = signed_in(request)
    admin_only(session)
    if action not in CONFIRMS:
        raise PageError(404, "No such page.")
    k = await keys_of(request).get(key_id)
    title, text, button = CONFIRMS[action]
    return render(
        request,
        session,
        "confirm.html",
        {"key": k, "action": action, "title": title, "text": text, "button": button},
        nav="keys",
    )


@router.post("/keys/{key_id}/{action}")
async def confirmed(request: Request, key_id: str, action: str) -> Response:
    session = signed_in(request)
    admin_only(session)
    await form_of(request, session)
    keys = keys_of(request)
    if action == "reset":
        await keys.reset(key_id)
    elif action == "revoke":
        await keys.revoke(key_id)
    else:
        raise PageError(404, "No such page.")
    return redirect(f"/ui/owners/key/{key_id}?done={action}")


# -- usage -----------------------------------------------------------------------------------


async def usage_rows(
    request: Request, group_by: str, first: date, last: date, key_id: str
) -> list[reads.UsageRow]:
    """Usage from `first` to `last` (whole UTC days, both included)."""
    return await reads.usage_by(
        engine_of(request),
        group_by,
        day_start(first),
        day_start(last + timedelta(days=1)),
        key_id or None,
    )


async def aliases_of(
    request: Request, group_by: str, rows: list[reads.UsageRow]
) -> dict[str, str | None]:
    if group_by != "key":
        return {}
    return await reads.key_aliases(engine_of(request), [r.group for r in rows if r.group])


def usage_params(request: Request) -> tuple[str, date, date, str]:
    today = now_of(request).astimezone(UTC).date()
    params = request.query_params
    group_by = params.get("group_by", "key")
    if group_by not in reads.GROUPS:
        group_by = "key"
    first = day_param(params.get("since"), today - timedelta(days=CHART_DAYS - 1))
    last = day_param(params.get("until"), today)
    if last < first:
        raise PageError(422, "The last day is before the first day.")
    return group_by, first, last, params.get("key_id", "").strip()


@router.get("/usage", response_class=HTMLResponse)
async def usage_page(request: Request) -> Response:
    session = signed_in(request)
    group_by, first, last, key_id = usage_params(request)
    rows = await usage_rows(request, group_by, first, last, key_id)
    if group_by != "day":  # the biggest spenders first; days in their order
        rows.sort(key=lambda r: (-r.spend, r.group or ""))
    aliases = await aliases_of(request, group_by, rows[:USAGE_ROWS])
    query = urlencode(
        {
            "group_by": group_by,
            "since": first.isoformat(),
            "until": last.isoformat(),
            "key_id": key_id,
        }
    )
    return render(
        request,
        session,
        "usage.html",
        {
            "rows": rows[:USAGE_ROWS],
            "count": len(rows),
            "aliases": aliases,
            "total": reads.total(rows),
            "group_by": group_by,
            "groups": reads.GROUPS,
            "since": first.isoformat(),
            "until": last.isoformat(),
            "key_id": key_id,
            "csv_url": f"/ui/usage.csv?{query}",
        },
        nav="usage",
    )


@router.get("/usage.csv")
async def usage_csv(request: Request) -> Response:
    signed_in(request)
    group_by, first, last, key_id = usage_params(request)
    rows = await usage_rows(request, group_by, first, last, key_id)
    aliases = await aliases_of(request, group_by, rows)
    name = f"budgetgate-usage-{group_by}-{first.isoformat()}-{last.isoformat()}.csv"
    return Response(
        usage_csv_text(rows, group_by, aliases),
        media_type="text/csv; charset=utf-8",
        headers={**SECURITY_HEADERS, "content-disposition": f'attachment; filename="{name}"'},
    )


# -- ledger ----------------------------------------------------------------------------------


@router.get("/ledger", response_class=HTMLResponse)
async def ledger_page(request: Request) -> Response:
    session = signed_in(request)
    p = request.query_params
    since = p.get("since") or ""
    until = p.get("until") or ""
    outcome = p.get("outcome") or ""
    query = reads.LedgerQuery(
        key_id=p.get("key_id", "").strip() or None,
        request_id=p.get("request_id", "").strip() or None,
        outcome=outcome if outcome in reads.OUTCOMES else None,
        model=p.get("model", "").strip() or None,
        since=day_start(day_param(since, date.min)) if since else None,
        until=day_start(day_param(until, date.min) + timedelta(days=1)) if until else None,
        overruns_only=p.get("overruns") == "1",
        owner=next(
            (
                (scope, v)
                for param, scope in OWNER_FILTERS.items()
                if (v := p.get(param, "").strip())
            ),
            None,
        ),
    )
    try:
        rows, next_cursor = await reads.search_ledger(
            engine_of(request), query, LEDGER_PAGE, p.get("cursor") or None
        )
    except AppError as exc:
        raise PageError(422, exc.message) from None
    aliases = await reads.key_aliases(engine_of(request), [r.key_id for r in rows])
    filters = {k: v for k, v in p.items() if k != "cursor"}
    return render(
        request,
        session,
        "ledger.html",
        {
            "rows": rows,
            "aliases": aliases,
            "filters": filters,
            "outcomes": reads.OUTCOMES,
            "owner_filters": OWNER_FILTERS,
            "next": "/ui/ledger?" + urlencode({**filters, "cursor": next_cursor})
            if next_cursor
            else None,
            "first_page": "/ui/ledger?" + urlencode(filters) if p.get("cursor") else None,
        },
        nav="ledger",
    )


# -- errors ----------------------------------------------------------------------------------


def page_error(request: Request, status: int, message: str) -> Response:
    session = session_of(request)
    signer = signer_of(request)
    if session is None and signer.enabled:
        session = signer.new("anonymous")
    return render(
        request,
        session or Session("", "anonymous", 0),
        "error.html",
        {"status": status, "message": message},
        status=status,
    )
