"""The sandbox core against the real engine: round trip, isolation, limits, cancellation.

How each promise is checked is said in each test's docstring.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

from launcher.config import LauncherConfig
from launcher.errors import (
    MemoryLimitError,
    OverCapacityError,
    QueryCancelledError,
    QueryTimeoutError,
    ResultLimitError,
    SqlError,
)
from launcher.executor import collect_table
from launcher.host import LocalLauncher

from .conftest import containers_of, make_config, run, until_in_sandbox, with_launcher

pytestmark = pytest.mark.docker


def test_round_trip_streams_arrow(config: LauncherConfig) -> None:
    """A query's Arrow result arrives intact, types and all, over the runner's gRPC stream."""

    async def body(launcher: LocalLauncher) -> None:
        table = await collect_table(
            launcher.execute(
                "SELECT 42 AS answer, 'dück' AS name, [1, 2] AS xs, "
                "DATE '2026-11-21' AS day, NULL::DOUBLE AS nothing",
                policy="default",
            )
        )
        assert table.to_pylist()[0]["answer"] == 42
        assert table.to_pylist()[0]["name"] == "dück"
        assert table.to_pylist()[0]["xs"] == [1, 2]
        assert str(table.schema.field("day").type) == "date32[day]"
        big = await collect_table(launcher.execute("FROM range(1000000)", policy="default"))
        assert big.num_rows == 1_000_000
        assert big.column(0).to_pylist()[-1] == 999_999

    run(with_launcher(config, body))


def test_per_query_mode_gives_a_fresh_container_each_time(
    config: LauncherConfig, engine: docker.DockerClient
) -> None:
    """Query 2 runs in another container and cannot see query 1's temp table."""

    async def body(launcher: LocalLauncher) -> None:
        first = launcher.execute("CREATE TEMP TABLE secret AS SELECT 1 AS x", policy="default")
        await collect_table(first)
        second = launcher.execute("SELECT * FROM secret", policy="default")
        with pytest.raises(SqlError, match="secret does not exist"):
            await collect_table(second)
        assert first.record.sandbox != second.record.sandbox
        # Destruction is off the critical path: wait for the pool's background work.
        await launcher.pool_for(launcher.policies.get("default")).close()
        assert first.record.sandbox not in containers_of(engine, config.launcher_id)

    run(with_launcher(config, body))


def test_session_mode_keeps_temp_tables_until_close(config: LauncherConfig) -> None:
    """Queries of one session share a sandbox; a closed session's sandbox is gone."""

    async def body(launcher: LocalLauncher) -> None:
        session = await launcher.open_session("agent-session")
        sid = session.session_id
        await collect_table(
            launcher.execute("CREATE TEMP TABLE notes AS SELECT 7 AS n", session_id=sid)
        )
        table = await collect_table(launcher.execute("SELECT n FROM notes", session_id=sid))
        assert table.to_pylist() == [{"n": 7}]
        other = await launcher.open_session("agent-session")
        with pytest.raises(SqlError, match="notes does not exist"):
            await collect_table(
                launcher.execute("SELECT n FROM notes", session_id=other.session_id)
            )
        launcher.close_session(sid)
        with pytest.raises(Exception, match="has ended"):
            launcher.execute("SELECT 1", session_id=sid)

    run(with_launcher(config, body))


def test_memory_hungry_query_fails_cleanly(config: LauncherConfig) -> None:
    """Past the limits, the caller gets a memory error (DuckDB's, or the engine's OOM kill)."""

    async def body(launcher: LocalLauncher) -> None:
        execution = launcher.execute("SELECT length(repeat('x', 1500000000)) AS n", policy="tight")
        # DuckDB's own out-of-memory error and the engine's OOM kill both map to this.
        with pytest.raises(MemoryLimitError) as caught:
            await collect_table(execution)
        assert "memory" in str(caught.value).lower()
        # The launcher stays usable afterwards.
        table = await collect_table(launcher.execute("SELECT 1 AS ok", policy="tight"))
        assert table.to_pylist() == [{"ok": 1}]

    run(with_launcher(config, body))


def test_statement_timeout_ends_a_long_query(config: LauncherConfig) -> None:
    """Policy tight has a 2 s statement timeout; the runner interrupts DuckDB."""

    async def body(launcher: LocalLauncher) -> None:
        execution = launcher.execute(
            "SELECT sum(hash(range)) FROM range(100000000000)", policy="tight"
        )
        with pytest.raises(QueryTimeoutError, match="statement timeout") as caught:
            await collect_table(execution)
        # The runner's interrupt ended it, not the launcher's kill 5 s later.
        assert "killed by the launcher" not in str(caught.value)
        assert execution.record.total_s < 4

    run(with_launcher(config, body))


def test_hard_kill_when_the_runner_is_wedged(
    image: str, policies_dir: object, engine: docker.DockerClient
) -> None:
    """A frozen runner cannot honour its timeout: the launcher kills the container."""
    config = make_config(image, policies_dir, kill_grace_s=1)

    async def body(launcher: LocalLauncher) -> None:
        execution = launcher.execute("SELECT sleep_ms(60000)", policy="tight")
        task = asyncio.ensure_future(collect_table(execution))
        await until_in_sandbox(execution, task)
        engine.containers.get(execution.record.sandbox).pause()
        with pytest.raises(QueryTimeoutError, match="killed by the launcher"):
            await task

    run(with_launcher(config, body))


def test_cancellation_kills_the_sandbox(
    config: LauncherConfig, engine: docker.DockerClient
) -> None:
    """Executor.cancel ends a running query with QueryCancelledError and frees its sandbox."""

    async def body(launcher: LocalLauncher) -> None:
        execution = launcher.execute(
            "SELECT sum(hash(range)) FROM range(100000000000)", policy="default"
        )
        task = asyncio.ensure_future(collect_table(execution))
        await until_in_sandbox(execution, task)
        assert await launcher.executor.cancel(execution.query_id)
        with pytest.raises(QueryCancelledError):
            await task
        await launcher.pool_for(launcher.policies.get("default")).close()
        assert execution.record.sandbox not in containers_of(engine, config.launcher_id)

    run(with_launcher(config, body))


def test_result_limit_is_enforced(config: LauncherConfig) -> None:
    async def body(launcher: LocalLauncher) -> None:
        with pytest.raises(ResultLimitError, match="max_result_rows"):
            await collect_table(launcher.execute("FROM range(1000000)", policy="tight"))

    run(with_launcher(config, body))


def test_over_capacity_after_the_queue_wait(image: str, policies_dir: object) -> None:
    """With one slot held by a long query, the next query waits, then gets a clear error."""
    config = make_config(image, policies_dir, max_sandboxes=1, queue_timeout_s=1)

    async def body(launcher: LocalLauncher) -> None:
        await launcher.warm("tight")
        holder = launcher.execute("SELECT sleep_ms(1500)", policy="tight")
        task = asyncio.ensure_future(collect_table(holder))
        await until_in_sandbox(holder, task)
        with pytest.raises(OverCapacityError, match="over capacity"):
            await collect_table(launcher.execute("SELECT 1", policy="tight"))
        await task

    # The one slot holds a warm sandbox, so the holder starts at once.
    run(with_launcher(config, body, warm=1))


HOSTILE = [
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ("SELECT * FROM read_text('/proc/self/environ')", "Permission Error"),
    ("INSTALL httpfs", "INSTALL and LOAD are not allowed"),
    ("LOAD httpfs", "INSTALL and LOAD are not allowed"),
    ("SET enable_external_access = true", "configuration has been locked"),
    ("SET memory_limit = '100GB'", "configuration has been locked"),
    ("ATTACH '/scratch/x.db' AS x", "ATTACH is not allowed"),
    # A sandbox may touch only /scratch and the files of its query's tables: the shared cache
    # can be neither listed nor written (its read-only mount is proven in test_hardening.py).
    ("COPY (SELECT 1) TO '/cache/x.csv'", "Permission Error"),
    ("SELECT * FROM glob('/cache/*')", "Permission Error"),
    ("SELECT * FROM read_parquet('/cache/*.parquet')", "Permission Error"),
    ("COPY (SELECT 1) TO '/tmp/x.csv'", "Permission Error"),
    ("SELECT * FROM glob('/*')", "Permission Error"),
]


def test_hostile_sql_is_refused_in_a_real_sandbox(
    image: str, policies_dir: Path, tmp_path: Path
) -> None:
    """Every probe fails with a specific message, inside a real container (one each).

    A cache directory the sandbox user could write to is mounted, so the /cache probes are
    refused by DuckDB's lock, not by file permissions.
    """
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    config = make_config(image, policies_dir, cache_dir=cache)

    async def body(launcher: LocalLauncher) -> None:
        for sql, message in HOSTILE:
            with pytest.raises(SqlError, match=message):
                await collect_table(launcher.execute(sql, policy="default"))
        # Writing to /scratch is the one place a query may write.
        table = await collect_table(
            launcher.execute("COPY (SELECT 1) TO '/scratch/ok.csv'", policy="default")
        )
        assert table.num_rows == 1

    run(with_launcher(config, body, warm=2))
