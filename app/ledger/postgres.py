"""The hot ledger on PostgreSQL (the contract: app/ledger/contract.py).

PostgreSQL: the steps arriving while a batch runs make the next batch, whatever their keys
(PostgresHotLedger). A batch's settles, then its admits, are each ONE statement over arrays
(data-modifying CTEs; the period rows locked in ascending id order, each written once), one
round trip and one transaction each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.budgets.state import BudgetRef, PeriodState, refusing
from app.ledger.contract import (
    BATCH_STEPS,
    AdmitRequest,
    Admitted,
    BatchObserver,
    Decision,
    KeyContext,
    KeyRefused,
    Outcome,
    PeriodsChanged,
    PeriodsExpired,
    Rejected,
    RequestInfo,
    key_refusal,
)

# One statement admits a batch of requests, of any keys (parameters: one array per column of the
# steps: key hash, request id, amount, now, model, endpoint, stream, started at, reservation
# expiry, min amount, tokens, end user id, tags as a JSON list): each key; every budget that
# applies to each step (its key's, its team's, its user's, its end user's, its tags', narrowed
# to its model); their open periods locked in ascending id order; and the verdict as if the
# steps came one by one, each on what the ones before it left. Exactly, in one pass, in the
# cases that are nearly always the case: a step that does not fit even alone (even shrunk) is
# rejected whatever comes before it; a step whose periods are all "clean" (every step on them
# fits in turn: running sums per period, in step order; keys of one team share its periods) is
# reserved, each period written once; the only step left is always decided (shrunk to fit
# when it may: AdmitRequest.min_amount). For the other steps nothing is written and `decided`
# is false: the caller runs them again one at a time, after this batch (any order of steps
# that arrived together is an order they could have come in). The verdict reads the locked rows' latest committed values
# (READ COMMITTED re-reads rows it had to wait for), and the locks are held until the
# statement's implicit transaction commits. What a step holds in a period is its unit's amount
# (unit_amount: dollars, tokens, one request). Rows: per step of a known key (in order) the key
# and each of its periods, after the batch.
_PG_ADMIT = """
WITH a AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::text[],
                         $6::text[], $7::boolean[], $8::timestamptz[], $9::timestamptz[],
                         $10::bigint[], $11::bigint[], $12::text[], $13::text[])
        WITH ORDINALITY AS a(key_hash, request_id, amount, now, model, endpoint, stream,
                             started_at, expires_at, min_amount, tokens, end_user_id, tags, n)
), k AS (
    SELECT id, key_hash, alias, key_prefix, status, models, expires_at, shrink_to_fit, team_id,
           user_id
    FROM api_keys WHERE key_hash = ANY($1::text[])
), steps AS (
    -- may the key make this request (key_refusal: status, expiry, model)
    SELECT a.*, k.id AS key_id, k.team_id, k.user_id,
           coalesce(k.status = 'active' AND (k.expires_at IS NULL OR k.expires_at > a.now)
                    AND (a.model IS NULL OR json_array_length(k.models) = 0
                         OR k.models::jsonb ? a.model), false) AS key_ok
    FROM a JOIN k ON k.key_hash = a.key_hash
), owner AS (
    -- who each step may be held by (a refused key's own budgets too: its answer's headers)
    SELECT n, key_id AS owner_id FROM steps
    UNION ALL SELECT n, team_id FROM steps WHERE key_ok AND team_id IS NOT NULL
    UNION ALL SELECT n, user_id FROM steps WHERE key_ok AND user_id IS NOT NULL
    UNION ALL SELECT n, end_user_id FROM steps WHERE key_ok AND end_user_id IS NOT NULL
    UNION ALL
    SELECT s.n, o.id FROM steps s CROSS JOIN LATERAL json_array_elements_text(s.tags::json) t
    JOIN owners o ON o.kind = 'tag' AND o.scope = '' AND o.name = t AND o.deleted_at IS NULL
    WHERE s.key_ok
), sb AS (
    -- each step's budgets in force that apply to its model (applies_to)
    SELECT o.n, b.id AS budget_id, b.kind, b.unit, b.owner_kind, b.owner_id, b.budget_duration,
           CASE b.unit WHEN 'usd' THEN s.amount WHEN 'tokens' THEN s.tokens ELSE 1 END AS amt,
           CASE WHEN b.unit = 'usd' THEN least(s.amount, coalesce(s.min_amount, s.amount))
                WHEN b.unit = 'tokens' THEN s.tokens ELSE 1 END AS least_amt
    FROM owner o JOIN steps s ON s.n = o.n JOIN budgets b ON b.owner_id = o.owner_id
    WHERE b.retired_at IS NULL
      AND (b.models IS NULL OR s.model IS NULL OR b.models::jsonb ? s.model)
), per AS (
    SELECT p.id, p.budget_id, p.period_start, p.period_end, p.max_budget, p.spend, p.reserved
    FROM budget_periods p
    WHERE p.budget_id IN (SELECT budget_id FROM sb) AND p.closed_at IS NULL
    ORDER BY p.id
    FOR UPDATE OF p
), sp AS (
    -- step x period; the one comparison (PeriodState.fits) alone, with the least it may hold
    SELECT sb.*, per.id, per.period_start, per.period_end, per.max_budget, per.spend,
           per.reserved,
           per.max_budget IS NULL OR (per.spend + per.reserved < per.max_budget
                                      AND per.spend + per.reserved + sb.least_amt
                                          <= per.max_budget) AS alone
    FROM sb JOIN per ON per.budget_id = sb.budget_id
), judged AS (
    -- current: every budget has its open period (one closed by a concurrent roll while we
    -- waited for its lock drops out of `per`: look again), none expired; hopeless: no room
    SELECT s.n,
           coalesce((SELECT count(*) FROM sp WHERE sp.n = s.n), 0)
               = coalesce((SELECT count(*) FROM sb WHERE sb.n = s.n), 0)
           AND NOT EXISTS (SELECT 1 FROM sp WHERE sp.n = s.n AND sp.period_end IS NOT NULL
                                                 AND sp.period_end <= s.now) AS current,
           EXISTS (SELECT 1 FROM sp WHERE sp.n = s.n AND NOT sp.alone) AS hopeless
    FROM steps s WHERE s.key_ok
), run AS (
    -- the steps that may hold, with running sums per period in step order: does each fit on
    -- what the ones before it hold there?
    SELECT sp.*,
           sp.max_budget IS NULL
           OR (sp.spend + sp.reserved + sum(sp.amt) OVER w - sp.amt < sp.max_budget
               AND sp.spend + sp.reserved + sum(sp.amt) OVER w <= sp.max_budget) AS in_turn
    FROM sp JOIN judged j ON j.n = sp.n WHERE j.current AND NOT j.hopeless
    WINDOW w AS (PARTITION BY sp.id ORDER BY sp.n)
), clean AS (
    -- a period on which every step fits in turn: those of its steps admitted now hold no more
    -- there than the sums that fit
    SELECT id, bool_and(in_turn) AS clean FROM run GROUP BY id
), fit AS (
    SELECT r.n, bool_and(c.clean) AS fits,
           min(CASE WHEN r.unit = 'usd' THEN r.max_budget - r.spend - r.reserved END) AS room
    FROM run r JOIN clean c ON c.id = r.id GROUP BY r.n
), batch AS (
    SELECT count(*) AS eligible FROM fit
), taken AS (
    -- each admitted step and the dollars it holds: its amount, or (alone) shrunk to its room
    SELECT f.n, CASE WHEN f.fits THEN s.amount ELSE least(s.amount, f.room) END AS amount
    FROM fit f JOIN steps s ON s.n = f.n CROSS JOIN batch b
    WHERE f.fits OR (b.eligible = 1 AND s.min_amount IS NOT NULL)
), holds AS (
    SELECT r.n, r.id AS period_id, CASE WHEN r.unit = 'usd' THEN t.amount ELSE r.amt END AS amount
    FROM run r JOIN taken t ON t.n = r.n
), held AS (
    SELECT period_id, sum(amount) AS amount FROM holds GROUP BY period_id
), upd AS (
    UPDATE budget_periods p
    SET reserved = p.reserved + h.amount
    FROM held h
    WHERE p.id = h.period_id
    RETURNING p.id, p.reserved
), pend AS (
    -- each admitted request's ledger entry, pending until it settles (finished_at: its
    -- deadline)
    INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost, cost_source,
                                outcome, started_at, finished_at, team_id, user_id,
                                end_user_id, tags)
    SELECT s.request_id, s.key_id, s.model, s.endpoint, s.stream, 0, 'none', 'pending',
           s.started_at, s.expires_at, s.team_id, s.user_id, s.end_user_id,
           CASE WHEN s.tags = '[]' THEN NULL ELSE s.tags::json END
    FROM taken t JOIN steps s ON s.n = t.n
    WHERE EXISTS (SELECT 1 FROM holds h WHERE h.n = t.n)
), hold AS (
    -- its charges, holding the reservation in each period until it settles
    INSERT INTO ledger_charges (request_id, period_id, amount)
    SELECT s.request_id, h.period_id, h.amount FROM holds h JOIN steps s ON s.n = h.n
), rej AS (
    INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost, cost_source,
                                outcome, status_code, started_at, finished_at, team_id, user_id,
                                end_user_id, tags)
    SELECT s.request_id, s.key_id, s.model, s.endpoint, s.stream, 0, 'none', 'rejected', 429,
           s.started_at, s.now, s.team_id, s.user_id, s.end_user_id,
           CASE WHEN s.tags = '[]' THEN NULL ELSE s.tags::json END
    FROM steps s JOIN judged j ON j.n = s.n WHERE j.current AND j.hopeless
)
SELECT s.request_id, k.id AS key_id, k.alias, k.key_prefix, k.status, k.models, k.expires_at,
       k.shrink_to_fit, k.team_id, k.user_id, sp.id, sp.budget_id, sp.kind, sp.unit,
       sp.owner_kind, o.name AS owner_name, sp.budget_duration, sp.period_start, sp.period_end,
       sp.max_budget, sp.spend, coalesce(upd.reserved, sp.reserved) AS reserved,
       s.key_ok, coalesce(j.current, false) AS current, t.amount AS taken,
       coalesce(j.hopeless OR f.fits OR b.eligible <= 1, false) AS decided
FROM steps s JOIN k ON k.id = s.key_id CROSS JOIN batch b
     LEFT JOIN judged j ON j.n = s.n
     LEFT JOIN fit f ON f.n = s.n
     LEFT JOIN sp ON sp.n = s.n
     LEFT JOIN owners o ON o.id = sp.owner_id
     LEFT JOIN upd ON upd.id = sp.id
     LEFT JOIN taken t ON t.n = s.n
ORDER BY s.n, sp.id
"""

# One statement settles a batch (parameters: one array per column of the steps, in the order
# of settle_soon's args): each pending entry becomes its outcome (with its overrun over what it
# held) and each of its charges what it is due in its period's unit, in place; each period is charged once (locked in ascending id
# order). An entry no longer pending (the sweeper recorded it abandoned) is left out: the
# entry's row lock orders the two, and READ COMMITTED re-checks `outcome` after the wait.
# In the entry's update `finished_at` changes (indexed), the charges' update touches no indexed
# column: PostgreSQL updates those in place on their page (HOT, room left by the fillfactor).
# Rows: each settled request's periods after the batch.
_PG_SETTLE = """
WITH s AS (
    SELECT *,
           CASE WHEN prompt_tokens IS NULL AND completion_tokens IS NULL THEN NULL
                ELSE coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) END AS tokens
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                $6::boolean[], $7::integer[], $8::integer[], $9::text[], $10::text[],
                $11::integer[], $12::timestamptz[], $13::timestamptz[])
        AS s(request_id, cost, key_id, model, endpoint, stream, prompt_tokens,
             completion_tokens, cost_source, outcome, status_code, started_at, finished_at)
), held AS (
    -- what each request holds in each of its periods, and the period's unit
    SELECT c.request_id, c.period_id, c.amount, b.unit
    FROM ledger_charges c JOIN budget_periods p ON p.id = c.period_id
         JOIN budgets b ON b.id = p.budget_id
    WHERE c.request_id = ANY($1::text[])
), base AS (
    -- what each request held in dollars (the same in each dollar period): its overrun's base
    SELECT request_id, min(amount) FILTER (WHERE unit = 'usd') AS amount FROM held
    GROUP BY request_id
), e AS (
    UPDATE ledger_entries l
    SET prompt_tokens = s.prompt_tokens, completion_tokens = s.completion_tokens,
        cost = s.cost, cost_source = s.cost_source, outcome = s.outcome,
        status_code = s.status_code, finished_at = s.finished_at,
        overrun = coalesce(greatest(s.cost - base.amount, 0), 0)
    FROM s JOIN base ON base.request_id = s.request_id
    -- (the pending test as a CASE: written `outcome = 'pending'` it lets the planner pick the
    -- partial index of pending entries, and walk every entry admitted since the last vacuum,
    -- instead of the primary key)
    WHERE l.request_id = s.request_id AND CASE WHEN l.outcome = 'pending' THEN true END
    RETURNING l.request_id
), dc AS (
    -- what each period is charged, in its unit (unit_charge)
    SELECT h.*,
           CASE h.unit WHEN 'usd' THEN s.cost WHEN 'tokens' THEN coalesce(s.tokens, h.amount)
                       WHEN 'requests' THEN 1 ELSE 0 END AS charge
    FROM held h JOIN e ON e.request_id = h.request_id JOIN s ON s.request_id = h.request_id
), c AS (
    UPDATE ledger_charges c SET amount = dc.charge
    FROM dc WHERE c.request_id = dc.request_id AND c.period_id = dc.period_id
), sums AS (
    SELECT period_id, sum(amount) AS released, sum(charge) AS charged FROM dc GROUP BY period_id
), lk AS (
    SELECT p.id FROM budget_periods p WHERE p.id IN (SELECT period_id FROM sums)
    ORDER BY p.id FOR UPDATE OF p
), u AS (
    UPDATE budget_periods p
    SET reserved = p.reserved - sums.released, spend = p.spend + sums.charged
    FROM sums, lk WHERE p.id = sums.period_id AND lk.id = p.id
    RETURNING p.budget_id, p.id, p.period_start, p.period_end, p.max_budget, p.spend,
              p.reserved
)
SELECT dc.request_id, dc.unit, u.* FROM dc JOIN u ON u.id = dc.period_id
ORDER BY dc.request_id, u.id
"""


_ADMIT, _SETTLE = _PG_ADMIT, _PG_SETTLE


def _resolve(
    step: _PgStep, rows: list[Any] | None = None, error: BaseException | None = None
) -> None:
    if not step.future.done():  # (an admission's caller cancelled at shutdown)
        if error is not None:
            step.future.set_exception(error)
        else:
            step.future.set_result(step.convert(rows or []))


def _columns(steps: list[_PgStep]) -> list[list[Any]]:
    """The steps' parameters as one array per column."""
    return [list(column) for column in zip(*(s.args for s in steps), strict=True)]


def _settled_states(rows: list[Any]) -> list[PeriodState] | None:
    return [PeriodState.from_row(r) for r in rows] if rows else None


# Every statement of the hot ledger finds its rows by key, and each is planned once per
# connection: the prepared statement's generic plan, made after a few runs, is kept until the
# tables are analyzed again. Made while the ledger's tables are still small (a new database),
# it scans them whole, and keeps doing so as they grow by thousands of rows a second until
# autovacuum's next analyze. Without sequential scans the plan looks rows up by their index
# whatever the tables' size.
_SESSION_SETTINGS = {"enable_seqscan": "off"}


async def _rollback_if_in_transaction(conn: Any) -> None:
    """The pool's reset on release. asyncpg's default (RESET ALL, CLOSE ALL, UNLISTEN *, advisory
    unlocks) is a round trip per step, for session state this pool never sets."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


@dataclass
class _PgStep:
    query: str  # _PG_ADMIT or _PG_SETTLE
    args: tuple[Any, ...]  # its parameters; the request id: args[1] (admits) or args[0]
    future: asyncio.Future[Any]
    convert: Callable[[list[Any]], Any]  # its rows -> the future's result

    @property
    def request_id(self) -> str:
        return self.args[1] if self.query is _ADMIT else self.args[0]


class PostgresHotLedger:
    """Group commit: the first step runs at once; the steps that arrive while a batch runs wait
    and then run together, whatever their keys, as the next batch: its settles in one statement
    (_PG_SETTLE), then its admits in another (_PG_ADMIT), one round trip and one WAL flush
    each. All steps of a key serialize on its period rows anyway (each holds their locks
    through its commit); batching shares that commit instead of queueing in PostgreSQL's lock
    manager, and a statement over the
    whole batch writes each period once instead of once per step. Batching across keys, not
    per key: with many connections on many keys, per-key batches would hold one step each (a
    planned statement and a round trip per step); one batch for all keys costs per request
    what one key's does (bench/RESULTS.md has the figures).

    Lock order: every statement locks the periods it touches in ascending id order. A step's
    error (a deadlock all the same, a duplicate request id) rolls its transaction back: those
    steps then run again one by one, each in its own transaction, so that only the failing one
    fails. A lost connection fails every step not yet committed (their commit is unknown: a
    re-run admit would find its own reservation, a re-run settle nothing to settle)."""

    MAX_BATCH = 200  # steps per transaction

    def __init__(self, dsn: str, pool_size: int) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: Any = None
        self._lock = asyncio.Lock()
        self._queue: list[_PgStep] | None = None  # while a batch runs: the steps for the next
        self._draining: asyncio.Task[None] | None = None
        self._observers: list[BatchObserver] = []

    @property
    def queued_steps(self) -> int:
        return len(self._queue) if self._queue is not None else 0

    def observe_batches(self, observer: BatchObserver) -> None:
        self._observers.append(observer)

    async def _acquire_pool(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    import asyncpg

                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=1,
                        max_size=self.pool_size,
                        max_inactive_connection_lifetime=300,
                        command_timeout=30,
                        reset=_rollback_if_in_transaction,
                        server_settings=_SESSION_SETTINGS,
                    )
        return self._pool

    def _submit(
        self,
        query: str,
        args: tuple[Any, ...],
        convert: Callable[[list[Any]], Any] = lambda rows: rows,
    ) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        step = _PgStep(query, args, loop.create_future(), convert)
        if self._queue is not None:  # a batch is running: join the next one
            self._queue.append(step)
        else:
            self._queue = [step]
            self._draining = loop.create_task(self._drain(self._queue))
        return step.future

    async def _drain(self, queue: list[_PgStep]) -> None:
        """Run the queued steps, a batch at a time, until none are left."""
        try:
            while queue:
                batch, queue[:] = queue[: self.MAX_BATCH], queue[self.MAX_BATCH :]
                try:
                    await self._execute([s for s in batch if not s.future.cancelled()])
                except BaseException as exc:  # a lost connection, a cancel at shutdown, a bug
                    for step in batch:
                        _resolve(step, error=exc)
                    if not isinstance(exc, Exception):
                        raise
        finally:
            self._queue = None
            for step in queue:  # only when cancelled
                step.future.cancel()

    async def _execute(self, batch: list[_PgStep]) -> None:
        """Run a batch: its settles (what they free is there for the admits), then its admits,
        each kind in one transaction of its own (one round trip each: on a busy event loop a
        round trip costs more than a commit)."""
        for observe in self._observers:
            observe(["admit" if s.query is _ADMIT else "settle" for s in batch])
        settles = [s for s in batch if s.query is _SETTLE]
        admits = [s for s in batch if s.query is _ADMIT]
        pool = await self._acquire_pool()
        async with pool.acquire() as conn:
            for steps in (settles, admits):
                if steps:
                    await self._execute_together(conn, steps)

    async def _execute_together(self, conn: Any, steps: list[_PgStep]) -> None:
        """Steps of one kind in one transaction; hand each its rows or its error."""
        import asyncpg

        first: list[_PgStep] = []
        again: list[_PgStep] = []  # a request a second time: rows are told apart by request id
        ids: set[str] = set()
        for step in steps:
            (again if step.request_id in ids else first).append(step)
            ids.add(step.request_id)
        if again:
            await self._execute_together(conn, first)
            await self._execute_together(conn, again)
            return
        try:
            rows = await self._run(conn, steps)
        except asyncpg.PostgresError:
            if len(steps) == 1 or conn.is_closed():
                raise
            # One step failed and the transaction was rolled back: one by one now.
            for step in steps:
                try:
                    result = await self._run(conn, [step])
                except asyncpg.PostgresError as exc:
                    if conn.is_closed():
                        raise
                    _resolve(step, error=exc)
                else:
                    _resolve(step, result)
            return
        BATCH_STEPS.observe(len(steps))
        by_request: dict[str, list[Any]] = {}
        for row in rows:
            by_request.setdefault(row["request_id"], []).append(row)
        for step in steps:
            _resolve(step, by_request.get(step.request_id, []))

    @staticmethod
    async def _run(conn: Any, steps: list[_PgStep]) -> list[Any]:
        """Steps of one kind, in one statement over arrays: their rows. The admits of a key the
        statement could not decide together run again one at a time."""
        query = steps[0].query
        rows = await conn.fetch(query, *_columns(steps))
        if query is _ADMIT:
            undecided = {r["request_id"] for r in rows if r["current"] and not r["decided"]}
            if undecided:  # (nothing was written for their keys) each decided alone, in order
                rows = [r for r in rows if r["request_id"] not in undecided]
                for step in steps:
                    if step.request_id in undecided:
                        rows += await conn.fetch(query, *_columns([step]))
        return rows  # type: ignore[no-any-return]

    async def admit(self, req: AdmitRequest, now: datetime) -> Decision:
        rows = await self._submit(
            _ADMIT,
            (
                req.key_hash,
                req.request_id,
                req.amount,
                now,
                req.model,
                req.endpoint,
                req.stream,
                req.started_at,
                req.expires_at,
                req.min_amount,
                req.tokens,
                req.end_user_id,
                json.dumps(sorted(set(req.tags))),
            ),
        )
        if not rows:
            return KeyRefused(None, "unknown")
        first = rows[0]
        periods = [r for r in rows if r["id"] is not None]
        key = KeyContext(
            id=first["key_id"],
            alias=first["alias"],
            key_prefix=first["key_prefix"],
            status=first["status"],
            models=json.loads(first["models"]) if first["models"] else [],
            expires_at=first["expires_at"],
            budgets=[
                BudgetRef(r["budget_id"], r["kind"], r["id"], r["period_end"])
                for r in periods
                if r["owner_kind"] == "key"
            ],
            shrink_to_fit=first["shrink_to_fit"],
            team_id=first["team_id"],
            user_id=first["user_id"],
        )
        refusal = key_refusal(key, now, req.model)
        if (refusal is None) != first["key_ok"]:  # the statement's key_ok is the same rule
            raise RuntimeError(f"key {key.id}: the admission statement and key_refusal disagree")
        if refusal is not None:
            return KeyRefused(key, refusal)
        if not first["current"]:
            expired = [
                (r["budget_id"], r["id"])
                for r in periods
                if r["period_end"] is not None and r["period_end"] <= now
            ]
            return PeriodsExpired(key, expired) if expired else PeriodsChanged(key)
        states = [PeriodState.from_row(r) for r in periods]
        if first["taken"] is None:
            return Rejected(key, refusing(states, req.least, req.tokens), req.amount)
        return Admitted(key, states, first["taken"])

    def settle_soon(
        self, req: RequestInfo, result: Outcome, now: datetime
    ) -> asyncio.Future[list[PeriodState] | None]:
        args = (
            req.request_id,
            result.cost,
            req.key_id,
            req.model,
            req.endpoint,
            req.stream,
            result.prompt_tokens,
            result.completion_tokens,
            result.cost_source,
            result.outcome,
            result.status_code,
            req.started_at,
            now,
        )
        return self._submit(_SETTLE, args, _settled_states)

    async def close(self) -> None:
        if self._draining is not None:  # let the running batches finish
            await asyncio.wait({self._draining})
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
