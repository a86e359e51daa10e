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

from app.budgets.state import (
    BudgetRef,
    PeriodState,
    amount_to_reserve,
    applies_to,
    overrun_of,
    refusing,
    unit_amount,
    unit_charge,
)
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


def _sqlite_time(when: datetime) -> str:
    # SQLAlchemy's SQLite DateTime storage format (naive UTC), so text order is time order.
    if when.tzinfo is not UTC:  # (the clock's times are UTC already: skip the conversion)
        when = when.astimezone(UTC)
    return when.isoformat(" ", "microseconds")[:26]  # without its "+00:00"


def _sqlite_parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


_SQLITE_KEYS = """
SELECT id, alias, key_prefix, status, models, expires_at, key_hash, shrink_to_fit, team_id,
       user_id
FROM api_keys WHERE key_hash IN ({})
"""
_SQLITE_TAGS = """
SELECT name, id FROM owners WHERE kind = 'tag' AND deleted_at IS NULL AND name IN ({})
"""
# Every budget of these owners in force, with its open period (and its owner's name).
_SQLITE_BUDGETS = """
SELECT b.owner_id, b.id, b.kind, b.unit, b.models, b.budget_duration, b.owner_kind, o.name,
       p.id, p.period_start, p.period_end, p.max_budget, p.spend, p.reserved
FROM budgets b
LEFT JOIN budget_periods p ON p.budget_id = b.id AND p.closed_at IS NULL
LEFT JOIN owners o ON o.id = b.owner_id
WHERE b.retired_at IS NULL AND b.owner_id IN ({})
"""
# What the pending entries among these requests hold, per period (their charges), and each
# period's unit.
_SQLITE_HELD = """
SELECT c.request_id, c.period_id, c.amount, b.unit
FROM ledger_charges c JOIN ledger_entries e ON e.request_id = c.request_id
JOIN budget_periods p ON p.id = c.period_id JOIN budgets b ON b.id = p.budget_id
WHERE c.request_id IN (SELECT value FROM json_each(?)) AND e.outcome = 'pending'
"""
# The request's ledger entry, pending until it settles (finished_at: its deadline), and its
# charges holding the reservation.
_SQLITE_INSERT_PENDING = """
INSERT INTO ledger_entries (request_id, key_id, model, endpoint, stream, cost, cost_source,
                            outcome, started_at, finished_at, overrun, team_id, user_id,
                            end_user_id, tags)
VALUES (?, ?, ?, ?, ?, 0, 'none', 'pending', ?, ?, 0, ?, ?, ?, ?)
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
                            started_at, finished_at, overrun, team_id, user_id, end_user_id,
                            tags)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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
    ones before it left it (keys of one team share its periods). The batch's transaction holds
    SQLite's write lock, so what it reads stays true until its commit: the keys and the
    budgets that may apply are read once, the decisions are made here (the same comparison as
    everywhere: PeriodState.fits), and each period is written once."""
    money: dict[int, PeriodState] = {}  # period id -> its money, with this batch's reservations
    reqs = [req for req, _ in steps]
    keys, budgets_of, tag_ids = _sqlite_read(conn, reqs, money)
    held: dict[int, int] = {}  # period id -> what this batch reserved on it
    pending: list[tuple[Any, ...]] = []
    holds: list[tuple[str, int, int]] = []
    rejections: list[tuple[Any, ...]] = []
    results: list[Decision] = []
    for req, now in steps:
        key = keys.get(req.key_hash)
        refusal = key_refusal(key, now, req.model)
        if key is None or refusal is not None:
            results.append(KeyRefused(key, refusal or "unknown"))
            continue
        owners = [key.id, key.team_id, key.user_id, req.end_user_id]
        owners += [tag_ids[t] for t in req.tags if t in tag_ids]
        rows = sorted(
            (
                r
                for owner in dict.fromkeys(o for o in owners if o is not None)
                for r in budgets_of.get(owner, ())
                if applies_to(json.loads(r[4]) if r[4] else None, req.model)
            ),
            key=lambda r: r[8] or 0,
        )
        if any(r[8] is None for r in rows):  # a budget between two periods: look again
            results.append(PeriodsChanged(key))
            continue
        now_text = _sqlite_time(now)
        expired = [(r[1], r[8]) for r in rows if r[10] is not None and r[10] <= now_text]
        if expired:
            results.append(PeriodsExpired(key, expired))
            continue
        states = [money[r[8]] for r in rows]  # ascending period id
        take = amount_to_reserve(states, req.amount, req.min_amount, req.tokens)
        info = _entry_scopes(key, req)
        if take is None:
            rejections.append(
                (req.request_id, key.id, req.model, req.endpoint, req.stream, None, None, 0)
                + ("none", "rejected", 429, _sqlite_time(req.started_at), now_text, 0)
                + info
            )
            results.append(Rejected(key, refusing(states, req.least, req.tokens), req.amount))
            continue
        if states:
            pending.append(
                (req.request_id, key.id, req.model, req.endpoint, req.stream)
                + (_sqlite_time(req.started_at), _sqlite_time(req.expires_at))
                + _entry_scopes(key, req)
            )
        after = []
        for st in states:
            amount = unit_amount(st.unit, take, req.tokens)
            money[st.period_id] = replace(st, reserved=st.reserved + amount)
            after.append(money[st.period_id])
            held[st.period_id] = held.get(st.period_id, 0) + amount
            holds.append((req.request_id, st.period_id, amount))
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


def _entry_scopes(
    team: KeyContext | RequestInfo, req: AdmitRequest | RequestInfo
) -> tuple[Any, ...]:
    """The ledger entry's team, user, end user and tags columns."""
    tags = json.dumps(list(req.tags)) if req.tags else None
    return (team.team_id, team.user_id, req.end_user_id, tags)


def _in(n: int) -> str:
    return ", ".join("?" * n)


def _sqlite_read(
    conn: sqlite3.Connection, reqs: list[AdmitRequest], money: dict[int, PeriodState]
) -> tuple[dict[str, KeyContext], dict[str, list[Any]], dict[str, str]]:
    """The keys among the requests' key hashes; the budgets in force of every owner the
    requests may be held by (rows by owner id, each with its open period); the tags' owner
    ids by name. The periods' money goes into `money`."""
    hashes = tuple({req.key_hash for req in reqs})
    keys: dict[str, KeyContext] = {}
    for r in conn.execute(_SQLITE_KEYS.format(_in(len(hashes))), hashes):
        keys[r[6]] = KeyContext(
            id=r[0],
            alias=r[1],
            key_prefix=r[2],
            status=r[3],
            models=json.loads(r[4]) if r[4] else [],
            expires_at=_sqlite_parse(r[5]),
            budgets=[],
            shrink_to_fit=None if r[7] is None else bool(r[7]),
            team_id=r[8],
            user_id=r[9],
        )
    tags = tuple({t for req in reqs for t in req.tags})
    tag_ids = dict(conn.execute(_SQLITE_TAGS.format(_in(len(tags))), tags)) if tags else {}
    owners = {o for k in keys.values() for o in (k.id, k.team_id, k.user_id) if o is not None}
    owners |= {req.end_user_id for req in reqs if req.end_user_id is not None}
    owners |= set(tag_ids.values())
    ids = tuple(owners)
    budgets_of: dict[str, list[Any]] = {}
    for r in conn.execute(_SQLITE_BUDGETS.format(_in(len(ids))), ids) if ids else ():
        budgets_of.setdefault(r[0], []).append(r)
        if r[8] is not None:
            state = _sqlite_state((r[1], r[8], r[9], r[10], r[11], r[12], r[13]))
            money[r[8]] = replace(state, unit=r[3], owner_kind=r[6], owner_name=r[7], window=r[5])
    for key_hash, key in keys.items():
        own = sorted(
            (r for r in budgets_of.get(key.id, ()) if r[8] is not None), key=lambda r: r[8]
        )
        keys[key_hash] = replace(
            key,
            budgets=[BudgetRef(r[1], r[2], r[8], _sqlite_parse(r[10])) for r in own],
        )
    return keys, budgets_of, tag_ids


def _sqlite_settle(
    conn: sqlite3.Connection, steps: list[tuple[RequestInfo, Outcome, datetime]]
) -> list[list[PeriodState] | None]:
    """Settle requests: each pending entry becomes its outcome and each of its charges what
    it is due in its period's unit (unit_charge), in place; the reservations they held are
    released, each period written once; every request gets its periods' state after the
    batch. None: nothing to settle (the sweeper recorded it abandoned already)."""
    ids = json.dumps([req.request_id for req, _, _ in steps])
    held: dict[str, list[tuple[int, int]]] = {}
    units: dict[int, str] = {}
    for request_id, period_id, amount, unit in conn.execute(_SQLITE_HELD, (ids,)).fetchall():
        held.setdefault(request_id, []).append((period_id, amount))
        units[period_id] = unit
    released: dict[int, int] = {}  # period id -> reservations released
    charged: dict[int, int] = {}  # period id -> charged, in its unit
    entries: list[tuple[Any, ...]] = []
    charges: list[tuple[int, str, int]] = []
    settled: list[list[int] | None] = []
    for req, result, now in steps:
        mine = held.pop(req.request_id, None)  # (a request twice in a batch: settled once)
        if not mine:
            settled.append(None)
            continue
        for period_id, amount in mine:
            charge = unit_charge(units[period_id], result.cost, result.tokens, amount)
            released[period_id] = released.get(period_id, 0) + amount
            charged[period_id] = charged.get(period_id, 0) + charge
            charges.append((charge, req.request_id, period_id))
        entries.append(
            (result.prompt_tokens, result.completion_tokens, result.cost, result.cost_source)
            + (result.outcome, result.status_code, _sqlite_time(now))
            + (overrun_of(result.cost, [(units[p], a) for p, a in mine]), req.request_id)
        )
        settled.append(sorted(period_id for period_id, _ in mine))
    states = {}
    for period_id in sorted(released):
        row = conn.execute(
            _SQLITE_SETTLE_PERIOD, (released[period_id], charged[period_id], period_id)
        ).fetchone()
        states[period_id] = replace(_sqlite_state(row), unit=units[period_id])
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
        # the end of the WAL, which then grows without bound (and throughput falls with it).
        # RESTART holds writers off while it copies (our transactions see SQLITE_BUSY and
        # retry after an asyncio.sleep) and lets the next writer start the WAL over. Its own
        # short-lived connection, in a thread.
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
