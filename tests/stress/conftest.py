"""Fixtures of the process-level stress scenarios: a throwaway PostgreSQL cluster, a fleet of
real `budgetgate serve` replicas (tests/procs.py), the size of the run (small by default,
larger with STRESS=1) and the figures table printed after each scenario in stress mode."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pgcluster import PgCluster, find_pg_bindir
from tests.procs import LOG_FILES, Fleet

STRESS = os.environ.get("STRESS", "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Size:
    name: str
    # a. concurrent admission: keys, room (requests that fit) per key, requests per key
    a_keys: int
    a_room: int
    a_per_key: int
    a_concurrency: int
    # b. short periods: keys, client workers per key, periods of 2 s to run through
    b_keys: int
    b_workers: int
    b_periods: int
    # c. admin changes seen by every replica: rounds, keys revoked, background workers
    c_rounds: int
    c_revoked: int
    c_background: int
    # d. PostgreSQL outage: client workers, seconds of outage, each replica's db_pool_size
    d_workers: int
    d_outage: float
    d_pool: int
    # e. gateway crash: slow streams open when the replica is killed
    e_streams: int


SMALL = Size("small", 4, 10, 50, 200, 3, 4, 3, 3, 3, 4, 24, 2.0, 5, 8)
LARGE = Size("stress", 12, 60, 200, 400, 8, 8, 6, 20, 12, 40, 120, 5.0, 20, 60)


@pytest.fixture(scope="session")
def size() -> Size:
    return LARGE if STRESS else SMALL


@pytest.fixture(scope="session")
def stress_pg() -> Iterator[PgCluster]:
    if find_pg_bindir() is None:  # the tests are also skipped by their module mark
        pytest.skip("no PostgreSQL server binaries installed")
    cluster = PgCluster()
    cluster.start()
    LOG_FILES.append(cluster.log_file)
    yield cluster
    cluster.cleanup()


def new_database(cluster: PgCluster) -> str:
    return cluster.create_database(f"stress_{uuid.uuid4().hex[:10]}")


@pytest.fixture(scope="module")
def fleet(stress_pg: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three replicas on one PostgreSQL ledger, the scheduler running every 0.5 s in each."""
    workdir = tmp_path_factory.mktemp("fleet")
    with Fleet(
        workdir,
        new_database(stress_pg),
        replicas=3,
        env={"BUDGETGATE_RESET_INTERVAL_SECONDS": "0.5"},
    ) as f:
        yield f


@pytest.fixture
def tmp_workdir(tmp_path: Path) -> Path:
    return tmp_path


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [f"\n== {title}", line]
    for n, row in enumerate(cells):
        out.append(
            " | ".join(c.rjust(w) if n else c.ljust(w) for c, w in zip(row, widths, strict=True))
        )
        if n == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0])))
    return str(value)


Figures = Callable[[str, Sequence[str], Sequence[Sequence[Any]]], None]


@pytest.fixture
def figures(capsys: pytest.CaptureFixture[str]) -> Figures:
    """figures(title, header, rows): printed at once in stress mode (STRESS=1)."""

    def show(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if STRESS:
            with capsys.disabled():
                print(format_table(title, header, rows), flush=True)

    return show
