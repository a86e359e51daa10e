"""The request path's two ledger steps, on the database driver itself.

`admit` (authenticate + reserve, all or none, or record the rejection) and `settle` (actual cost
replaces the reservation + the ledger entry) run once per request; everything else (rolls,
resets, the sweeper, the admin API) uses SQLAlchemy in app.budgets.repository. Both ledgers group
commit: the steps that arrive together share a transaction, and a step's result is handed back
only after its transaction committed; when one step of a group fails, the group runs again one
step at a time, so that only the failing step fails.

PostgreSQL: the steps arriving while a batch runs make the next batch, whatever their keys
(PostgresHotLedger). A batch's settles, then its admits, are each ONE statement over arrays
(data-modifying CTEs; the period rows locked in ascending id order, each written once), one
round trip and one transaction each.

SQLite: the steps queued in the same event-loop turn make a batch, run in a `BEGIN IMMEDIATE`
transaction on a connection used from the event loop, with no thread hand-off (statements take
microseconds; the transaction never spans an await, so it never holds the lock while others
wait on us). It holds SQLite's write lock, so a batch's admits are decided in Python on each
key read once, with the one comparison (PeriodState.fits), and each period is written once.

Why not SQLAlchemy here: measured (bench/ledger_micro.py) 3.6-4.8 ms of CPU per request through
SQLAlchemy + aiosqlite against 0.1-0.7 ms for the same SQL on the drivers.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import Histogram
from sqlalchemy.engine import make_url

from app.budgets.repository import Admission, Outcome, RequestInfo
from app.budgets.state import BudgetRef, PeriodState, amount_to_reserve
from app.config import Settings
from app.keys.repository import KeyContext

# Steps (admits and settles) per request-path transaction: group commit at work.
BATCH_STEPS = Histogram(
    "budgetgate_ledger_batch_steps",
    "Request-path ledger steps (admits and settles) committed in one transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)


@dataclass(frozen=True)
class AdmitRequest:
    key_hash: str
    request_id: str
    model: str | None  # metered requests: checked against the key's allow-list
    endpoint: str
    stream: bool
    amount: int  # nano-dollars to hold in every budget's current period
    started_at: datetime
    expires_at: datetime  # when the sweeper may release the reservation
    # Shrink to fit: when `amount` does not fit, hold the largest amount that fits every
    # budget if it is at least this much (Admission.amount says what was held). None: all or
    # nothing.
    min_amount: int | None = None

    @property
    def least(self) -> int:
        """The least amount this request may be admitted with."""
        return self.amount if self.min_amount is None else min(self.min_amount, self.amount)


@dataclass(frozen=True)
class AdmitResult:
    key: KeyContext | None  # None: no such key
    admission: Admission | None  # None: not attempted (key refused, or a period to roll)
    expired_periods: list[tuple[str, int]]  # (budget id, period id) to roll, then try again
    retry: bool = False  # a period changed under us (a concurrent roll or reset): try again

    def refusal(self, now: datetime) -> str | None:
        """Why the key itself was refused: unknown, revoked, expired, model; None if not."""
        key = self.key
        if key is None:
            return "unknown"
        if key.status != "active":
            return "revoked"
        if key.expires_at is not None and key.expires_at <= now:
            return "expired"
        return None


def model_allowed(models: list[str], model: str | None) -> bool:
    return model is None or not models or model in models


class HotLedger(Protocol):
    async def admit(self, req: AdmitRequest, now: datetime) -> AdmitResult: ...

    def settle_soon(
        self, req: RequestInfo, result: Outcome, now: datetime
    ) -> asyncio.Future[list[PeriodState] | None]:
        """Queue the settlement; the future has its periods' state after it (None: nothing was
        held any more, the sweeper released it). It runs to its end whatever happens to its
        caller: await it shielded (asyncio.shield), never cancel it."""
        ...

    async def close(self) -> None: ...


def create_hot_ledger(settings: Settings) -> HotLedger:
    url = make_url(settings.database_url)
    pool_size = settings.db_pool_size
    if url.get_backend_name() == "sqlite":
        return SqliteHotLedger(url.database or "", settings.sqlite_synchronous)
    return PostgresHotLedger(
        url.set(drivername="postgresql").render_as_string(hide_password=False), pool_size
    )


# -- SQLite ------------------------------------------------------------------------------------


def _sqlite_time(when: datetime) -> str:
    # SQLAlchemy's SQLite DateTime storage format (naive UTC), so text order is time order.
    if when.tzinfo is not UTC:  # (the clock's times are UTC already: skip the conversion)
        when = when.astimezone(UTC)
    return when.isoformat(" ", "microseconds")[:26]  # without its "+00:00"


def _sqlite_parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


_SQLITE_AUTH = """
SELECT k.id, k.alias, k.key_prefix, k.status, k.models, k.expires_at,
       b.id, b.kind, p.id, p.period_start, p.period_end, p.max_budget, p.spend, p.reserved,
       k.key_hash, k.shrink_to_fit
FROM api_keys k
LEFT JOIN budgets b ON b.key_id = k.id
LEFT JOIN budget_periods p ON p.budget_id = b.id AND p.closed_at IS NULL
WHERE k.key_hash IN ({})
"""
_SQLITE_RELEASE = """
DELETE FROM reservations WHERE request_id IN (SELECT value FROM json_each(?))
RETURNING request_id, period_id, amount
"""
_SQLITE_INSERT_RESERVATION = """
INSERT INTO reservations (request_id, period_id, amount, key_id, model, endpoint, stream,
                          started_at, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SQLITE_INSERT_ENTRY = """
INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, prompt_tokens,
                            completion_tokens, cost, cost_source, outcome, status_code,
                            started_at, finished_at, overrun)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_SQLITE_SETTLE_PERIOD = """
UPDATE budget_periods SET reserved = reserved - ?, spend = spend + ?
WHERE id = ?
RETURNING budget_id, id, period_start, period_end, max_budget, spend, reserved
"""


def _sqlite_state(row: tuple[Any, ...]) -> PeriodState:
    return PeriodState(
        budget_id=row[0],
        period_id=row[1],
        period_start=_sqlite_parse(row[2]) or datetime.min.replace(tzinfo=UTC),
        period_end=_sqlite_parse(row[3]),
        max_budget=row[4],
        spend=row[5],
        reserved=row[6],
    )


@dataclass
class _SqliteStep:
    # (connection, [args of each step]) -> [result of each step], inside the batch's
    # transaction: the steps of a batch with the same fn run in one call (set-based work)
    fn: Any
    args: Any
    future: asyncio.Future[Any]
    deadline: float  # loop time after which a busy database is this step's error


def _busy(exc: Exception) -> bool:
    """Another connection holds SQLite's write lock (or a checkpoint does): try again later."""
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc)
    )


def _sqlite_admit(
    conn: sqlite3.Connection, steps: list[tuple[AdmitRequest, datetime]]
) -> list[AdmitResult]:
    """Admit requests in order, as if one by one: each is decided on the periods' money as the
    ones before it left it. The batch's transaction holds SQLite's write lock, so what it reads
    stays true until its commit: the keys are read once, in one query, the decisions are made
    here (the same comparison as everywhere: PeriodState.fits), and the periods are written
    once."""
    money: dict[int, PeriodState] = {}  # period id -> its money, with this batch's reservations
    keys = _sqlite_read_keys(conn, {req.key_hash for req, _ in steps}, money)
    held: dict[int, int] = {}  # period id -> what this batch reserved on it
    reservations: list[tuple[Any, ...]] = []
    rejections: list[tuple[Any, ...]] = []
    results: list[AdmitResult] = []
    for req, now in steps:
        found = keys.get(req.key_hash)
        if found is None:
            results.append(AdmitResult(None, None, []))
            continue
        key, periods = found
        if AdmitResult(key, None, []).refusal(now) or not model_allowed(key.models, req.model):
            results.append(AdmitResult(key, None, []))
            continue
        now_text = _sqlite_time(now)
        expired = [(r[6], r[8]) for r in periods if r[10] is not None and r[10] <= now_text]
        if expired:
            results.append(AdmitResult(key, None, expired))
            continue
        states = [money[r[8]] for r in periods]  # ascending period id
        take = amount_to_reserve(states, req.amount, req.min_amount)
        if take is None:
            refused = next(st for st in states if not st.fits(req.least))
            rejections.append(
                (req.request_id, key.id, req.model, req.endpoint, req.stream, None, None, 0)
                + ("none", "rejected", 429, _sqlite_time(req.started_at), now_text, 0)
            )
            results.append(AdmitResult(key, Admission(False, [refused], req.amount), []))
            continue
        started, expires = _sqlite_time(req.started_at), _sqlite_time(req.expires_at)
        after = []
        for st in states:
            money[st.period_id] = replace(st, reserved=st.reserved + take)
            after.append(money[st.period_id])
            held[st.period_id] = held.get(st.period_id, 0) + take
            reservations.append(
                (req.request_id, st.period_id, take, key.id, req.model, req.endpoint)
                + (req.stream, started, expires)
            )
        results.append(AdmitResult(key, Admission(True, after, take), []))
    for period_id in sorted(held):
        conn.execute(
            "UPDATE budget_periods SET reserved = reserved + ? WHERE id = ?",
            (held[period_id], period_id),
        )
    if reservations:
        conn.executemany(_SQLITE_INSERT_RESERVATION, reservations)
    if rejections:
        conn.executemany(_SQLITE_INSERT_ENTRY, rejections)
    return results


def _sqlite_read_keys(
    conn: sqlite3.Connection, key_hashes: set[str], money: dict[int, PeriodState]
) -> dict[str, tuple[KeyContext, list[Any]]]:
    """Each key there is among `key_hashes`, and its budgets' open periods (rows, ascending
    period id), in one query; their money into `money`."""
    sql = _SQLITE_AUTH.format(", ".join("?" * len(key_hashes)))  # (cached per count)
    rows_of: dict[str, list[Any]] = {}
    for row in conn.execute(sql, tuple(key_hashes)):
        rows_of.setdefault(row[14], []).append(row)
    keys: dict[str, tuple[KeyContext, list[Any]]] = {}
    for key_hash, rows in rows_of.items():
        first = rows[0]
        periods = sorted((r for r in rows if r[8] is not None), key=lambda r: r[8])
        keys[key_hash] = (
            KeyContext(
                id=first[0],
                alias=first[1],
                key_prefix=first[2],
                status=first[3],
                models=json.loads(first[4]) if first[4] else [],
                expires_at=_sqlite_parse(first[5]),
                budgets=[BudgetRef(r[6], r[7], r[8], _sqlite_parse(r[10])) for r in periods],
                shrink_to_fit=None if first[15] is None else bool(first[15]),
            ),
            periods,
        )
        for r in periods:
            money[r[8]] = _sqlite_state((r[6], r[8], r[9], r[10], r[11], r[12], r[13]))
    return keys


def _sqlite_settle(
    conn: sqlite3.Connection, steps: list[tuple[RequestInfo, Outcome, datetime]]
) -> list[list[PeriodState] | None]:
    """Settle requests: their reservations go, their costs are charged, each period written
    once; every request gets its periods' state after the batch. None: nothing to settle (the
    sweeper released it already)."""
    ids = json.dumps([req.request_id for req, _, _ in steps])
    held: dict[str, list[tuple[int, int]]] = {}
    for request_id, period_id, amount in conn.execute(_SQLITE_RELEASE, (ids,)).fetchall():
        held.setdefault(request_id, []).append((period_id, amount))
    released: dict[int, int] = {}  # period id -> reservations released
    charged: dict[int, int] = {}  # period id -> cost charged
    entries: list[tuple[Any, ...]] = []
    charges: list[tuple[str, int, int]] = []
    settled: list[list[int] | None] = []
    for req, result, now in steps:
        mine = held.pop(req.request_id, None)  # (a request twice in a batch: settled once)
        if not mine:
            settled.append(None)
            continue
        for period_id, amount in mine:
            released[period_id] = released.get(period_id, 0) + amount
            charged[period_id] = charged.get(period_id, 0) + result.cost
            charges.append((req.request_id, period_id, result.cost))
        # The same amount is held in each period: the overrun is over that reservation (SPEC
        # 10), from what the ledger held, whatever the caller believes it reserved.
        overrun = max(result.cost - min(amount for _, amount in mine), 0)
        entries.append(
            (req.request_id, req.key_id, req.model, req.endpoint, req.stream)
            + (result.prompt_tokens, result.completion_tokens, result.cost, result.cost_source)
            + (result.outcome, result.status_code, _sqlite_time(req.started_at))
            + (_sqlite_time(now), overrun)
        )
        settled.append(sorted(period_id for period_id, _ in mine))
    states = {
        period_id: _sqlite_state(
            conn.execute(
                _SQLITE_SETTLE_PERIOD, (released[period_id], charged[period_id], period_id)
            ).fetchone()
        )
        for period_id in sorted(released)
    }
    if entries:
        conn.executemany(_SQLITE_INSERT_ENTRY, entries)
        conn.executemany(
            "INSERT INTO ledger_charges (request_id, period_id, amount) VALUES (?, ?, ?)", charges
        )
    return [None if mine is None else [states[i] for i in mine] for mine in settled]


class SqliteHotLedger:
    BUSY_RETRY_SECONDS = 0.0005
    BUSY_GIVE_UP_SECONDS = 10.0
    CHECKPOINT_EVERY = 100  # steps

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._since_checkpoint = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._queue: list[_SqliteStep] = []
        self._flush_pending = False

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # Autocommit mode: transactions are explicit. busy_timeout 0: when another
            # connection (the admin API's, the CLI) holds the write lock, wait with
            # asyncio.sleep below, never by blocking the event loop that connection may need.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA journal_mode=WAL")
            # Per connection, like in app.db: see Settings.sqlite_synchronous.
            conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            conn.execute("PRAGMA foreign_keys=ON")
            # Copying the WAL back into the database is done by _checkpoint_soon, in a
            # thread: on this connection it would stall the event loop every ~30 requests.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            conn.execute(f"PRAGMA journal_size_limit={64 * 1024 * 1024}")
            self._conn = conn
        return self._conn

    def _checkpoint_soon(self, steps: int) -> None:
        self._since_checkpoint += steps
        if self._since_checkpoint < self.CHECKPOINT_EVERY:
            return
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._since_checkpoint = 0
        self._checkpoint = asyncio.get_running_loop().create_task(
            asyncio.to_thread(self._run_checkpoint)
        )

    def _run_checkpoint(self) -> None:
        # RESTART, not PASSIVE: under steady writes a passive checkpoint never catches up with
        # the end of the WAL, which then grows without bound (seen: 6.8 GB after 100k
        # requests, throughput falling). RESTART holds writers off while it copies (our
        # transactions see SQLITE_BUSY and retry after an asyncio.sleep) and lets the next
        # writer start the WAL over. Its own short-lived connection, in a thread.
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA wal_checkpoint(RESTART)")
        except sqlite3.Error:
            pass  # the next one will do it
        finally:
            conn.close()

    def _submit(self, fn: Any, args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        step = _SqliteStep(fn, args, loop.create_future(), loop.time() + self.BUSY_GIVE_UP_SECONDS)
        self._queue.append(step)
        if not self._flush_pending:
            # One loop turn later: the steps of the callbacks ready in this turn and of those
            # the next turn's I/O wakes join the batch (wrk -c32: 16 steps per transaction
            # instead of 10.5, -6 % CPU per request; nothing measurable at one connection).
            self._flush_pending = True
            loop.call_soon(loop.call_soon, self._flush)
        return step.future

    def _flush(self) -> None:
        """Run the queued steps in one transaction; on a busy database, retry them shortly."""
        self._flush_pending = False
        batch = [step for step in self._queue if not step.future.cancelled()]
        self._queue = []
        if not batch:
            return
        try:
            results = self._run_batch(batch)
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                self._fail(batch, exc)
                return
            loop = asyncio.get_running_loop()
            now = loop.time()
            self._fail([step for step in batch if step.deadline < now], exc)
            self._queue = [step for step in batch if step.deadline >= now] + self._queue
            if self._queue and not self._flush_pending:
                self._flush_pending = True
                loop.call_later(self.BUSY_RETRY_SECONDS, self._flush)
            return
        except Exception as exc:
            self._fail(batch, exc)
            return
        self._checkpoint_soon(len(batch))
        BATCH_STEPS.observe(len(batch))
        for step, (ok, value) in zip(batch, results, strict=True):
            if step.future.cancelled():
                continue
            if ok:
                step.future.set_result(value)
            else:
                step.future.set_exception(value)

    def _run_batch(self, batch: list[_SqliteStep]) -> list[tuple[bool, Any]]:
        """(True, result) or (False, its exception) per step, once committed. A busy or locked
        database raises, with the transaction rolled back.

        First the steps with the same fn together, in one call each, without savepoints; when
        that fails, the transaction is rolled back and the batch runs again, each step alone
        in its own savepoint, so that only the failing step fails."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                together: dict[Any, list[int]] = {}
                for i, step in enumerate(batch):
                    together.setdefault(step.fn, []).append(i)
                results: list[tuple[bool, Any]] = [(False, None)] * len(batch)
                for fn, indexes in together.items():
                    values = fn(conn, [batch[i].args for i in indexes])
                    for i, value in zip(indexes, values, strict=True):
                        results[i] = (True, value)
            except Exception as exc:
                if len(batch) == 1 or _busy(exc):
                    raise  # (busy: the whole batch again, later)
                conn.execute("ROLLBACK")
                return self._run_batch_in_savepoints(conn, batch)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    @staticmethod
    def _run_batch_in_savepoints(
        conn: sqlite3.Connection, batch: list[_SqliteStep]
    ) -> list[tuple[bool, Any]]:
        conn.execute("BEGIN IMMEDIATE")
        results: list[tuple[bool, Any]] = []
        for step in batch:
            conn.execute("SAVEPOINT step")
            try:
                results.append((True, step.fn(conn, [step.args])[0]))
            except Exception as exc:
                if _busy(exc):
                    raise  # the whole batch again
                conn.execute("ROLLBACK TO step")
                results.append((False, exc))
            conn.execute("RELEASE step")
        conn.execute("COMMIT")
        return results

    @staticmethod
    def _fail(steps: list[_SqliteStep], exc: BaseException) -> None:
        for step in steps:
            if not step.future.done():
                step.future.set_exception(exc)

    async def admit(self, req: AdmitRequest, now: datetime) -> AdmitResult:
        return await self._submit(_sqlite_admit, (req, now))  # type: ignore[no-any-return]

    def settle_soon(
        self, req: RequestInfo, result: Outcome, now: datetime
    ) -> asyncio.Future[list[PeriodState] | None]:
        return self._submit(_sqlite_settle, (req, result, now))

    async def close(self) -> None:
        if self._queue:
            self._flush()
        if self._checkpoint is not None:
            await self._checkpoint
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- PostgreSQL --------------------------------------------------------------------------------

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
), res AS (
    INSERT INTO reservations (request_id, period_id, amount, key_id, model, endpoint, stream,
                              started_at, expires_at)
    SELECT s.request_id, upd.id, t.amount, s.key_id, s.model, s.endpoint, s.stream,
           s.started_at, s.expires_at
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
# of settle_soon's args): release the reservations, charge each of their periods once (locked
# in ascending id order), write the entries (each with its overrun over what it held) and their
# charges. A request whose reservation the sweeper released already is left out. Rows: each
# settled request's periods after the batch.
_PG_SETTLE = """
WITH s AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                         $6::boolean[], $7::integer[], $8::integer[], $9::text[], $10::text[],
                         $11::integer[], $12::timestamptz[], $13::timestamptz[])
        AS s(request_id, cost, key_id, model, endpoint, stream, prompt_tokens,
             completion_tokens, cost_source, outcome, status_code, started_at, finished_at)
), d AS (
    DELETE FROM reservations r USING s WHERE r.request_id = s.request_id
    RETURNING r.request_id, r.period_id, r.amount, s.cost
), sums AS (
    SELECT period_id, sum(amount) AS released, sum(cost) AS charged FROM d GROUP BY period_id
), held AS (
    -- what each request held (the same amount in each of its periods): its overrun's base
    SELECT request_id, min(amount) AS amount FROM d GROUP BY request_id
), lk AS (
    SELECT p.id FROM budget_periods p WHERE p.id IN (SELECT period_id FROM sums)
    ORDER BY p.id FOR UPDATE OF p
), u AS (
    UPDATE budget_periods p
    SET reserved = p.reserved - sums.released, spend = p.spend + sums.charged
    FROM sums, lk WHERE p.id = sums.period_id AND lk.id = p.id
    RETURNING p.budget_id, p.id, p.period_start, p.period_end, p.max_budget, p.spend,
              p.reserved
), e AS (
    INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, prompt_tokens,
                                completion_tokens, cost, cost_source, outcome, status_code,
                                started_at, finished_at, overrun)
    SELECT s.request_id, key_id, model, endpoint, stream, prompt_tokens, completion_tokens,
           cost, cost_source, outcome, status_code, started_at, finished_at,
           greatest(s.cost - held.amount, 0)
    FROM s JOIN held ON held.request_id = s.request_id
), c AS (
    INSERT INTO ledger_charges (request_id, period_id, amount)
    SELECT request_id, period_id, cost FROM d
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
    manager (bench, 32 connections on one key: ~560 -> ~1850 req/s), and a statement over the
    whole batch writes each period once instead of once per step (PostgreSQL CPU per request
    0.23-0.25 -> 0.14-0.15 ms; +19-22 % requests/s). Batching across keys, not per key: with
    32 connections on 32 keys, per-key batches held one step each (~840 req/s, PostgreSQL CPU
    1.0 ms and the gateway's 0.76 ms per request: a planned statement and a round trip per
    step); one batch for all keys ~1900 req/s, 0.17 and 0.38 ms, as for one key.

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

    async def admit(self, req: AdmitRequest, now: datetime) -> AdmitResult:
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
            return AdmitResult(None, None, [])
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
        if not first["key_ok"]:
            return AdmitResult(key, None, [])
        if not first["current"]:
            expired = [
                (r["budget_id"], r["id"])
                for r in periods
                if r["period_end"] is not None and r["period_end"] <= now
            ]
            return AdmitResult(key, None, expired, retry=not expired)
        states = [PeriodState.from_row(r) for r in periods]
        if first["taken"] is None:
            refused = next(s for s in states if not s.fits(req.least))
            return AdmitResult(key, Admission(False, [refused], req.amount), [])
        return AdmitResult(key, Admission(True, states, first["taken"]), [])

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
