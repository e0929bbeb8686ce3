"""A statement over the size limit is refused first at every entry, with one clear line: the
CLI (exit 1), the control plane's Query service and Flight SQL (INVALID_ARGUMENT), and the
worker's tunnel (whatever its control plane let through)."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import adbc_driver_manager
import grpc
import pytest

from launcher.cli.main import main
from launcher.controlplane.datadir import ControlPlaneData
from launcher.model.sql import MAX_STATEMENT_BYTES
from launcher.protocol import controlplane_pb2 as pb
from launcher.worker.audit import QueryOpening, WorkerAuditRecord
from launcher.worker.queries import QueryTasks, RunStats
from tests.support.controlplane import DEADLINE_S, ControlPlane
from tests.support.flightstack import FlightStack, write_catalog
from tests.support.querystack import raw_run, stack

# 1.2 MB of IN list: over the 1 MiB limit, and a size DuckDB's parser would take seconds for.
OVERSIZED = "SELECT * FROM trips WHERE id IN (" + ",".join(["123456"] * 170_000) + ")"
LIMIT_SAYS = "the statement is 1.2 MB (1,190,033 bytes); the limit is 1 MiB (1,048,576 bytes)"


def test_the_limit_is_one_mib_and_the_oversized_statement_is_over_it() -> None:
    assert MAX_STATEMENT_BYTES == 2**20
    assert len(OVERSIZED.encode()) == 1_190_033


def test_the_cli_refuses_it_with_exit_code_1_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    assert main([*state, "query", OVERSIZED]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"duckcell: error: {LIMIT_SAYS}") and err.count("\n") == 1
    monkeypatch.setattr("sys.stdin", io.StringIO(OVERSIZED))
    remote = ["--control-plane", "localhost:1", "--api-key", "dck1.x.y"]
    assert main([*state, "query", *remote, "-"]) == 1  # never dials
    assert LIMIT_SAYS in capsys.readouterr().err


def test_the_query_service_refuses_it_as_invalid_argument(tmp_path: Path) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            error = await raw_run(s, (("authorization", f"Bearer {s.api_key}"),), OVERSIZED)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert LIMIT_SAYS in (error.details() or "")
            assert s.records == []  # nothing reached the worker
            table = await s.client.table("SELECT 42 AS answer")
            assert table.to_pylist() == [{"answer": 42}]

    try:
        asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    finally:
        control_plane.close()


def test_flight_sql_refuses_it_as_invalid_argument(tmp_path: Path) -> None:
    flight = FlightStack(tmp_path, write_catalog(tmp_path))
    try:
        with flight.connect("analyst") as conn, conn.cursor() as cursor:
            invalid = adbc_driver_manager.ProgrammingError
            with pytest.raises(invalid, match=re.escape(LIMIT_SAYS)) as refused:
                cursor.execute(OVERSIZED)
            assert refused.value.status_code == adbc_driver_manager.AdbcStatusCode.INVALID_ARGUMENT
            cursor.execute("SELECT 42 AS answer")
            assert cursor.fetchall() == [(42,)]
        assert all(call.sql != OVERSIZED for call in flight.router.calls)
    finally:
        flight.close()


def test_the_worker_refuses_it_even_when_its_control_plane_let_it_through() -> None:
    async def scenario() -> None:
        runner, audit, sent = _Runner(), _Audit(), list[pb.WorkerMessage]()

        async def send(message: pb.WorkerMessage) -> bool:
            sent.append(message)
            return True

        tasks = QueryTasks(runner, None, audit=audit, send=send)  # type: ignore[arg-type]
        tasks.start(pb.RunQuery(query_id="q", sql=OVERSIZED))
        await asyncio.wait_for(audit.written.wait(), DEADLINE_S)
        (outcome,) = [m.result.outcome for m in sent if m.result.HasField("outcome")]
        assert (outcome.ok, outcome.reason) == (False, "sql")
        assert LIMIT_SAYS in outcome.message
        assert runner.ran == []

    asyncio.run(scenario())


class _Runner:
    def __init__(self) -> None:
        self.ran: list[str] = []

    async def run(
        self, query_id: str, sql: str, policy: str, **kwargs: object
    ) -> AsyncIterator[bytes]:
        self.ran.append(sql)
        yield b""

    async def cancel(self, query_id: str) -> None:
        return None

    def stats(self, query_id: str) -> RunStats:
        return RunStats()


class _Audit:
    def __init__(self) -> None:
        self.written = asyncio.Event()
        self.records: list[WorkerAuditRecord] = []

    async def open(self, opening: QueryOpening) -> None:
        return None

    def write(self, record: WorkerAuditRecord) -> None:
        self.records.append(record)
        self.written.set()
