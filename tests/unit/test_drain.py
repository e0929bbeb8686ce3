"""The worker's drain (its SIGTERM path) through the real tunnel, with in-process sandboxes.

``TunnelClient.drain`` is what the signal handler calls; the CLI wiring (signal, exit code,
sandboxes removed) is proven with a real worker process in the integration tier.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any

import pytest

from launcher.cli.main import main
from launcher.controlplane.audit import AuditLog
from launcher.controlplane.registry import WorkerRegistry
from launcher.controlplane.routing import QueryDone, QueryRouter
from launcher.errors import WorkerShutdownError, WorkerUnavailableError
from launcher.protocol import controlplane_pb2 as pb
from launcher.worker.audit import AUDIT_FILE, QueryOpening, WorkerAuditRecord, read_audit
from launcher.worker.queries import QueryTasks, RunStats
from tests.support.controlplane import DEADLINE_S, ControlPlane
from tests.support.querystack import LONG_SQL, POLICY, Stack, stack
from tests.support.waiting import eventually, run

# Only the drain can end LONG_SQL early under this policy.
PATIENT = POLICY.replace("statement_timeout: 2s", "statement_timeout: 60s")
GRACE_S = 0.3


async def drain_and_wait(s: Stack) -> None:
    assert s.worker is not None and s.running is not None
    s.worker.drain()
    await asyncio.wait_for(s.running, DEADLINE_S)  # run() returns by itself, without error


def test_a_query_still_running_after_the_grace_ends_with_worker_shutdown(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, policy=PATIENT, drain_grace_s=GRACE_S) as s:
            query = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S))
            await s.until_running()
            started = time.monotonic()
            await drain_and_wait(s)
            with pytest.raises(WorkerShutdownError, match=r"shut down .* run it again"):
                await asyncio.wait_for(query, DEADLINE_S)
            assert time.monotonic() - started >= GRACE_S  # it was given its grace first
            assert s.host.executor.running() == []
            assert [r.outcome for r in s.records] == ["cancelled"]  # its sandbox was killed
        (worker_line,) = read_audit(tmp_path / "worker" / AUDIT_FILE)
        assert worker_line["reason"] == "worker_shutdown"
        (record,) = AuditLog(control_plane.data.database()).recent()
        assert (record.outcome, record.reason) == ("error", "worker_shutdown")

    run(scenario)


def test_a_query_that_finishes_within_the_grace_completes_normally(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, policy=PATIENT, drain_grace_s=20) as s:
            sql = "SELECT 1 AS done, sleep_ms(500) IS NULL AS slept"
            query = asyncio.create_task(s.client.table(sql, timeout_s=DEADLINE_S))
            await s.until_running()
            started = time.monotonic()
            await drain_and_wait(s)
            assert (await query).to_pylist() == [{"done": 1, "slept": True}]
            assert time.monotonic() - started >= 0.3  # it was still running at the drain
            # The drain ended when its last query did, not at the end of the grace.
            assert time.monotonic() - started < 10
            assert [r.outcome for r in s.records] == ["ok"]

    run(scenario)


def test_a_draining_worker_is_picked_no_more_and_runs_nothing_new(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, policy=PATIENT, drain_grace_s=DEADLINE_S) as s:
            long = asyncio.create_task(s.client.table(LONG_SQL, timeout_s=DEADLINE_S * 2))
            await s.until_running()
            assert s.worker is not None
            s.worker.drain()
            # Until the control plane has read Draining a new query may still reach the worker,
            # which answers worker_shutdown without running it; then there is no worker at all.
            while True:
                try:
                    await s.client.table("SELECT 1", timeout_s=DEADLINE_S)
                except WorkerShutdownError:
                    continue
                except WorkerUnavailableError as error:
                    assert "no worker online" in str(error)
                    break
                raise AssertionError("a draining worker ran a new query")
            assert len(s.records) == 0  # nothing new reached the executor
            assert s.worker.connected.is_set()  # still up: its long query is running
            (worker,) = WorkerRegistry(control_plane.data.database()).list()
            assert worker.online and worker.draining
            assert main(["controlplane", "workers", "--data", str(control_plane.data.root)]) == 0
            assert "draining" in capsys.readouterr().out
            long.cancel()
            assert s.running is not None
            await asyncio.wait_for(s.running, DEADLINE_S)
            await eventually(
                lambda: not control_plane.worker(worker.worker_id).online, "offline once it left"
            )
            assert not control_plane.worker(worker.worker_id).draining

    run(scenario)


class _Push:
    """A PushResults call that records what the worker writes (the server's side, faked)."""

    def __init__(self) -> None:
        self.chunks: list[pb.ResultChunk] = []

    async def write(self, chunk: pb.ResultChunk) -> None:
        self.chunks.append(chunk)

    async def done_writing(self) -> None:
        return None

    def __await__(self) -> Generator[Any, None, pb.PushAck]:
        return asyncio.sleep(0, pb.PushAck()).__await__()

    def cancel(self) -> bool:
        return False


class _Stub:
    def __init__(self) -> None:
        self.calls: list[_Push] = []

    def PushResults(self) -> _Push:  # the generated stub's method name
        self.calls.append(_Push())
        return self.calls[-1]


class _Runner:
    """Fails the test if the drain lets a query through to it."""

    def run(self, query_id: str, sql: str, policy: str) -> object:
        raise AssertionError("a query reached the runner during a drain")

    async def cancel(self, query_id: str) -> None:
        return None

    def stats(self, query_id: str) -> RunStats:
        return RunStats()


def test_a_run_query_that_crosses_draining_is_refused_as_worker_draining() -> None:
    async def scenario() -> None:
        stub, audit = _Stub(), _AuditList()
        tasks = QueryTasks(_Runner(), stub, audit=audit)  # type: ignore[arg-type]
        await tasks.drain(0.0, "wkr-test")
        tasks.start(pb.RunQuery(query_id="late", sql="SELECT 1"))
        await tasks.drain(0.0, "wkr-test")  # returns once every query has ended
        (call,) = stub.calls
        assert call.chunks[0].query_id == "late"
        outcome = call.chunks[-1].outcome
        assert not outcome.ok and outcome.reason == "worker_draining"
        assert "wkr-test is shutting down" in outcome.message and "again" in outcome.message
        assert [(r.query_id, r.reason) for r in audit.records] == [("late", "worker_draining")]

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))


class _AuditList:
    def __init__(self) -> None:
        self.records: list[WorkerAuditRecord] = []
        self.written = asyncio.Event()

    async def open(self, opening: QueryOpening) -> None:
        return None

    def write(self, record: WorkerAuditRecord) -> None:
        self.records.append(record)
        self.written.set()


def test_a_worker_leaving_after_its_last_outcome_does_not_lose_the_unread_result() -> None:
    """A drained worker hangs up right after its last PushResults call; a slow client that has
    not yet read the end of its result still gets all of it, not "worker disconnected"."""

    async def scenario() -> None:
        router = QueryRouter()
        outbox = router.worker_connected("wkr-1")
        results = router.run("SELECT 1", "")
        first = asyncio.create_task(anext(results))  # the client is reading
        query_id = (await outbox.get()).run_query.query_id

        async def pushed() -> AsyncIterator[pb.ResultChunk]:
            for part in (b"a", b"b", b"c"):
                yield pb.ResultChunk(ipc=part)
            yield pb.ResultChunk(outcome=pb.Outcome(ok=True, rows=3))

        await router.accept("wkr-1", query_id, pushed())
        router.worker_gone("wkr-1", outbox)  # before the client read past the first chunk
        items = [await first] + [item async for item in results]
        assert items == [b"a", b"b", b"c", QueryDone(rows=3)]

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))


class _RerunRunner:
    """A query whose first run was thrown away (a table changed under it), then ran again."""

    async def run(self, query_id: str, sql: str, policy: str, **_: object) -> AsyncIterator[bytes]:
        yield b"ipc"

    async def cancel(self, query_id: str) -> None:
        return None

    def stats(self, query_id: str) -> RunStats:
        return RunStats(rows=1, sandbox="sbx", queued_s=0.01, run_s=0.2, policy="p", reruns=1)


def test_the_worker_audit_record_counts_the_runs_thrown_away() -> None:
    async def scenario() -> None:
        stub, audit, sent = _Stub(), _AuditList(), list[pb.WorkerMessage]()

        async def send(message: pb.WorkerMessage) -> bool:
            sent.append(message)
            return True

        tasks = QueryTasks(_RerunRunner(), stub, audit=audit, send=send)  # type: ignore[arg-type]
        tasks.start(pb.RunQuery(query_id="q", sql="SELECT n FROM t"))
        await audit.written.wait()
        (record,) = audit.records
        assert (record.outcome, record.rows, record.reruns) == ("ok", 1, 1), record
        assert json.loads(record.as_json())["reruns"] == 1
        # ...and so is the control plane's: the Outcome it is sent carries the count.
        outcomes = [m.result.outcome for m in sent if m.result.HasField("outcome")]
        assert [o.reruns for o in outcomes] == [1]

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
