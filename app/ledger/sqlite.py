"""The hot ledger on SQLite (the contract: app/ledger/contract.py).

SQLite: the steps queued in the same event-loop turn make a batch, run in a `BEGIN IMMEDIATE`
transaction on a connection used from the event loop, with no thread hand-off (statements take
microseconds; the transaction never spans an await, so it never holds the lock while others
wait on us). It holds SQLite's write lock, so a batch's admits are decided in Python on each
key read once, with the one comparison (PeriodState.fits), and each period is written once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from app.budgets.state import BudgetRef, PeriodState, amount_to_reserve
from app.ledger.contract import (
    BATCH_STEPS,
    AdmitRequest,
    Admitted,
    BatchObserver,
    Decision,
    KeyContext,
    KeyRefused,
    Outcome,
    PeriodsExpired,
    Rejected,
    RequestInfo,
    key_refusal,
)


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
# What the pending entries among these requests hold, per period (their charges).
_SQLITE_HELD = """
SELECT c.request_id, c.period_id, c.amount
FROM ledger_charges c JOIN ledger_entries e ON e.request_id = c.request_id
WHERE c.request_id IN (SELECT value FROM json_each(?)) AND e.outcome = 'pending'
"""
# The request's ledger entry, pending until it settles (finished_at: its deadline), and its
# charges holding the reservation.
_SQLITE_INSERT_PENDING = """
INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost, cost_source,
                            outcome, started_at, finished_at, overrun)
VALUES (?, ?, ?, ?, ?, 0, 'none', 'pending', ?, ?, 0)
"""
_SQLITE_INSERT_CHARGE = """
INSERT INTO ledger_charges (request_id, period_id, amount) VALUES (?, ?, ?)
"""
_SQLITE_SETTLE_ENTRY = """
UPDATE ledger_entries
SET prompt_tokens = ?, completion_tokens = ?, cost = ?, cost_source = ?, outcome = ?,
    status_code = ?, finished_at = ?, overrun = ?
WHERE request_id = ? AND outcome = 'pending'
"""
_SQLITE_SETTLE_CHARGE = """
UPDATE ledger_charges SET amount = ? WHERE request_id = ? AND period_id = ?
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
) -> list[Decision]:
    """Admit requests in order, as if one by one: each is decided on the periods' money as the
    ones before it left it. The batch's transaction holds SQLite's write lock, so what it reads
    stays true until its commit: the keys are read once, in one query, the decisions are made
    here (the same comparison as everywhere: PeriodState.fits), and the periods are written
    once."""
    money: dict[int, PeriodState] = {}  # period id -> its money, with this batch's reservations
    keys = _sqlite_read_keys(conn, {req.key_hash for req, _ in steps}, money)
    held: dict[int, int] = {}  # period id -> what this batch reserved on it
    pending: list[tuple[Any, ...]] = []
    holds: list[tuple[str, int, int]] = []
    rejections: list[tuple[Any, ...]] = []
    results: list[Decision] = []
    for req, now in steps:
        found = keys.get(req.key_hash)
        if found is None:
            results.append(KeyRefused(None, "unknown"))
            continue
        key, periods = found
        refusal = key_refusal(key, now, req.model)
        if refusal is not None:
            results.append(KeyRefused(key, refusal))
            continue
        now_text = _sqlite_time(now)
        expired = [(r[6], r[8]) for r in periods if r[10] is not None and r[10] <= now_text]
        if expired:
            results.append(PeriodsExpired(key, expired))
            continue
        states = [money[r[8]] for r in periods]  # ascending period id
        take = amount_to_reserve(states, req.amount, req.min_amount)
        if take is None:
            refused = next(st for st in states if not st.fits(req.least))
            rejections.append(
                (req.request_id, key.id, req.model, req.endpoint, req.stream, None, None, 0)
                + ("none", "rejected", 429, _sqlite_time(req.started_at), now_text, 0)
            )
            results.append(Rejected(key, refused, req.amount))
            continue
        if states:
            pending.append(
                (req.request_id, key.id, req.model, req.endpoint, req.stream)
                + (_sqlite_time(req.started_at), _sqlite_time(req.expires_at))
            )
        after = []
        for st in states:
            money[st.period_id] = replace(st, reserved=st.reserved + take)
            after.append(money[st.period_id])
            held[st.period_id] = held.get(st.period_id, 0) + take
            holds.append((req.request_id, st.period_id, take))
        results.append(Admitted(key, after, take))
    for period_id in sorted(held):
        conn.execute(
            "UPDATE budget_periods SET reserved = reserved + ? WHERE id = ?",
            (held[period_id], period_id),
        )
    if pending:
        conn.executemany(_SQLITE_INSERT_PENDING, pending)
        conn.executemany(_SQLITE_INSERT_CHARGE, holds)
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
    """Settle requests: each pending entry becomes its outcome and its charges its cost, in
    place; the reservations they held are released and the costs charged, each period written
    once; every request gets its periods' state after the batch. None: nothing to settle (the
    sweeper recorded it abandoned already)."""
    ids = json.dumps([req.request_id for req, _, _ in steps])
    held: dict[str, list[tuple[int, int]]] = {}
    for request_id, period_id, amount in conn.execute(_SQLITE_HELD, (ids,)).fetchall():
        held.setdefault(request_id, []).append((period_id, amount))
    released: dict[int, int] = {}  # period id -> reservations released
    charged: dict[int, int] = {}  # period id -> cost charged
    entries: list[tuple[Any, ...]] = []
    charges: list[tuple[int, str, int]] = []
    settled: list[list[int] | None] = []
    for req, result, now in steps:
        mine = held.pop(req.request_id, None)  # (a request twice in a batch: settled once)
        if not mine:
            settled.append(None)
            continue
        for period_id, amount in mine:
            released[period_id] = released.get(period_id, 0) + amount
            charged[period_id] = charged.get(period_id, 0) + result.cost
            charges.append((result.cost, req.request_id, period_id))
        # The same amount is held in each period: the overrun is over that reservation (SPEC
        # 10), from what the ledger held, whatever the caller believes it reserved.
        overrun = max(result.cost - min(amount for _, amount in mine), 0)
        entries.append(
            (result.prompt_tokens, result.completion_tokens, result.cost, result.cost_source)
            + (result.outcome, result.status_code, _sqlite_time(now), overrun, req.request_id)
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
        conn.executemany(_SQLITE_SETTLE_ENTRY, entries)
        conn.executemany(_SQLITE_SETTLE_CHARGE, charges)
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
        self._observers: list[BatchObserver] = []

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
        # the end of the WAL, which then grows without bound (and throughput falls with it). RESTART holds writers off while it copies (our
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

    @property
    def queued_steps(self) -> int:
        return len(self._queue)

    def observe_batches(self, observer: BatchObserver) -> None:
        self._observers.append(observer)

    def submit(self, fn: Any, args: Any) -> asyncio.Future[Any]:
        """Run `fn(connection, [args, ...])` in the next batch's transaction, together with the
        other steps of the same `fn`; the future has its result once committed (admit and
        settle are the two such steps)."""
        loop = asyncio.get_running_loop()
        step = _SqliteStep(fn, args, loop.create_future(), loop.time() + self.BUSY_GIVE_UP_SECONDS)
        self._queue.append(step)
        if not self._flush_pending:
            # One loop turn later: the steps of the callbacks ready in this turn and of those
            # the next turn's I/O wakes join the batch (fuller batches, less CPU per request).
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
        for observe in self._observers:
            observe([_KINDS.get(step.fn, "other") for step in batch])
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

    async def admit(self, req: AdmitRequest, now: datetime) -> Decision:
        return await self.submit(_sqlite_admit, (req, now))  # type: ignore[no-any-return]

    def settle_soon(
        self, req: RequestInfo, result: Outcome, now: datetime
    ) -> asyncio.Future[list[PeriodState] | None]:
        return self.submit(_sqlite_settle, (req, result, now))

    async def close(self) -> None:
        if self._queue:
            self._flush()
        if self._checkpoint is not None:
            await self._checkpoint
        if self._conn is not None:
            self._conn.close()
            self._conn = None


_KINDS = {_sqlite_admit: "admit", _sqlite_settle: "settle"}
