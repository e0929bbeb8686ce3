"""Flight SQL with real clients over the whole real chain: ADBC / flightsql-dbapi -> control
plane (Flight SQL, TLS) -> mTLS tunnel -> worker -> warm pool -> hardened sandbox.

The unit tier covers the protocol over in-process runners; this proves it with containers: a
query, a 10M-row result arriving complete through DoGet, a client leaving a result early
freeing its sandbox, and the other Python Flight SQL client.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TypeVar

import docker
import flightsql
import pyarrow.compute as pc
import pytest
from flightsql import FlightSQLClient

from launcher.config import LauncherConfig
from tests.support.flight import adbc_connect, in_thread
from tests.support.flightchain import WAIT_S, chain
from tests.support.waiting import eventually

from .conftest import containers_of

pytestmark = pytest.mark.docker
T = TypeVar("T")
ROWS = 10_000_000


def test_adbc_queries_run_in_real_sandboxes(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with chain(config, tmp_path) as c:
            table = await in_thread(c.fetch, "SELECT 42 AS answer, 'ünï 🦆' AS name")
            assert table.to_pylist() == [{"answer": 42, "name": "ünï 🦆"}]
            with pytest.raises(Exception, match="Permission Error"):
                await in_thread(c.fetch, "SELECT * FROM read_text('/etc/passwd')")
            await eventually(
                lambda: len(c.records) == 2, "both queries ended on the worker", WAIT_S
            )
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 180))


def test_a_ten_million_row_result_arrives_complete(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with chain(config, tmp_path) as c:
            sql = f"SELECT i, i * 2 AS j FROM range({ROWS}) t(i)"
            table = await in_thread(c.fetch, sql)
            assert table.num_rows == ROWS
            assert pc.sum(table.column("i")).as_py() == ROWS * (ROWS - 1) // 2
            assert pc.sum(table.column("j")).as_py() == ROWS * (ROWS - 1)
            assert [r.outcome for r in c.records] == ["ok"]
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_leaving_a_result_early_frees_the_sandbox(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    """The client reads one batch of an endless result and closes the reader; the query is
    cancelled on the worker (its container destroyed) long before the 60 s statement timeout."""

    async def scenario() -> None:
        async with chain(config, tmp_path) as c:

            def one_batch_then_leave() -> int:
                with adbc_connect(c.control_plane, c.api_key) as conn, conn.cursor() as cursor:
                    cursor.execute("SELECT i FROM range(1000000000000) t(i)")
                    reader = cursor.fetch_record_batch()
                    rows = reader.read_next_batch().num_rows
                    reader.close()
                    return rows

            assert await in_thread(one_batch_then_leave) > 0
            # The record reaches on_finished before the executor settles its outcome.
            await eventually(
                lambda: [r.outcome for r in c.records] == ["cancelled"],
                "the query was cancelled",
                WAIT_S,
            )
            await eventually(
                lambda: not c.launcher.executor.running(), "the sandbox was freed", WAIT_S
            )
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 180))


def test_flightsql_dbapi_smoke(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with chain(config, tmp_path) as c:
            port = int(c.control_plane.location.rpartition(":")[2])
            ca_pem = c.control_plane.data.ca().cert_pem()

            def rows() -> list[tuple[object, ...]]:
                client = FlightSQLClient(
                    host="127.0.0.1", port=port, token=c.api_key, tls_root_certs=ca_pem
                )
                with flightsql.connect(client) as conn:
                    cursor = conn.cursor()
                    cursor.execute("SELECT 42 AS answer, count(*) AS n FROM range(1000)")
                    return [tuple(row) for row in cursor.fetchall()]

            assert await in_thread(rows) == [(42, 1000)]
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 180))


def test_parameters_and_updates_run_in_real_sandboxes(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    """Bound values reach DuckDB in the container as values (a quote stays data); an update
    answers its row count, and a SQL injection attempt in a parameter is just a string."""

    async def scenario() -> None:
        async with chain(config, tmp_path) as c:

            def with_parameters() -> tuple[list[tuple[object, ...]], int]:
                with adbc_connect(c.control_plane, c.api_key) as conn, conn.cursor() as cursor:
                    cursor.execute("SELECT ? + 1, ?::VARCHAR", (41, "x'); DROP TABLE t; --"))
                    found = cursor.fetchall()
                    cursor.execute("CREATE TEMP TABLE t AS SELECT * FROM range(?)", (7,))
                    return found, cursor.rowcount

            found, count = await in_thread(with_parameters)
            assert found == [(42, "x'); DROP TABLE t; --")]
            assert count == 7
            await eventually(
                lambda: len(c.records) == 2, "both statements ended on the worker", WAIT_S
            )
            assert [r.outcome for r in c.records] == ["ok", "ok"]
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 180))
