"""A query that crossed a worker's Draining message is run elsewhere, not failed.

The router alone, driven as the tunnel would drive it: workers are outboxes, the worker's
answers are ``QueryResult`` messages handed to ``deliver`` (the inline path).
"""

from __future__ import annotations

import asyncio
import contextlib

import pyarrow as pa
import pytest

from launcher.controlplane.audit import AuditRecord
from launcher.controlplane.routing import QueryDone, QueryRouter
from launcher.errors import WorkerDrainingError, WorkerShutdownError
from launcher.protocol import controlplane_pb2 as pb

DEADLINE_S = 5.0
REFUSAL = "worker wkr-a is shutting down and took no new query: run it again"


class _Audit:
    def __init__(self) -> None:
        self.opened: list[AuditRecord] = []  # opening rows, as the router wrote them
        self.records: list[AuditRecord] = []

    def open(self, record: AuditRecord) -> None:
        self.opened.append(record)

    def write(self, record: AuditRecord) -> None:
        self.records.append(record)


def _ipc() -> bytes:
    sink = pa.BufferOutputStream()
    table = pa.table({"answer": [42]})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


async def _next_run(outbox: asyncio.Queue[pb.ControlMessage]) -> pb.RunQuery:
    message = await asyncio.wait_for(outbox.get(), DEADLINE_S)
    assert message.HasField("run_query")
    return message.run_query


async def _collect(router: QueryRouter) -> list[bytes | QueryDone]:
    async with contextlib.aclosing(router.run("SELECT 42", "", caller="k/analyst")) as items:
        return [item async for item in items]


def test_a_query_refused_by_a_draining_worker_runs_on_another() -> None:
    async def scenario() -> None:
        audit = _Audit()
        router = QueryRouter(audit=audit)
        a = router.worker_connected("wkr-a")
        b = router.worker_connected("wkr-b")
        client = asyncio.create_task(_collect(router))
        # Round robin starts at wkr-a; it drains just after the RunQuery left.
        first = await _next_run(a)
        router.worker_draining("wkr-a", a)
        refusal = pb.Outcome(ok=False, reason="worker_draining", message=REFUSAL)
        router.deliver("wkr-a", pb.QueryResult(query_id=first.query_id, outcome=refusal))
        second = await _next_run(b)
        assert (second.query_id, second.sql) == (first.query_id, "SELECT 42")
        ok = pb.Outcome(ok=True, rows=1)
        router.deliver("wkr-b", pb.QueryResult(query_id=second.query_id, ipc=_ipc(), outcome=ok))
        items = await asyncio.wait_for(client, DEADLINE_S)
        assert pa.ipc.open_stream(items[0]).read_all().column("answer").to_pylist() == [42]
        assert items[-1] == QueryDone(rows=1)
        (record,) = audit.records  # one query, one record, where it really ran
        assert (record.outcome, record.worker_id) == ("ok", "wkr-b")
        # Its opening row was written before each send: on wkr-a, then moved to wkr-b.
        assert [(r.outcome, r.worker_id) for r in audit.opened] == [
            ("running", "wkr-a"),
            ("running", "wkr-b"),
        ]

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S * 2))


def test_with_no_other_worker_the_client_gets_the_refusal() -> None:
    async def scenario() -> None:
        audit = _Audit()
        router = QueryRouter(audit=audit)
        a = router.worker_connected("wkr-a")
        client = asyncio.create_task(_collect(router))
        first = await _next_run(a)
        router.worker_draining("wkr-a", a)
        refusal = pb.Outcome(ok=False, reason="worker_draining", message=REFUSAL)
        router.deliver("wkr-a", pb.QueryResult(query_id=first.query_id, outcome=refusal))
        with pytest.raises(WorkerDrainingError, match="run it again") as failed:
            await asyncio.wait_for(client, DEADLINE_S)
        assert isinstance(failed.value, WorkerShutdownError)  # what clients already handle
        assert a.empty()  # not sent back to the draining worker
        (record,) = audit.records
        assert (record.outcome, record.reason) == ("error", "worker_draining")

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S * 2))


def test_a_query_stopped_mid_run_by_a_drain_is_not_run_twice() -> None:
    """worker_shutdown means it ran (maybe wrote): only a refusal is safe to run elsewhere."""

    async def scenario() -> None:
        router = QueryRouter()
        a = router.worker_connected("wkr-a")
        b = router.worker_connected("wkr-b")
        client = asyncio.create_task(_collect(router))
        first = await _next_run(a)
        stopped = pb.Outcome(ok=False, reason="worker_shutdown", message="shut down: run it again")
        router.deliver("wkr-a", pb.QueryResult(query_id=first.query_id, outcome=stopped))
        with pytest.raises(WorkerShutdownError) as failed:
            await asyncio.wait_for(client, DEADLINE_S)
        assert not isinstance(failed.value, WorkerDrainingError)
        assert b.empty()

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S * 2))
