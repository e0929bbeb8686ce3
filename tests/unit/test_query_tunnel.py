"""A query's whole path on loopback: client -> control plane -> tunnel -> worker -> executor.

Real TLS for the client, real mutual TLS for the tunnel, and the worker's queries run by the
real executor over FakeBackend (real runners, real DuckDB; no Docker). The control plane runs on
its own event loop in a thread (``tests.support.controlplane``); worker and client share the
test's loop. Every wait has a deadline, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pyarrow.compute as pc
import pytest

from launcher.cli.main import main
from launcher.client import ControlPlaneClient
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.errors import (
    ApiKeyError,
    MemoryLimitError,
    QueryCancelledError,
    QueryTimeoutError,
    SqlError,
    WorkerUnavailableError,
)
from launcher.protocol import controlplane_pb2 as pb
from launcher.sandbox.backend.base import SandboxHandle
from tests.support.controlplane import DEADLINE_S, ControlPlane
from tests.support.querystack import LONG_SQL, POLICY, Stack, raw_run, stack
from tests.support.waiting import eventually, run


def test_a_query_round_trips_through_the_tunnel(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            table = await s.client.table("SELECT i, i * 2 AS j FROM range(5) t(i) ORDER BY i")
            assert table.column_names == ["i", "j"]
            assert table.column("i").to_pylist() == [0, 1, 2, 3, 4]
            assert table.column("j").to_pylist() == [0, 2, 4, 6, 8]
            assert [r.outcome for r in s.records] == ["ok"]

    run(scenario)


def test_a_sql_error_reaches_the_client_with_duckdbs_message(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            with pytest.raises(SqlError, match="no_such_table"):
                await s.client.table("SELECT * FROM no_such_table")
            bearer = (("authorization", f"Bearer {s.api_key}"),)
            error = await raw_run(s, bearer, "SELEC 1")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "syntax error" in (error.details() or "")

    run(scenario)


def test_a_wrong_or_missing_api_key_is_unauthenticated(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            key_id = s.api_key.split(".")[1]
            wrong = f"dck1.{key_id}.{'x' * 43}"
            async with ControlPlaneClient(s.address, wrong, s.ca_pem()) as intruder:
                with pytest.raises(ApiKeyError, match="unknown API key"):
                    await intruder.table("SELECT 1")
            for metadata in [(), (("authorization", "Bearer nonsense"),)]:
                error = await raw_run(s, metadata, "SELECT 1")
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert s.records == []  # nothing reached the worker

    run(scenario)


def test_no_worker_online_is_unavailable(control_plane: ControlPlane, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, worker=False) as s:
            with pytest.raises(WorkerUnavailableError, match="no worker online"):
                await s.client.table("SELECT 1")
            error = await raw_run(s, (("authorization", f"Bearer {s.api_key}"),), "SELECT 1")
            assert error.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario)


def test_a_worker_stopping_mid_query_fails_the_query_instead_of_hanging(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            query = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S))
            await s.until_running()
            assert s.worker is not None
            s.worker.stop()
            with pytest.raises(WorkerUnavailableError, match="disconnected during the query"):
                await asyncio.wait_for(query, DEADLINE_S)
            await eventually(lambda: len(s.records) == 1, "the worker ended its query")
            assert s.records[0].outcome == "cancelled"

    run(scenario)


def test_a_client_cancel_cancels_the_query_on_the_worker(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            query = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S))
            await s.until_running()
            query.cancel()
            await eventually(lambda: len(s.records) == 1, "the worker ended its query")
            assert s.records[0].outcome == "cancelled"
            assert s.host.executor.running() == []
            # The tunnel is still up and serves the next query.
            assert (await s.client.table("SELECT 42 AS x")).column("x").to_pylist() == [42]

    run(scenario)


def test_twenty_concurrent_queries_share_one_tunnel(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            sqls = [
                f"SELECT {n} AS n, count(*) AS c FROM range({n * 1000}) t(i)" for n in range(20)
            ]
            tables = await asyncio.gather(*(s.client.table(sql) for sql in sqls))
            for n, table in enumerate(tables):
                assert table.to_pylist() == [{"n": n, "c": n * 1000}]
            assert len(s.records) == 20 and {r.outcome for r in s.records} == {"ok"}
            worker = s.worker
            assert worker is not None
            # The client has its outcome before the worker's task ends (it still awaits the
            # PushResults acknowledgement): wait for the count, with a deadline.
            await eventually(lambda: worker.running_queries == 0, "the worker's tasks ended")

    run(scenario)


def test_fifty_concurrent_queries_through_one_tunnel_all_complete_correctly(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Issue 3 promise: 50 concurrent queries through one tunnel all complete, each with its
    own correct result (no result crossed to another query, none lost or stalled)."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path, capacity=50) as s:
            sqls = [
                f"SELECT {n} AS n, count(*) AS c, sum(i) AS s FROM range({n * 100}) t(i)"
                for n in range(50)
            ]
            tables = await asyncio.gather(
                *(s.client.table(sql, timeout_s=DEADLINE_S * 2) for sql in sqls)
            )
            for n, table in enumerate(tables):
                total = n * 100 * (n * 100 - 1) // 2 if n else None
                assert table.to_pylist() == [{"n": n, "c": n * 100, "s": total}]
            assert len(s.records) == 50 and {r.outcome for r in s.records} == {"ok"}
            assert s.worker is not None and s.worker.connections == 1
            worker = s.worker
            await eventually(lambda: worker.running_queries == 0, "the worker's tasks ended")

    run(scenario)


def test_a_query_succeeds_after_the_control_plane_restarts_while_the_worker_is_idle(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Issue 3 promise: kill the control plane and restart it on the same ports; the worker
    reconnects by itself (no restart, same identity) and the next query runs on it."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            assert s.worker is not None
            worker = s.worker
            assert (await s.client.table("SELECT 1 AS x")).column("x").to_pylist() == [1]
            address = s.address
            await control_plane.stop()
            await eventually(lambda: not worker.connected.is_set(), "the tunnel dropped")
            await control_plane.start()
            assert s.address == address  # same ports
            await eventually(lambda: worker.connections == 2, "the worker reconnected")
            async with ControlPlaneClient(s.address, s.api_key, s.ca_pem()) as client:
                table = await client.table("SELECT 2 AS x", timeout_s=DEADLINE_S)
            assert table.column("x").to_pylist() == [2]
            assert [r.outcome for r in s.records] == ["ok", "ok"]

    run(scenario)


def test_a_million_row_result_arrives_complete(control_plane: ControlPlane, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            table = await s.client.table("SELECT i FROM range(1000000) t(i)")
            assert table.num_rows == 1_000_000
            assert pc.sum(table.column("i")).as_py() == 999_999 * 1_000_000 // 2

    run(scenario)


def test_a_small_result_rides_inline_and_a_large_one_gets_its_own_call(tmp_path: Path) -> None:
    """Checked on the control plane's side of the wire: what the worker sent it."""
    seen: list[object] = []
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"), observe=seen.append)

    def inline_results() -> int:
        return sum(isinstance(m, pb.WorkerMessage) and m.HasField("result") for m in seen)

    def pushed_chunks() -> int:
        return sum(isinstance(m, pb.ResultChunk) for m in seen)

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            small = await s.client.table("SELECT 42 AS answer")
            assert small.column("answer").to_pylist() == [42]
            assert (inline_results(), pushed_chunks()) == (1, 0)
            failed = s.client.table("SELECT * FROM no_such_table")
            with pytest.raises(SqlError, match="no_such_table"):
                await failed
            assert (inline_results(), pushed_chunks()) == (2, 0)
            big = await s.client.table("SELECT i FROM range(100000) t(i)")  # ~800 KB of IPC
            assert pc.sum(big.column("i")).as_py() == 99_999 * 100_000 // 2
            assert inline_results() == 2
            # query id, what was held back as one piece, the rest, the outcome
            assert pushed_chunks() >= 4

    try:
        run(scenario)
    finally:
        control_plane.close()


def remote_flags(s: Stack, key: str, tmp_path: Path) -> list[str]:
    """`duckcell query`'s flags for this stack's control plane (its CA written to a file)."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(s.ca_pem())
    return ["--control-plane", s.address, "--api-key", key, "--ca-file", str(ca_file)]


def test_the_cli_runs_a_query_through_the_control_plane(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            data = str(control_plane.data.root)
            assert main(["controlplane", "apikey", "create", "--data", data, "--role", "bi"]) == 0
            key = capsys.readouterr().out.strip()
            assert key.startswith("dck1.") and "\n" not in key
            remote = remote_flags(s, key, tmp_path)
            argv = ["-q", "query", *remote, "--format", "csv", "SELECT 7 AS answer"]
            assert await asyncio.to_thread(main, argv) == 0
            assert capsys.readouterr().out.split() == ['"answer"', "7"]
            argv = ["-q", "query", *remote, "SELECT * FROM no_such_table"]
            assert await asyncio.to_thread(main, argv) == 1
            assert "no_such_table" in capsys.readouterr().err

    run(scenario)


def test_the_cli_leaves_the_policy_to_the_role_unless_given_one(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A role that fixes its policy: the CLI without --policy runs under it (it used to ask
    for `default` and was refused); asking for another is refused by the control plane."""
    catalog = tmp_path / "roles.yaml"
    catalog.write_text("roles:\n  bi: {policy: bi-policy}\n")
    apply_catalog(control_plane.data.root, catalog)
    worker_policy = POLICY.replace("name: default", "name: bi-policy")

    async def scenario() -> None:
        async with stack(control_plane, tmp_path, policy=worker_policy) as s:
            key = control_plane.data.api_keys().create("bi")
            remote = remote_flags(s, key, tmp_path)
            argv = ["-q", "query", *remote, "--format", "csv", "SELECT 7 AS answer"]
            assert await asyncio.to_thread(main, argv) == 0
            assert capsys.readouterr().out.split() == ['"answer"', "7"]
            assert [r.policy for r in s.records] == ["bi-policy"]
            argv = ["-q", "query", *remote, "--policy", "default", "SELECT 1"]
            assert await asyncio.to_thread(main, argv) == 1
            assert "may not choose policy 'default'" in capsys.readouterr().err

    run(scenario)


def test_the_cli_exits_1_when_the_worker_is_lost_during_the_query(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's exit codes: a worker lost is the query's failure (1), like a lost
    sandbox; it used to exit 2."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            argv = ["-q", "query", *remote_flags(s, s.api_key, tmp_path), LONG_SQL]
            cli = asyncio.create_task(asyncio.to_thread(main, argv))
            await s.until_running()
            assert s.worker is not None
            s.worker.stop()
            assert await asyncio.wait_for(cli, DEADLINE_S) == 1
            # One line of the CLI's (the in-process worker's runners write to stderr too).
            err = capsys.readouterr().err.splitlines()
            (line,) = [line for line in err if line.startswith("duckcell:")]
            assert line.startswith("duckcell: error: worker") and "disconnected during" in line

    run(scenario)


def test_the_cli_exits_1_without_a_worker_and_2_without_a_control_plane(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No worker online: the control plane took the query and could not run it (1). No control
    plane answering: nothing says anything about the query (2)."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path, worker=False) as s:
            argv = ["-q", "query", *remote_flags(s, s.api_key, tmp_path), "SELECT 1"]
            assert await asyncio.to_thread(main, argv) == 1
            assert "no worker online" in capsys.readouterr().err
            await control_plane.stop()
            assert await asyncio.to_thread(main, argv) == 2
            err = capsys.readouterr().err
            assert "no answer from the control plane at" in err and err.count("\n") == 1

    run(scenario)


def test_a_statement_with_a_nul_byte_is_refused_before_the_router(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Without a worker: a statement that got past the check would fail "no worker online"."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path, worker=False) as s:
            error = await raw_run(s, (("authorization", f"Bearer {s.api_key}"),), "SELECT 'a\0b'")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (error.details() or "").startswith(
                "the statement contains a NUL byte (offset 9)"
            )
            with pytest.raises(SqlError, match="NUL byte"):
                await s.client.table("SELECT 1\0")

    run(scenario)


# Only one sandbox at a time (no warm pool) and no statement timeout in the way.
ONE_SANDBOX = POLICY.replace("statement_timeout: 2s", "statement_timeout: 60s").replace(
    "warm: 2", "warm: 0"
)


def test_a_statement_timeout_reaches_the_client_as_query_timeout_error(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:  # POLICY: 2 s statement timeout
            with pytest.raises(QueryTimeoutError):
                await s.client.table(LONG_SQL, timeout_s=DEADLINE_S)
            assert [r.outcome for r in s.records] == ["timeout"]

    run(scenario)


def test_a_memory_kill_reaches_the_client_as_memory_limit_error(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, policy=ONE_SANDBOX) as s:
            query = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S))
            pool = s.host.pool_for(s.host.policies.get("default"))
            await eventually(
                lambda: pool.stats()["busy"] == 1,
                "the query has its sandbox",
            )
            # What the engine reports after the kernel's OOM killer ended the container.
            ((container_id, container),) = s.backend.containers.items()
            container.oom_killed = True
            await s.backend.kill(SandboxHandle(container_id, container.spec.name, ""))
            with pytest.raises(MemoryLimitError, match="memory limit of 512 MiB"):
                await asyncio.wait_for(query, DEADLINE_S)

    run(scenario)


def test_a_cancel_on_the_worker_reaches_the_client_as_query_cancelled_error(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, policy=ONE_SANDBOX) as s:
            query = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S))
            await s.until_running()
            (query_id,) = s.host.executor.running()
            assert await s.host.executor.cancel(query_id)
            with pytest.raises(QueryCancelledError, match="cancelled"):
                await asyncio.wait_for(query, DEADLINE_S)

    run(scenario)
