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

from app.budgets.state import BudgetRef, PeriodState
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
# expiry, min amount): each key, the open periods of them all locked in ascending id order, and
# per key the verdict as if its steps came one by one, each on what the ones before it left.
# Exactly, in one pass, in the cases that are nearly always the case: every step of the key
# fits in turn (all are reserved, each period written once), the key's only step fits shrunk
# to its periods' room (AdmitRequest.min_amount), or none fits even alone, even shrunk (all are
# rejected; nothing the batch does changes that). Otherwise nothing is written for that key and its
# `decided` is false: the caller runs its steps again one at a time (a batch of one is always
# decided). Keys do not share periods, so each key's verdict is its own. The verdict reads the
# locked rows' latest committed values (READ COMMITTED re-reads rows it had to wait for), and
# the locks are held until the statement's implicit transaction commits. Rows: per step of a
# known key (in order) the key and each of its periods, after the batch.
_PG_ADMIT = """
WITH a AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::text[],
                         $6::text[], $7::boolean[], $8::timestamptz[], $9::timestamptz[],
                         $10::bigint[])
        WITH ORDINALITY AS a(key_hash, request_id, amount, now, model, endpoint, stream,
                             started_at, expires_at, min_amount, n)
), k AS (
    SELECT id, key_hash, alias, key_prefix, status, models, expires_at, shrink_to_fit
    FROM api_keys WHERE key_hash = ANY($1::text[])
), per AS (
    SELECT p.id, p.budget_id, b.key_id, b.kind, p.period_start, p.period_end, p.max_budget,
           p.spend, p.reserved
    FROM budget_periods p JOIN budgets b ON b.id = p.budget_id
    WHERE b.key_id IN (SELECT id FROM k) AND p.closed_at IS NULL
    ORDER BY p.id
    FOR UPDATE OF p
), steps AS (
    -- may the key make this request (status, expiry, model); what the batch holds with it
    SELECT a.*, k.id AS key_id, ok.key_ok,
           sum(CASE WHEN ok.key_ok THEN a.amount ELSE 0 END)
               OVER (PARTITION BY k.id ORDER BY a.n) AS upto
    FROM a JOIN k ON k.key_hash = a.key_hash CROSS JOIN LATERAL (
        SELECT coalesce(k.status = 'active' AND (k.expires_at IS NULL OR k.expires_at > a.now)
                        AND (a.model IS NULL OR json_array_length(k.models) = 0
                             OR k.models::jsonb ? a.model), false) AS key_ok
    ) ok
), judged AS (
    -- the one comparison (PeriodState.fits): in turn, and alone with the least amount the
    -- step may hold (its min_amount when it may shrink to fit); the room of its periods
    SELECT s.n, s.key_id,
           bool_and(p.max_budget IS NULL
                    OR (p.spend + p.reserved + s.upto - s.amount < p.max_budget
                        AND p.spend + p.reserved + s.upto <= p.max_budget)) AS in_turn,
           bool_and(p.max_budget IS NULL
                    OR (p.spend + p.reserved < p.max_budget
                        AND p.spend + p.reserved + least(s.amount, s.min_amount)
                            <= p.max_budget)) AS alone,
           min(p.max_budget - p.spend - p.reserved) AS room
    FROM steps s JOIN per p ON p.key_id = s.key_id WHERE s.key_ok GROUP BY s.n, s.key_id
), per_key AS (
    SELECT key_id, count(*) AS periods,
           bool_and(period_end IS NULL OR period_end > (SELECT max(now) FROM a)) AS unexpired
    FROM per GROUP BY key_id
), budgets_key AS (
    SELECT key_id, count(*) AS budgets FROM budgets WHERE key_id IN (SELECT id FROM k)
    GROUP BY key_id
), judged_key AS (
    SELECT key_id, bool_and(in_turn) AS fits, NOT bool_or(alone) AS none_fit,
           -- the key's only step, in full or shrunk to fit
           count(*) = 1 AND bool_and(alone) AS shrinks
    FROM judged GROUP BY key_id
), verdict AS (
    SELECT k.id AS key_id,
        -- every budget's open period, none expired: a period closed by a concurrent roll
        -- while we waited for its lock drops out of `per` (its new one is not in our
        -- snapshot), so the count tells us to look again
        coalesce(pk.unexpired, true)
            AND coalesce(pk.periods, 0) = coalesce(bk.budgets, 0) AS current,
        coalesce(jk.fits, true) AS fits,
        coalesce(jk.none_fit, false) AS none_fit,
        coalesce(jk.shrinks, false) AS shrinks
    FROM k LEFT JOIN per_key pk ON pk.key_id = k.id LEFT JOIN budgets_key bk ON bk.key_id = k.id
         LEFT JOIN judged_key jk ON jk.key_id = k.id
), taken AS (
    -- each admitted step and what it holds: its amount, or what its periods have room for
    SELECT s.n, s.key_id, CASE WHEN v.fits THEN s.amount ELSE least(s.amount, j.room) END AS amount
    FROM steps s JOIN verdict v ON v.key_id = s.key_id LEFT JOIN judged j ON j.n = s.n
    WHERE s.key_ok AND v.current AND (v.fits OR v.shrinks)
), held AS (
    SELECT key_id, sum(amount) AS amount FROM taken GROUP BY key_id
), upd AS (
    UPDATE budget_periods p
    SET reserved = p.reserved + h.amount
    FROM per, held h
    WHERE p.id = per.id AND h.key_id = per.key_id
    RETURNING p.id, p.reserved
), pend AS (
    -- the request's ledger entry, pending until it settles (finished_at: its deadline)
    INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost, cost_source,
                                outcome, started_at, finished_at)
    SELECT s.request_id, s.key_id, s.model, s.endpoint, s.stream, 0, 'none', 'pending',
           s.started_at, s.expires_at
    FROM taken t JOIN steps s ON s.n = t.n
    WHERE EXISTS (SELECT 1 FROM per WHERE per.key_id = s.key_id)
), hold AS (
    -- its charges, holding the reservation in each period until it settles
    INSERT INTO ledger_charges (request_id, period_id, amount)
    SELECT s.request_id, upd.id, t.amount
    FROM taken t JOIN steps s ON s.n = t.n JOIN per ON per.key_id = s.key_id
         JOIN upd ON upd.id = per.id
), rej AS (
    INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost, cost_source,
                                outcome, status_code, started_at, finished_at)
    SELECT s.request_id, s.key_id, s.model, s.endpoint, s.stream, 0, 'none', 'rejected', 429,
           s.started_at, s.now
    FROM steps s JOIN verdict v ON v.key_id = s.key_id
    WHERE s.key_ok AND v.current AND v.none_fit
)
SELECT s.request_id, k.id AS key_id, k.alias, k.key_prefix, k.status, k.models, k.expires_at,
       k.shrink_to_fit, per.id, per.budget_id, per.kind, per.period_start, per.period_end, per.max_budget,
       per.spend, coalesce(upd.reserved, per.reserved) AS reserved,
       s.key_ok, v.current, t.amount AS taken, v.fits OR v.shrinks OR v.none_fit AS decided
FROM steps s JOIN k ON k.id = s.key_id JOIN verdict v ON v.key_id = s.key_id
     LEFT JOIN per ON per.key_id = s.key_id LEFT JOIN upd ON upd.id = per.id
     LEFT JOIN taken t ON t.n = s.n
ORDER BY s.n, per.id
"""

# One statement settles a batch (parameters: one array per column of the steps, in the order
# of settle_soon's args): each pending entry becomes its outcome (with its overrun over what it
# held) and its charges its cost, in place; each period is charged once (locked in ascending id
# order). An entry no longer pending (the sweeper recorded it abandoned) is left out: the
# entry's row lock orders the two, and READ COMMITTED re-checks `outcome` after the wait.
# In the entry's update `finished_at` changes (indexed), the charges' update touches no indexed
# column: PostgreSQL updates those in place on their page (HOT, room left by the fillfactor).
# Rows: each settled request's periods after the batch.
_PG_SETTLE = """
WITH s AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                         $6::boolean[], $7::integer[], $8::integer[], $9::text[], $10::text[],
                         $11::integer[], $12::timestamptz[], $13::timestamptz[])
        AS s(request_id, cost, key_id, model, endpoint, stream, prompt_tokens,
             completion_tokens, cost_source, outcome, status_code, started_at, finished_at)
), held AS (
    -- what each request held (the same amount in each of its periods): its overrun's base
    SELECT c.request_id, min(c.amount) AS amount
    FROM ledger_charges c WHERE c.request_id = ANY($1::text[]) GROUP BY c.request_id
), e AS (
    UPDATE ledger_entries l
    SET prompt_tokens = s.prompt_tokens, completion_tokens = s.completion_tokens,
        cost = s.cost, cost_source = s.cost_source, outcome = s.outcome,
        status_code = s.status_code, finished_at = s.finished_at,
        overrun = greatest(s.cost - held.amount, 0)
    FROM s JOIN held ON held.request_id = s.request_id
    -- (the pending test as a CASE: written `outcome = 'pending'` it lets the planner pick the
    -- partial index of pending entries, and walk every entry admitted since the last vacuum,
    -- instead of the primary key)
    WHERE l.request_id = s.request_id AND CASE WHEN l.outcome = 'pending' THEN true END
    RETURNING l.request_id, l.cost
), d AS (
    SELECT c.request_id, c.period_id, c.amount, e.cost
    FROM ledger_charges c JOIN e ON e.request_id = c.request_id
), c AS (
    UPDATE ledger_charges c SET amount = d.cost
    FROM d WHERE c.request_id = d.request_id AND c.period_id = d.period_id
), sums AS (
    SELECT period_id, sum(amount) AS released, sum(cost) AS charged FROM d GROUP BY period_id
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
SELECT d.request_id, u.* FROM d JOIN u ON u.id = d.period_id ORDER BY d.request_id, u.id
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
                BudgetRef(r["budget_id"], r["kind"], r["id"], r["period_end"]) for r in periods
            ],
            shrink_to_fit=first["shrink_to_fit"],
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
            refused = next(s for s in states if not s.fits(req.least))
            return Rejected(key, refused, req.amount)
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
