"""SQLite group commit (app/ledger/contract.py): steps queued in one event-loop turn share a
transaction (the steps of one kind in one call); when one fails, the batch runs again with each
step alone in a savepoint, so one step's failure undoes only that step."""

import asyncio
import sqlite3
from pathlib import Path

import pytest

from app.ledger.sqlite import SqliteHotLedger


def scratch_db(tmp_path: Path) -> str:
    path = str(tmp_path / "g.db")
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (x INTEGER)")
    setup.commit()
    setup.close()
    return path


async def test_a_failing_step_leaves_its_batch_mates_committed(tmp_path: Path) -> None:
    path = scratch_db(tmp_path)
    ledger = SqliteHotLedger(path, "normal")
    batches: list[list[str]] = []
    ledger.observe_batches(batches.append)

    calls: list[list[int]] = []

    def insert(conn: sqlite3.Connection, xs: list[int]) -> list[int]:
        calls.append(xs)
        for x in xs:
            conn.execute("INSERT INTO t VALUES (?)", (x,))
            if x == 2:
                raise ValueError("step failed after writing")
        return xs

    results = await asyncio.gather(
        ledger.submit(insert, 1),
        ledger.submit(insert, 2),
        ledger.submit(insert, 3),
        return_exceptions=True,
    )
    await ledger.close()
    assert batches == [["other"] * 3]  # one transaction for the three steps
    assert calls == [[1, 2, 3], [1], [2], [3]]  # together; after the failure one by one
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError)
    check = sqlite3.connect(path)
    assert [r[0] for r in check.execute("SELECT x FROM t ORDER BY x")] == [1, 3]
    check.close()


async def test_a_lone_failing_step_writes_nothing(tmp_path: Path) -> None:
    path = scratch_db(tmp_path)
    ledger = SqliteHotLedger(path, "normal")

    def insert_then_fail(conn: sqlite3.Connection, xs: list[int]) -> list[int]:
        conn.execute("INSERT INTO t VALUES (?)", (xs[0],))
        raise ValueError("boom")

    with pytest.raises(ValueError):
        await ledger.submit(insert_then_fail, 7)
    await ledger.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    check.close()
