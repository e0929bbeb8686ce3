"""Both audit logs, over the whole path: the control plane's SQLite table and the worker's
JSON-lines file, one record per query however it ended (ok, SQL error, client gone, worker
lost, no worker online). The stack is test_query_tunnel's: real TLS, real runners, no Docker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.controlplane.audit import (
    AuditLog,
    AuditRecord,
    QueryTrail,
    format_records,
    prune_forever,
)
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.relay import end_trail, outcome_end
from launcher.controlplane.store import MIGRATIONS, open_database
from launcher.errors import SqlError, WorkerUnavailableError
from launcher.protocol import controlplane_pb2 as pb
from launcher.worker.audit import AUDIT_FILE, WorkerAuditLog, WorkerAuditRecord, read_audit
from tests.support.controlplane import DEADLINE_S, ControlPlane
from tests.support.querystack import LONG_SQL, stack
from tests.support.waiting import eventually, run

OK_SQL = "SELECT i FROM range(3) t(i)"


def audit_of(control_plane: ControlPlane) -> list[AuditRecord]:
    """The control plane's audit, oldest first, read through a connection of our own."""
    return list(reversed(AuditLog(control_plane.data.database()).recent(100)))


def test_every_query_gets_one_record_on_each_side_however_it_ends(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            await s.client.table(OK_SQL)
            # Written before the client saw the end of its stream: already there on return.
            assert [r.outcome for r in audit_of(control_plane)] == ["ok"]
            with pytest.raises(SqlError):
                await s.client.table("SELECT * FROM no_such_table")
            assert [r.reason for r in audit_of(control_plane)] == ["", "sql"]

            query = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S))
            await s.until_running()
            query.cancel()
            await eventually(lambda: len(s.records) == 3, "the worker ended the cancelled query")
            await eventually(lambda: len(audit_of(control_plane)) == 3, "the cancel is audited")

        key_id = s.api_key.split(".")[1]
        ok, failed, cancelled = audit_of(control_plane)
        assert ok.caller == f"{key_id}/analyst" and ok.sql == OK_SQL and ok.rows == 3
        assert ok.sql_sha256 == hashlib.sha256(OK_SQL.encode()).hexdigest()
        # The client named no policy; the worker says which one that meant.
        assert ok.bytes > 0 and ok.sandbox and ok.run_s > 0 and ok.policy == "default"
        assert ok.worker_id.startswith("wkr-") and ok.finished_at >= ok.started_at
        assert failed.outcome == "error" and "no_such_table" in failed.message
        assert (cancelled.outcome, cancelled.reason) == ("cancelled", "client_gone")

        lines = read_audit(tmp_path / "worker" / AUDIT_FILE)
        assert [line["query_id"] for line in lines] == [r.query_id for r in (ok, failed, cancelled)]
        assert [(line["outcome"], line["reason"]) for line in lines] == [
            ("ok", ""),
            ("error", "sql"),
            ("error", "cancelled"),
        ]
        first = lines[0]
        assert first["sql"] == OK_SQL and first["sql_sha256"] == ok.sql_sha256
        assert first["sandbox"] == ok.sandbox and first["rows"] == 3
        assert first["bytes"] == ok.bytes and first["policy"] == "default"

    run(scenario)


def test_no_worker_online_is_audited(control_plane: ControlPlane, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, worker=False) as s:
            with pytest.raises(WorkerUnavailableError):
                await s.client.table("SELECT 1")
            (record,) = audit_of(control_plane)
            assert (record.outcome, record.reason, record.worker_id) == ("error", "no_worker", "")

    run(scenario)


def test_a_lost_worker_is_audited_on_both_sides(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            query = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S))
            await s.until_running()
            assert s.worker is not None
            s.worker.stop()
            with pytest.raises(WorkerUnavailableError):
                await query
            record = audit_of(control_plane)[-1]
            assert (record.outcome, record.reason) == ("error", "worker_lost")
            assert record.worker_id.startswith("wkr-") and "disconnected" in record.message
            # The worker wrote its own line too: its query was cancelled with the tunnel.
            await eventually(
                lambda: len(read_audit(tmp_path / "worker" / AUDIT_FILE)) == 1,
                "the worker audited the query it lost",
            )

    run(scenario)


def test_the_cli_lists_recent_records_as_a_table_or_json(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            for n in range(3):
                await s.client.table(f"SELECT {n} AS n")

    run(scenario)
    data = str(control_plane.data.root)
    assert main(["controlplane", "audit", "--data", data, "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("STARTED (UTC)") and len(lines) == 3
    assert "SELECT 2 AS n" in lines[1] and "SELECT 1 AS n" in lines[2]  # newest first
    assert main(["controlplane", "audit", "--data", data, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["sql"] for r in records] == ["SELECT 2 AS n", "SELECT 1 AS n", "SELECT 0 AS n"]
    assert {r["outcome"] for r in records} == {"ok"} and all(r["rows"] == 1 for r in records)


def test_a_trail_is_written_once_with_the_control_planes_timings_by_default() -> None:
    written: list[AuditRecord] = []
    now = iter([100.0, 102.5, 200.0])

    class Sink:
        def write(self, record: AuditRecord) -> None:
            written.append(record)

    trail = QueryTrail(
        Sink(), query_id="q1", caller="k/r", sql="SELECT 1", policy="p", clock=lambda: next(now)
    )
    trail.bytes = 10
    trail.end("ok", rows=1)
    trail.end("cancelled", "client_gone")  # too late: the first end stands
    (record,) = written
    assert (record.outcome, record.rows, record.bytes) == ("ok", 1, 10)
    assert (record.started_at, record.finished_at, record.queued_s, record.run_s) == (
        100.0,
        102.5,
        0.0,
        2.5,
    )
    assert format_records(written)[1].split()[3:6] == ["k/r", "-", "p"]


def test_the_workers_reruns_reach_the_control_planes_record(tmp_path: Path) -> None:
    """The worker's Outcome says how many runs it threw away; the row keeps the count."""
    log = AuditLog(ControlPlaneData(tmp_path / "cp").database())
    trail = QueryTrail(log, query_id="q", caller="k/r", sql="SELECT 1", policy="p")
    end_trail(trail, outcome_end(pb.Outcome(ok=True, rows=1, sandbox="sbx", reruns=2)))
    (record,) = log.recent()
    assert (record.outcome, record.rows, record.sandbox, record.reruns) == ("ok", 1, "sbx", 2)


def test_an_audit_table_from_before_reruns_is_migrated_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "cp.db"
    old = sqlite3.connect(path)
    for sql in MIGRATIONS[:6]:
        old.executescript(sql)
    old.execute(
        "INSERT INTO query_audit VALUES "
        "('q', 'k/r', 'SELECT 1', 'h', 'w', 'p', 1, 2, 0, 1, 1, 8, 'ok', '', '', 's')"
    )
    old.execute("PRAGMA user_version = 6")
    old.commit()
    old.close()
    (record,) = AuditLog(open_database(path)).recent()
    assert (record.query_id, record.sql_sha256, record.sandbox, record.reruns) == ("q", "h", "s", 0)


def test_the_worker_log_appends_one_flushed_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "state" / AUDIT_FILE
    log = WorkerAuditLog(path)
    for n in range(2):
        log.write(WorkerAuditRecord(f"q{n}", "SELECT 1", "default", 1.0, 2.0, "ok"))
        # Each record is on disk as soon as write returns, before the next one.
        assert len(path.read_text().splitlines()) == n + 1
    assert [r["query_id"] for r in read_audit(path)] == ["q0", "q1"]
    assert path.stat().st_mode & 0o777 == 0o600  # SQL can be as sensitive as the data


def test_prune_deletes_only_records_started_before_the_cutoff(tmp_path: Path) -> None:
    data = ControlPlaneData(tmp_path / "cp")
    log = AuditLog(data.database())
    for query_id, started in (("old", 100.0), ("edge", 200.0), ("new", 300.0)):
        log.write(
            AuditRecord(
                query_id,
                "k/r",
                "SELECT 1",
                "w",
                "p",
                started,
                started + 1,
                0,
                1,
                1,
                8,
                "ok",
                "",
                "",
            )
        )
    assert log.prune(before=200.0) == 1  # strictly before the cutoff
    assert [r.query_id for r in log.recent()] == ["new", "edge"]
    assert log.prune(before=200.0) == 0
    assert log.prune(before=400.0, limit=1) == 1  # batches: at most `limit` at a time
    assert log.prune(before=400.0, limit=1) == 1
    assert log.prune(before=400.0, limit=1) == 0
    assert log.recent() == []


def _old_and_new(log: AuditLog, now: float) -> None:
    for query_id, t in (("old", now - 10 * 86_400), ("new", now - 60)):
        log.write(AuditRecord(query_id, "k", "SELECT 1", "w", "p", t, t, 0, 1, 1, 8, "ok", "", ""))


def test_the_cli_prunes_records_older_than_some_days(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ControlPlaneData(tmp_path / "cp")
    _old_and_new(AuditLog(data.database()), time.time())
    assert main(["controlplane", "audit", "--data", str(data.root), "--prune-older-than", "7"]) == 0
    assert "deleted 1 audit record(s) older than 7 days" in capsys.readouterr().out
    assert [r.query_id for r in AuditLog(data.database()).recent()] == ["new"]
    with pytest.raises(SystemExit):
        main(["controlplane", "audit", "--data", str(data.root), "--prune-older-than", "0"])
    assert "positive number of days" in capsys.readouterr().err


def test_a_server_with_retention_prunes_at_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        data = ControlPlaneData(tmp_path / "cp")
        _old_and_new(AuditLog(data.database()), time.time())
        log = AuditLog(data.database())
        task = asyncio.create_task(prune_forever(log, keep_s=7 * 86_400, interval_s=3600))
        try:
            async with asyncio.timeout(DEADLINE_S):
                while [r.query_id for r in log.recent()] != ["new"]:
                    await asyncio.sleep(0.01)
        finally:
            task.cancel()

    asyncio.run(scenario())
