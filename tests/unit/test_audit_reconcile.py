"""Audit records that survive the death of either side: opened before the query runs, closed
when it ends, reconciled as lost at the next start. The worker's JSON-lines file and the control
plane's SQLite table, each driven through its own API; the processes killed for real are in
``tests/integration/test_audit_faults.py``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.controlplane.audit import AuditLog, QueryTrail, format_records
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.server import ControlPlaneServer
from launcher.protocol import controlplane_pb2 as pb
from launcher.worker.audit import (
    AUDIT_FILE,
    LOST,
    QueryOpening,
    WorkerAuditLog,
    WorkerAuditRecord,
    read_audit,
    read_entries,
)
from launcher.worker.queries import QueryTasks, RunStats

DEADLINE_S = 10.0
SQL = "SELECT count(*) FROM range(1000) t(i)"


def opening(query_id: str, *, session_id: str = "") -> QueryOpening:
    return QueryOpening(query_id, SQL, "default", 1000.0, session_id)


def ended(query_id: str, outcome: str = "ok") -> WorkerAuditRecord:
    return WorkerAuditRecord(query_id, SQL, "default", 1000.0, 1001.0, outcome, sandbox="sbx")


async def opened(log: WorkerAuditLog, *query_ids: str) -> None:
    for query_id in query_ids:
        await log.open(opening(query_id))


def never_alive(run: str) -> bool:
    return False


# -- the worker's file -----------------------------------------------------------------------


def test_a_dead_runs_open_query_is_closed_as_lost_with_what_its_open_knew(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE

    async def dead_run() -> None:
        log = WorkerAuditLog(path, run="run-a", worker="wkr-1")
        log.reconcile(never_alive)
        await opened(log, "done")
        log.write(ended("done"))
        await log.open(opening("cut-short", session_id="ses-1"))
        log.close()  # ...and the process dies: no close for "cut-short"

    asyncio.run(dead_run())
    restarted = WorkerAuditLog(path, run="run-b", worker="wkr-1")
    assert restarted.reconcile(never_alive) == 1
    done, lost = read_audit(path)
    assert (done["query_id"], done["outcome"]) == ("done", "ok")
    assert (lost["query_id"], lost["outcome"], lost["reason"]) == (
        "cut-short",
        LOST,
        "worker_exited",
    )
    assert lost["sql"] == SQL and lost["sql_sha256"] == hashlib.sha256(SQL.encode()).hexdigest()
    assert (lost["policy"], lost["started_at"], lost["session_id"]) == ("default", 1000.0, "ses-1")
    # It stays the dead run's record; the run that found it says so.
    assert (lost["run"], lost["worker"], lost["reconciled_by"]) == ("run-a", "wkr-1", "run-b")
    assert "before the query's outcome was known" in str(lost["message"])
    start = read_entries(path)[-1]
    assert (start["event"], start["run"], start["lost"]) == ("start", "run-b", 1)
    # Reconciled once: the next start finds nothing more.
    assert WorkerAuditLog(path, run="run-c").reconcile(never_alive) == 0
    assert len(read_audit(path)) == 2


def test_a_live_runs_open_queries_are_left_to_it(tmp_path: Path) -> None:
    """Another process still holds its run's lock: its queries are running, not lost."""
    path = tmp_path / AUDIT_FILE

    async def scenario() -> None:
        live = WorkerAuditLog(path, run="live")
        live.reconcile(never_alive)
        await opened(live, "running")
        assert WorkerAuditLog(path, run="new").reconcile(lambda run: run == "live") == 0
        live.write(ended("running"))
        live.close()

    asyncio.run(scenario())
    assert [(r["query_id"], r["outcome"]) for r in read_audit(path)] == [("running", "ok")]


def test_each_close_says_how_far_back_this_runs_open_queries_go(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE

    async def scenario() -> None:
        log = WorkerAuditLog(path, run="r")
        await opened(log, "a", "b")
        log.write(ended("a"))
        log.write(ended("b"))
        log.close()

    asyncio.run(scenario())
    entries = read_entries(path)
    assert [(e["event"], e["query_id"], e.get("seq")) for e in entries] == [
        ("open", "a", 0),
        ("open", "b", 1),
        ("close", "a", None),
        ("close", "b", None),
    ]
    # After a closed, b (seq 1) is the oldest open; after b, none is: the next seq.
    assert [e["oldest_open"] for e in entries[2:]] == [1, 2]


def test_reconcile_reads_back_only_to_the_dead_runs_oldest_open_query(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE

    async def scenario() -> None:
        log = WorkerAuditLog(path, run="r")
        await opened(log, "a", "x", "y")
        log.write(ended("a"))
        log.write(ended("x"))  # oldest_open: y's seq; nothing of r before y needs a look
        log.close()

    asyncio.run(scenario())
    # A line no real file has: were it read, it would be taken for a lost query. Reading stops
    # at x, the first open of r older than y, so it never is.
    never_read = {"event": "open", "run": "r", "query_id": "z", "seq": -1, "sql": SQL}
    path.write_text(json.dumps(never_read) + "\n" + path.read_text())
    assert WorkerAuditLog(path, run="next").reconcile(never_alive) == 1
    assert [r["query_id"] for r in read_audit(path) if r["outcome"] == LOST] == ["y"]


def test_a_line_cut_short_by_a_crash_is_skipped_and_does_not_swallow_the_next(
    tmp_path: Path,
) -> None:
    path = tmp_path / AUDIT_FILE

    async def scenario() -> None:
        log = WorkerAuditLog(path, run="r")
        await opened(log, "q")
        log.close()

    asyncio.run(scenario())
    with path.open("a") as file:
        file.write('{"event": "close", "query_id": "q", "out')  # the process died mid-write
    assert WorkerAuditLog(path, run="next").reconcile(never_alive) == 1
    entries = read_entries(path)
    assert [e["event"] for e in entries] == ["open", "close", "start"]
    assert entries[1]["outcome"] == LOST


def test_a_reconcile_cut_short_is_finished_by_the_next_without_repeats(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE

    async def scenario() -> None:
        log = WorkerAuditLog(path, run="dead")
        await opened(log, "q1", "q2")
        log.close()

    asyncio.run(scenario())
    WorkerAuditLog(path, run="first").reconcile(never_alive)
    entries = read_entries(path)
    # Keep the first lost close only, as if "first" died right after writing it.
    path.write_text("".join(json.dumps(e) + "\n" for e in entries[:3]))
    assert WorkerAuditLog(path, run="second").reconcile(never_alive) == 1
    lost = [r["query_id"] for r in read_audit(path)]
    assert sorted(lost) == ["q1", "q2"]


def test_records_from_before_open_and_close_are_read_as_ended_queries(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    path.write_text(ended("old").as_json() + "\n")  # the format before: one line per query
    assert WorkerAuditLog(path, run="r").reconcile(never_alive) == 0
    assert [r["query_id"] for r in read_audit(path)] == ["old"]


def test_a_close_waits_for_its_open_still_being_written(tmp_path: Path) -> None:
    """The query's task was cancelled while its open was on its way to disk: the close goes
    after it, never before (else a reconcile would take the query for lost)."""
    path = tmp_path / AUDIT_FILE
    disk = ThreadPoolExecutor(max_workers=1)
    held = threading.Event()
    disk.submit(held.wait)  # the disk is slow: the open waits behind this

    async def scenario() -> None:
        log = WorkerAuditLog(path, run="r", disk=disk)
        opening_task = asyncio.create_task(log.open(opening("q")))
        await asyncio.sleep(0.05)
        opening_task.cancel()
        log.write(ended("q", "error"))
        assert not path.exists()  # neither is written yet
        held.set()
        async with asyncio.timeout(DEADLINE_S):
            while len(read_entries(path)) < 2:
                await asyncio.sleep(0.01)
        log.close()

    asyncio.run(scenario())
    assert [e["event"] for e in read_entries(path)] == ["open", "close"]
    assert WorkerAuditLog(path, run="next").reconcile(never_alive) == 0


def test_the_open_is_on_disk_before_the_runner_sees_the_query(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE
    seen: list[list[str]] = []

    class Runner:
        async def run(self, query_id: str, sql: str, policy: str) -> AsyncIterator[bytes]:
            seen.append([str(e["event"]) for e in read_entries(path)])
            yield b"ipc"

        async def cancel(self, query_id: str) -> None:
            return None

        def stats(self, query_id: str) -> RunStats:
            return RunStats(rows=1, sandbox="sbx")

    async def send(message: pb.WorkerMessage) -> bool:
        return True

    async def scenario() -> None:
        log = WorkerAuditLog(path, run="r")
        tasks = QueryTasks(Runner(), None, audit=log, send=send)  # type: ignore[arg-type]
        tasks.start(pb.RunQuery(query_id="q", sql=SQL))
        async with asyncio.timeout(DEADLINE_S):
            while not read_audit(path):
                await asyncio.sleep(0.01)
        log.close()

    asyncio.run(scenario())
    assert seen == [["open"]]
    (record,) = read_audit(path)
    assert (record["outcome"], record["sandbox"], record["rows"]) == ("ok", "sbx", 1)


# -- the control plane's table ---------------------------------------------------------------


def test_a_trail_opens_one_row_and_its_end_updates_it(tmp_path: Path) -> None:
    log = AuditLog(ControlPlaneData(tmp_path / "cp").database())
    trail = QueryTrail(log, query_id="q", caller="k/r", sql=SQL, policy="")
    trail.open("wkr-1", "default")
    (row,) = log.recent()
    assert (row.outcome, row.worker_id, row.policy, row.caller) == (
        "running",
        "wkr-1",
        "default",
        "k/r",
    )
    assert format_records([row])[1].split()[6:10] == ["running", "0", "0", "-"]
    trail.end("ok", rows=3)
    (row,) = log.recent()
    assert (row.outcome, row.rows, row.worker_id, row.policy) == ("ok", 3, "wkr-1", "default")


def test_running_rows_of_a_dead_process_are_marked_lost_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ControlPlaneData(tmp_path / "cp")
    log = AuditLog(data.database())
    finished = QueryTrail(log, query_id="finished", caller="k/r", sql="SELECT 1", policy="p")
    finished.open("wkr-1", "p")
    finished.end("ok", rows=1)
    QueryTrail(log, query_id="cut-short", caller="k/r", sql=SQL, policy="p").open("wkr-1", "p")

    async def start_and_stop() -> None:
        server = ControlPlaneServer(data, "127.0.0.1:0", tunnel_listen="127.0.0.1:0")
        await server.start()
        await server.stop(0)

    before = time.time()
    asyncio.run(start_and_stop())
    rows = {row.query_id: row for row in log.recent()}
    assert rows["finished"].outcome == "ok"
    lost = rows["cut-short"]
    assert (lost.outcome, lost.reason) == ("lost", "control_plane_exited")
    assert (lost.caller, lost.sql, lost.policy, lost.worker_id) == ("k/r", SQL, "p", "wkr-1")
    assert lost.sql_sha256 == hashlib.sha256(SQL.encode()).hexdigest()
    assert lost.finished_at >= before > lost.started_at and "ended" in lost.message
    assert AuditLog(data.database()).reconcile(time.time()) == 0  # once only

    assert main(["controlplane", "audit", "--data", str(data.root)]) == 0
    table = capsys.readouterr().out.splitlines()
    (line,) = [line for line in table if "cut-short" in line]
    assert "lost:control_plane_exited" in line and " - " in line  # no duration: end unknown
