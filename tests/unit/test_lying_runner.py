"""The executor against a runner that lies: the worker counts, checks and contains.

``LyingBackend`` is FakeBackend whose containers serve a scripted runner over the real socket
and protocol (no DuckDB): it answers Ready honestly, then sends whatever its script says for
Execute. What the executor must do with it (issue 16): pass on no byte it has not checked,
count rows and bytes itself, enforce the policy's limits even when the runner does not, and
kill a sandbox that sent what no honest runner sends; bound the strings a runner sends; check a
write's output before anything is uploaded; and check a result in steps, so other work runs
meanwhile and the hard deadline still holds.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from launcher.data.datapath import TableFiles
from launcher.data.writes import PendingWrite, WritePlan
from launcher.errors import (
    QueryError,
    QueryTimeoutError,
    ResultLimitError,
    RunnerInvalidError,
    SessionError,
    SqlError,
)
from launcher.executor import Executor, QueryExecution
from launcher.model.policy import Policy, load_policy_text
from launcher.protocol import runner_pb2 as pb
from launcher.protocol import runner_pb2_grpc as pb_grpc
from launcher.sandbox.backend.base import SandboxHandle
from launcher.sandbox.capacity import Capacity
from launcher.sandbox.factory import FactorySettings, SandboxFactory
from launcher.sandbox.pool import SandboxPool
from launcher.sandbox.result_check import STEP_MESSAGES, ResultGuard
from launcher.sandbox.runner_client import BATCH_ROWS, MAX_MESSAGE_CHARS, TRUNCATED
from launcher.sandbox.sessions import SessionManager
from tests.support.fakes import FakeBackend

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
SMALL_SCRATCH = load_policy_text(
    POLICY.format(name="w", isolation="query", more="").replace("scratch: 64MiB", "scratch: 1MiB"),
    "<test>",
)
SHORT = load_policy_text(
    POLICY.format(name="t", isolation="query", more="").replace("timeout: 5s", "timeout: 1s"),
    "<test>",
)
Script = Callable[[pb.ExecuteRequest], Iterator[pb.ExecuteChunk]]


def stream(rows: int, batch_rows: int = 1000) -> list[bytes]:
    """An honest result's IPC slices: schema, one per batch, end of stream."""
    return table_slices(pa.table({"x": pa.array(range(rows), pa.int64())}), batch_rows)


def table_slices(table: pa.Table, batch_rows: int = 1000) -> list[bytes]:
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


def run(
    script: Script,
    policy: Policy = QUERY,
    *,
    tables: TableFiles | None = None,
    beside: Callable[[], Awaitable[None]] | None = None,
) -> Run:
    """Run one query against ``script``; ``beside`` runs on the same loop meanwhile."""

    async def main() -> Run:
        task = asyncio.create_task(beside()) if beside is not None else None
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
        execution = executor.execute(
            "SELECT x", policy=policy, session_id=session_id, tables=tables
        )
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
        if task is not None:
            task.cancel()
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


# --- the runner's strings, its batch size, its output file, the check's steps ---------------


def test_the_executor_asks_for_the_batch_size_it_holds_the_runner_to() -> None:
    asked: list[int] = []

    def script(request: pb.ExecuteRequest) -> Iterator[pb.ExecuteChunk]:
        asked.append(request.batch_rows)
        return sent(stream(10), 10)

    assert run(script, policy=UNLIMITED).error is None
    assert asked == [BATCH_ROWS]


def failing(message: str) -> Script:
    failure = pb.Failure(reason=pb.FAILURE_REASON_SQL, message=message)
    return lambda request: iter([pb.ExecuteChunk(failure=failure)])


def test_a_long_failure_message_is_cut_and_loses_its_control_characters() -> None:
    """A runner's failure message becomes the query's error, crosses the tunnel to the control
    plane (64 MiB at most a message) and lands in both audits: 8 MiB of it must not."""
    head = "Parser Error: \x1b]0;owned\x07syntax\terror\x00 near\n"
    ran = run(failing(head + "x" * (8 << 20)), policy=UNLIMITED)
    assert isinstance(ran.error, SqlError)
    text = str(ran.error)
    assert text.startswith("Parser Error: ]0;ownedsyntax\terror near\nxxx")
    assert text.endswith("x" + TRUNCATED) and len(text) <= MAX_MESSAGE_CHARS + len(TRUNCATED)
    assert not ran.backend.killed  # a long message is no lie: DuckDB's can be long
    short = run(failing("Binder Error: \x9b31m column x"), policy=UNLIMITED)
    assert str(short.error) == "Binder Error: 31m column x"


def test_a_statement_type_duckdb_does_not_have_is_contained() -> None:
    def script(request: pb.ExecuteRequest) -> Iterator[pb.ExecuteChunk]:
        slices = stream(5)
        yield from (pb.ExecuteChunk(ipc=data) for data in slices)
        summary = pb.Summary(rows=5, ipc_bytes=sum(map(len, slices)), statement_type="\x1b[2J")
        yield pb.ExecuteChunk(summary=summary)

    ran = run(script, policy=UNLIMITED)
    assert isinstance(ran.error, RunnerInvalidError)
    assert "a statement type of '[2J'" in str(ran.error)
    assert ran.backend.killed == [ran.execution.record.sandbox]


def test_an_output_file_no_query_asked_for_is_contained() -> None:
    def script(request: pb.ExecuteRequest) -> Iterator[pb.ExecuteChunk]:
        yield from (pb.ExecuteChunk(ipc=data) for data in stream(5))
        yield pb.ExecuteChunk(output=b"PAR1")

    ran = run(script, policy=UNLIMITED)
    assert isinstance(ran.error, RunnerInvalidError)
    assert "an output file no query asked for" in str(ran.error)
    assert ran.backend.killed == [ran.execution.record.sandbox]


PLAN = WritePlan("s3://lake/out/x.parquet", "lake", "COPY ...", "/scratch/duckcell-out/x.parquet")


@dataclass
class Uploads:
    """The object store a write uploads to; it keeps what it got."""

    uploads: dict[str, bytes] = field(default_factory=dict)

    async def upload(self, source: Path, url: str) -> None:
        self.uploads[url] = source.read_bytes()


def parquet(rows: int) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(rows))}), sink)
    return sink.getvalue()


def count(value: object, kind: pa.DataType | None = None) -> list[bytes]:
    """DuckDB's COPY result as the runner sends it: one row, ``Count``."""
    return table_slices(pa.table({"Count": pa.array([value], kind or pa.int64())}))


def copying(
    outputs: list[bytes], result: list[bytes] | None = None, *, early: bool = False
) -> Script:
    """A runner answering a COPY: its result, then the file, then the summary (``early``: the
    file before the result's end)."""
    result = count(3) if result is None else result

    def script(request: pb.ExecuteRequest) -> Iterator[pb.ExecuteChunk]:
        assert request.output_path == PLAN.output_path
        head = result[:1] if early else result
        yield from (pb.ExecuteChunk(ipc=data) for data in head)
        yield from (pb.ExecuteChunk(output=data) for data in outputs)
        yield from (pb.ExecuteChunk(ipc=data) for data in result[len(head) :])
        rows = sum(b.num_rows for b in pa.ipc.open_stream(b"".join(result)))
        summary = pb.Summary(rows=rows, ipc_bytes=sum(map(len, result)), statement_type="COPY")
        yield pb.ExecuteChunk(summary=summary)

    return script


def write_run(script: Script, policy: Policy = UNLIMITED) -> tuple[Run, Uploads]:
    store = Uploads()
    ran = run(script, policy, tables=TableFiles(write=PendingWrite(PLAN, store)))  # type: ignore[arg-type]
    return ran, store


def test_an_honest_write_is_uploaded_and_answered_with_its_count() -> None:
    data = parquet(3)
    ran, store = write_run(copying([data[:100], data[100:]]))
    assert ran.error is None and store.uploads == {PLAN.destination: data}
    result = pa.ipc.open_stream(b"".join(ran.received)).read_all()
    assert result.to_pylist() == [{"Count": 3, "bytes": len(data), "destination": PLAN.destination}]


@pytest.mark.parametrize(
    ("script", "policy", "words"),
    [
        (copying([parquet(3)] + [b"\0" * 700_000] * 2), SMALL_SCRATCH, "larger than the sandbox"),
        (copying([b"not a parquet file, but long enough"]), UNLIMITED, "not a Parquet file"),
        (copying([b"PAR1" + b"\xff\xff\xff\x7f" + b"PAR1"]), UNLIMITED, "not a Parquet file"),
        (copying([parquet(3)], count("3", pa.string())), UNLIMITED, "not one row count"),
        (copying([parquet(3)], count(-1)), UNLIMITED, "not one row count"),
        (copying([parquet(3)], table_slices(pa.table({"a": [1], "b": [2]}))), UNLIMITED, "2 col"),
        (copying([parquet(3)], early=True), UNLIMITED, "before the end of its result"),
    ],
    ids=["too-large", "not-parquet", "footer", "string-count", "negative", "columns", "early"],
)
def test_a_write_the_runner_lies_about_is_contained_before_any_upload(
    script: Script, policy: Policy, words: str
) -> None:
    """A file larger than /scratch, not Parquet, a COPY result that is no count, a file sent
    before the result ended: the sandbox is killed and nothing is uploaded."""
    ran, store = write_run(script, policy)
    assert isinstance(ran.error, RunnerInvalidError), ran.error
    assert words in str(ran.error)
    assert store.uploads == {} and ran.backend.killed == [ran.execution.record.sandbox]


def one_row_batches(batches: int, columns: int = 1) -> list[bytes]:
    """schema, ``batches`` one-row batches in one slice, end: the most messages a slice holds."""
    schema = pa.schema([(f"c{i}", pa.int64()) for i in range(columns)])
    batch = pa.record_batch([pa.array([1], pa.int64())] * columns, schema=schema)
    schema_message, one, end = table_slices(pa.Table.from_batches([batch]))
    return [schema_message, one * batches, end]


class Watched(ResultGuard):
    """The executor's guard, watched: how many turns the loop gave others during each slice's
    check, and which threads checked it."""

    ticks = [0]
    spans: list[int] = []
    threads: set[str] = set()

    def start(self, data: bytes) -> None:
        self.began = self.ticks[0]
        super().start(data)

    def step(self, *, heavy: bool = False) -> bytes | None:
        self.threads.add(threading.current_thread().name)
        checked = super().step(heavy=heavy)
        if checked is not None:
            self.spans.append(self.ticks[0] - self.began)
        return checked


async def ticking() -> None:
    while True:
        Watched.ticks[0] += 1
        await asyncio.sleep(0)


def test_a_slice_of_many_batches_lets_other_work_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """One slice of 2,000 batches was once checked in one go on the event loop (64 MiB of them:
    7 s): it is now checked in steps, between which other tasks run."""
    monkeypatch.setattr("launcher.executor.ResultGuard", Watched)
    Watched.spans.clear()
    slices = one_row_batches(2000)
    ran = run(lambda request: sent(slices, 2000), policy=UNLIMITED, beside=ticking)
    assert ran.error is None and received_rows(ran.received) == 2000
    assert Watched.spans and max(Watched.spans) >= 2000 // STEP_MESSAGES - 1


def test_a_heavy_slice_is_checked_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("launcher.executor.ResultGuard", Watched)
    Watched.threads.clear()
    slices = one_row_batches(3, columns=8000)  # a wide schema and its batches: heavy
    ran = run(lambda request: sent(slices, 3), policy=UNLIMITED)
    assert ran.error is None and received_rows(ran.received) == 3
    assert Watched.threads - {threading.main_thread().name}


class Slow(ResultGuard):
    def step(self, *, heavy: bool = False) -> bytes | None:
        time.sleep(0.2)
        return super().step(heavy=heavy)


def test_the_hard_deadline_stops_a_check_that_lasts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement timeout of 1 s and a grace of 1 s: a check still going after 2 s kills the
    sandbox, like a runner that does not answer."""
    monkeypatch.setattr("launcher.executor.ResultGuard", Slow)
    slices = one_row_batches(STEP_MESSAGES * 30)
    started = time.monotonic()
    ran = run(lambda request: sent(slices, STEP_MESSAGES * 30), policy=SHORT)
    assert isinstance(ran.error, QueryTimeoutError), ran.error
    assert re.search(r"killed by the launcher after 1 s \(\+1 s grace\)", str(ran.error))
    assert ran.backend.killed == [ran.execution.record.sandbox]
    assert time.monotonic() - started < 5
