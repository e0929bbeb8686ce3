"""The executor against a runner that lies: the worker counts, checks and contains.

``LyingBackend`` is FakeBackend whose containers serve a scripted runner over the real socket
and protocol (no DuckDB): it answers Ready honestly, then sends whatever its script says for
Execute. What the executor must do with it (issue 16): pass on no byte it has not checked,
count rows and bytes itself, enforce the policy's limits even when the runner does not, and
kill a sandbox that sent what no honest runner sends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pyarrow as pa
import pyarrow.ipc
import pytest

from launcher.errors import QueryError, ResultLimitError, RunnerInvalidError, SessionError
from launcher.executor import Executor, QueryExecution
from launcher.model.policy import Policy, load_policy_text
from launcher.protocol import runner_pb2 as pb
from launcher.protocol import runner_pb2_grpc as pb_grpc
from launcher.sandbox.backend.base import SandboxHandle
from launcher.sandbox.capacity import Capacity
from launcher.sandbox.factory import FactorySettings, SandboxFactory
from launcher.sandbox.pool import SandboxPool
from launcher.sandbox.sessions import SessionManager

from .fakes import FakeBackend

POLICY = """
name: {name}
isolation: {isolation}
runtime: runc
limits: {{cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s{more}}}
pool: {{warm: 1}}
"""
QUERY = load_policy_text(
    POLICY.format(name="q", isolation="query", more=", max_result_rows: 1000"), "<test>"
)
UNLIMITED = load_policy_text(POLICY.format(name="u", isolation="query", more=""), "<test>")
SESSION = load_policy_text(POLICY.format(name="s", isolation="session", more=""), "<test>")
Script = Callable[[pb.ExecuteRequest], Iterator[pb.ExecuteChunk]]


def stream(rows: int, batch_rows: int = 1000) -> list[bytes]:
    """An honest result's IPC slices: schema, one per batch, end of stream."""
    table = pa.table({"x": pa.array(range(rows), pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)
    whole = sink.getvalue().to_pybytes()
    reader, slices, at = pa.BufferReader(whole), [], 0
    while at < len(whole) - 8:
        pa.ipc.read_message(reader)
        slices.append(whole[at : reader.tell()])
        at = reader.tell()
    return [*slices, whole[at:]]


def sent(slices: list[bytes], rows: int) -> Iterator[pb.ExecuteChunk]:
    for data in slices:
        yield pb.ExecuteChunk(ipc=data)
    summary = pb.Summary(rows=rows, ipc_bytes=sum(map(len, slices)), statement_type="SELECT")
    yield pb.ExecuteChunk(summary=summary)


class LyingRunner(pb_grpc.RunnerServicer):
    def __init__(self, script: Script) -> None:
        self._script = script

    def Ready(self, request: pb.ReadyRequest, context: grpc.ServicerContext) -> pb.ReadyReply:
        return pb.ReadyReply(runner_version="lying", warmup_ipc=b"".join(stream(1)))

    def Execute(
        self, request: pb.ExecuteRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteChunk]:
        yield from self._script(request)

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelReply:
        return pb.CancelReply(interrupted=False)


@dataclass
class LyingBackend(FakeBackend):
    script: Script = field(default=lambda request: sent(stream(10), 10))
    killed: list[str] = field(default_factory=list)

    async def start(self, handle: SandboxHandle) -> None:
        container = self.containers[handle.container_id]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_RunnerServicer_to_server(LyingRunner(self.script), server)
        server.add_insecure_port(f"unix://{container.socket}")
        server.start()
        container.server = server
        container.status = "running"

    async def kill(self, handle: SandboxHandle) -> None:
        self.killed.append(handle.name)
        await super().kill(handle)


@dataclass
class Run:
    """One query's end as a consumer saw it."""

    execution: QueryExecution
    received: list[bytes]
    error: QueryError | None
    backend: LyingBackend
    session_gone: bool = False


def run(script: Script, policy: Policy = QUERY) -> Run:
    async def main() -> Run:
        backend = LyingBackend(script=script)
        factory = SandboxFactory(backend, FactorySettings("img", "unit", "inst", None, 5))
        capacity, pools = Capacity(4), {}

        def pool_for(wanted: Policy) -> SandboxPool:
            if wanted.name not in pools:
                pools[wanted.name] = SandboxPool(wanted, factory, capacity, queue_timeout_s=5)
                pools[wanted.name].start()
            return pools[wanted.name]

        sessions = SessionManager(pool_for)
        executor = Executor(backend, pool_for, sessions, kill_grace_s=1)
        session_id = (await sessions.open(policy)).session_id if policy is SESSION else None
        execution = executor.execute("SELECT x", policy=policy, session_id=session_id)
        result = Run(execution, [], None, backend)
        try:
            async for chunk in execution.chunks():
                result.received.append(chunk)
        except QueryError as error:
            result.error = error
        if session_id is not None:
            try:
                sessions.get(session_id)
            except SessionError:
                result.session_gone = True
        await sessions.close_all()
        for pool in pools.values():
            await pool.close()
        assert backend.live() == 0
        return result

    return asyncio.run(main())


def received_rows(chunks: list[bytes]) -> int:
    return sum(batch.num_rows for batch in pa.ipc.open_stream(b"".join(chunks)))


def test_an_honest_result_passes_and_the_record_has_the_workers_count() -> None:
    ran = run(lambda request: sent(stream(2500), 2500), policy=UNLIMITED)
    assert ran.error is None and received_rows(ran.received) == 2500
    summary = ran.execution.record.summary
    assert summary is not None and summary.rows == 2500 and summary.statement_type == "SELECT"
    assert not ran.backend.killed


def test_a_runner_that_understates_its_rows_is_caught_and_killed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="launcher.executor"):
        ran = run(lambda request: sent(stream(5000), 1), policy=UNLIMITED)  # sends 5000, says 1
    assert isinstance(ran.error, RunnerInvalidError)
    assert str(ran.error).startswith("runner sent an invalid result: its summary claims 1 rows")
    record = ran.execution.record
    assert record.outcome == "runner_invalid"
    assert record.summary is not None and record.summary.rows == 5000
    assert ran.backend.killed == [record.sandbox]
    assert "possible sandbox compromise" in caplog.text and record.query_id in caplog.text


def test_a_runner_that_ignores_max_rows_is_stopped_by_the_worker() -> None:
    def script(request: pb.ExecuteRequest) -> Iterator[pb.ExecuteChunk]:
        assert request.max_rows == 1000  # it was told
        return sent(stream(5000), 5000)

    ran = run(script)
    assert isinstance(ran.error, ResultLimitError)
    assert str(ran.error) == "result has more than 1000 rows (policy max_result_rows)"
    assert received_rows(ran.received) == 1000  # the batch past the limit never left
    record = ran.execution.record
    assert record.outcome == "result_limit" and record.summary is not None
    assert record.summary.rows == 2000  # what the runner sent, counted by the worker
    assert ran.backend.killed == [record.sandbox]


def test_a_malformed_batch_never_leaves_and_the_session_is_ended() -> None:
    # A string batch whose last offset runs 1 GiB past its data, as in issue 16.
    table = pa.table({"s": ["abc"] * 10})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    whole = bytearray(sink.getvalue().to_pybytes())
    last_offset = whole.rfind((30).to_bytes(4, "little"))  # the last of the batch's offsets
    whole[last_offset : last_offset + 4] = (1 << 30).to_bytes(4, "little")
    ran = run(lambda request: sent([bytes(whole)], 10), policy=SESSION)
    assert isinstance(ran.error, RunnerInvalidError)
    assert ran.received == []  # not even the schema: it came in the same slice
    assert ran.session_gone and ran.backend.killed == [ran.execution.record.sandbox]
