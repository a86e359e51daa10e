"""Tests for the throwaway PostgreSQL cluster helper used by the postgres fixtures."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from tests.pgcluster import PgCluster, find_pg_bindir

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        find_pg_bindir() is None,
        reason="PostgreSQL server binaries not found ($BUDGETGATE_PG_BINDIR if set, else "
        "/usr/lib/postgresql/*/bin or initdb on PATH); install the 'postgresql' package",
    ),
]


def _dsn(url: str) -> str:
    # asyncpg wants postgresql://, the app wants postgresql+asyncpg://
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _select_one(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        return int(await conn.fetchval("select 1"))
    finally:
        await conn.close()


async def _current_database(url: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        return str(await conn.fetchval("select current_database()"))
    finally:
        await conn.close()


def test_cluster_lifecycle() -> None:
    cluster = PgCluster()
    try:
        cluster.start()
        assert cluster.is_running()

        url_a = cluster.create_database("pgc_alpha")
        url_b = cluster.create_database("pgc_beta")
        assert url_a == f"postgresql+asyncpg://postgres@127.0.0.1:{cluster.port}/pgc_alpha"
        assert url_b == cluster.url("pgc_beta")

        assert asyncio.run(_select_one(url_a)) == 1
        assert asyncio.run(_select_one(url_b)) == 1
        assert asyncio.run(_current_database(url_b)) == "pgc_beta"

        # fast settings are in effect
        assert cluster.psql("show fsync").strip() == "off"
        assert cluster.psql("show max_connections").strip() == "300"

        cluster.stop()
        cluster.stop()  # idempotent
        assert not cluster.is_running()
        with pytest.raises((OSError, asyncio.TimeoutError)):
            asyncio.run(_select_one(url_a))

        cluster.start()
        assert asyncio.run(_select_one(url_a)) == 1  # data survived the restart

        cluster.restart()
        assert asyncio.run(_select_one(url_b)) == 1

        # drop while a connection is open (WITH (FORCE) / terminate first)
        async def drop_with_open_conn() -> None:
            import asyncpg

            conn = await asyncpg.connect(_dsn(url_b), timeout=5)
            try:
                await asyncio.to_thread(cluster.drop_database, "pgc_beta")
            finally:
                conn.terminate()

        asyncio.run(drop_with_open_conn())
        cluster.drop_database("pgc_beta")  # IF EXISTS
        with pytest.raises(Exception, match="pgc_beta"):
            asyncio.run(_select_one(url_b))

        cluster.stop("immediate")
        assert not cluster.is_running()
        cluster.start()
        assert asyncio.run(_select_one(url_a)) == 1
    finally:
        cluster.cleanup()
    cluster.cleanup()  # idempotent
    assert not os.path.exists(cluster.base_dir)


def test_start_failure_reports_server_log() -> None:
    # occupy a port so the postmaster cannot bind it
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        cluster = PgCluster(port=port)
        try:
            with pytest.raises(RuntimeError, match="server log tail") as excinfo:
                cluster.start(timeout=20)
            assert "could not" in str(excinfo.value).lower()
        finally:
            cluster.cleanup()
