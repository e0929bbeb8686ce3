"""The runner's lock-down, statement gate and table bindings, in-process against real DuckDB.

The same probes run inside a real container in tests/integration/test_sandbox.py; here they
run fast and also check the layer beneath the gate (DuckDB's own lock) directly.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import duckdb
import grpc
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from duckcell_runner.lockdown import (
    RunnerConfig,
    lock_statements,
    lockdown_statements,
    open_locked,
)
from duckcell_runner.service import RunnerService
from duckcell_runner.warmup import warm_parquet
from launcher.model.catalog import Binding
from launcher.protocol import runner_pb2 as pb
from launcher.protocol import runner_pb2_grpc as pb_grpc
from launcher.sandbox.runner_client import OutputChunk, QuerySummary, RunnerClient


@pytest.fixture
def dirs(tmp_path: Path) -> RunnerConfig:
    (tmp_path / "cache").mkdir()
    (tmp_path / "scratch").mkdir()
    (tmp_path / "outside.csv").write_text("a\n1\n")
    con = duckdb.connect()
    for name, value in (("a", 1), ("b", 2), ("other", 40), ("it's", 7)):
        target = f"{tmp_path}/cache/{name}.parquet".replace("'", "''")
        con.execute(f"COPY (SELECT {value} AS x) TO '{target}'")
    (tmp_path / "cache" / "zones.csv").write_text("id,zone\n1,north\n2,south\n")
    con.close()
    return RunnerConfig(
        socket_path=str(tmp_path / "r.sock"),
        cache_dir=str(tmp_path / "cache"),
        scratch_dir=str(tmp_path / "scratch"),
        statement_timeout_ms=2000,
    )


@pytest.fixture
def service(dirs: RunnerConfig) -> Iterator[RunnerService]:
    runner = RunnerService(open_locked(dirs), default_timeout_s=2, batch_rows=1024, config=dirs)
    runner.warm_up(0.0)
    yield runner


class _Context:
    """An RPC still going: the callback is kept, for a test to call as gRPC would."""

    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.callbacks: list[Callable[[], object]] = []

    def add_callback(self, callback: Callable[[], object]) -> bool:
        self.callbacks.append(callback)
        return self.active  # gRPC: False once the RPC has ended, and never calls it then


def execute(service: RunnerService, sql: str, **kwargs: object) -> tuple[list, pb.ExecuteChunk]:
    chunks = list(service.Execute(pb.ExecuteRequest(query_id="q", sql=sql, **kwargs), _Context()))
    data = b"".join(c.ipc for c in chunks if c.HasField("ipc"))
    rows = ipc.open_stream(data).read_all().to_pylist() if data else []
    return rows, chunks[-1]


def test_lock_is_the_last_setting() -> None:
    statements = lockdown_statements(RunnerConfig(), ["/cache/a.parquet"])
    assert statements[-1] == "SET lock_configuration = true"
    assert statements[-2] == "SET enable_external_access = false"
    assert "SET allowed_directories = ['/scratch/']" in statements  # not /cache/
    assert "SET allowed_paths = ['/cache/a.parquet']" in statements
    # These cannot be set once external access is off.
    order = [s.split()[1] for s in statements]
    for setting in ("allowed_directories", "allowed_paths", "temp_directory"):
        assert order.index(setting) < order.index("enable_external_access")


def test_locked_connection_refuses_changes_directly(dirs: RunnerConfig) -> None:
    con = open_locked(dirs)
    for statement in lock_statements(dirs, [f"{dirs.cache_dir}/a.parquet"]):
        con.execute(statement)
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error, match="Permission"):
        con.execute(f"SELECT * FROM read_csv('{Path(dirs.cache_dir).parent}/outside.csv')")
    assert con.execute("SELECT current_setting('python_enable_replacements')").fetchone() == (
        False,
    )


def test_python_variables_are_not_visible_to_sql(service: RunnerService) -> None:
    _, last = execute(service, "SELECT * FROM service")
    assert last.failure.reason == pb.FAILURE_REASON_SQL


@pytest.mark.parametrize(
    ("sql", "reason", "message"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", pb.FAILURE_REASON_SQL, "Permission Error"),
        ("SELECT * FROM read_text('/proc/self/environ')", pb.FAILURE_REASON_SQL, "Permission"),
        ("INSTALL httpfs", pb.FAILURE_REASON_DENIED, "INSTALL and LOAD are not allowed"),
        ("LOAD parquet", pb.FAILURE_REASON_DENIED, "INSTALL and LOAD are not allowed"),
        ("SELECT 1; ATTACH ':memory:' AS m", pb.FAILURE_REASON_DENIED, "ATTACH is not allowed"),
        ("DETACH memory", pb.FAILURE_REASON_DENIED, "DETACH is not allowed"),
        ("EXPORT DATABASE '/scratch/x'", pb.FAILURE_REASON_DENIED, "EXPORT DATABASE"),
        ("SET threads = 64", pb.FAILURE_REASON_SQL, "configuration has been locked"),
        ("RESET memory_limit", pb.FAILURE_REASON_SQL, "configuration has been locked"),
        ("COPY (SELECT 1) TO '/tmp/out.csv'", pb.FAILURE_REASON_SQL, "Permission Error"),
        ("SELECT * FROM glob('/*')", pb.FAILURE_REASON_SQL, "Permission Error"),
        ("SELEC 1", pb.FAILURE_REASON_SQL, "Parser Error"),
        ("", pb.FAILURE_REASON_SQL, "no SQL statement"),
    ],
)
def test_hostile_or_bad_sql_is_refused(
    service: RunnerService, sql: str, reason: int, message: str
) -> None:
    _, last = execute(service, sql)
    assert last.HasField("failure")
    assert last.failure.reason == reason
    assert message in last.failure.message
    # The connection stays usable after every refusal.
    rows, _ = execute(service, "SELECT 1 AS ok")
    assert rows == [{"ok": 1}]


def test_scratch_is_writable(service: RunnerService, dirs: RunnerConfig) -> None:
    _, last = execute(service, f"COPY (SELECT 1 AS a) TO '{dirs.scratch_dir}/out.csv'")
    assert last.HasField("summary")
    assert (Path(dirs.scratch_dir) / "out.csv").exists()


def test_multi_statement_streams_the_last_result(service: RunnerService) -> None:
    rows, last = execute(service, "CREATE TEMP TABLE t AS SELECT 3 AS v; SELECT v * 2 AS w FROM t")
    assert rows == [{"w": 6}]
    assert last.summary.statement_type == "SELECT"


def test_result_limits(service: RunnerService) -> None:
    _, last = execute(service, "FROM range(5000)", max_rows=100)
    assert last.failure.reason == pb.FAILURE_REASON_RESULT_LIMIT
    _, last = execute(service, "FROM range(5000)", max_bytes=1000)
    assert last.failure.reason == pb.FAILURE_REASON_RESULT_LIMIT
    rows, _ = execute(service, "SELECT 1 AS ok")  # a half-read result was cleaned up
    assert rows == [{"ok": 1}]


def test_statement_timeout_interrupts(service: RunnerService) -> None:
    _, last = execute(service, "SELECT sum(hash(range)) FROM range(100000000000)")
    assert last.failure.reason == pb.FAILURE_REASON_TIMEOUT


class _Hooked:
    """A connection that calls ``hook(sql)`` after each ``execute`` it passes on, and before
    each ``sql`` (the call that starts a query's last statement)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, hook: Callable[[str], None]) -> None:
        self._con, self._hook = con, hook

    def execute(self, sql: str, *args: object) -> duckdb.DuckDBPyConnection:
        result = self._con.execute(sql, *args)
        self._hook(sql)
        return result

    def sql(self, query: str, **kwargs: object) -> duckdb.DuckDBPyRelation:
        self._hook(query)
        return self._con.sql(query, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._con, name)


def test_a_cancel_between_two_statements_is_not_lost(dirs: RunnerConfig) -> None:
    """DuckDB forgets an interrupt that finds nothing running: the runner checks between
    statements, so nothing after the cancel runs (before, the rest ran and succeeded, and a
    long statement ran on to the timeout)."""
    service: RunnerService

    def cancel_after_the_first(sql: str) -> None:
        if sql.startswith("CREATE TEMP TABLE"):
            service.Cancel(pb.CancelRequest(query_id="q"), _Context())

    hooked = _Hooked(open_locked(dirs), cancel_after_the_first)
    service = RunnerService(hooked, default_timeout_s=2, batch_rows=1024, config=dirs)  # type: ignore[arg-type]
    _, last = execute(
        service, "CREATE TEMP TABLE t AS SELECT 1; CREATE TEMP TABLE u AS SELECT 2; SELECT 3"
    )
    assert last.failure.reason == pb.FAILURE_REASON_CANCELLED
    tables = execute(service, "SELECT table_name FROM duckdb_tables() ORDER BY 1")[0]
    assert tables == [{"table_name": "t"}]


def test_a_cancel_during_the_lock_waits_for_it_and_breaks_nothing(dirs: RunnerConfig) -> None:
    """The lock's SETs run under the state lock, so a cancel cannot interrupt one half-way
    (that left the sandbox broken: "could not be locked (INTERRUPT Error ...)")."""
    service: RunnerService
    held: list[bool] = []
    cancels: list[threading.Thread] = []

    def cancel_during_the_lock(sql: str) -> None:
        if sql.startswith("SET ") and not held:
            cancel = threading.Thread(
                target=service.Cancel, args=(pb.CancelRequest(query_id="q"), _Context())
            )
            cancel.start()
            cancels.append(cancel)
        if sql.startswith("SET "):
            held.append(service._state.locked())

    hooked = _Hooked(open_locked(dirs), cancel_during_the_lock)
    service = RunnerService(hooked, default_timeout_s=2, batch_rows=1024, config=dirs)  # type: ignore[arg-type]
    _, last = execute(service, "SELECT sum(hash(range)) FROM range(100000000000)")
    cancels[0].join()
    assert held and all(held)
    assert last.failure.reason == pb.FAILURE_REASON_CANCELLED
    assert execute(service, "SELECT 2 AS b")[0] == [{"b": 2}]


def test_a_cancel_just_before_the_last_statement_starts_is_not_lost(dirs: RunnerConfig) -> None:
    """The interrupt finds nothing running and DuckDB forgets it; the runner repeats it until
    the query ends, so the statement that starts next is stopped (it ran to the timeout)."""
    service: RunnerService
    long_sql = "SELECT sum(hash(range)) FROM range(300000000)"  # a few seconds if not stopped

    def cancel_before_the_last(sql: str) -> None:
        if sql == long_sql:
            assert service.Cancel(pb.CancelRequest(query_id="q"), _Context()).interrupted

    dirs = replace(dirs, statement_timeout_ms=600_000)  # only the cancel may stop it
    hooked = _Hooked(open_locked(dirs), cancel_before_the_last)
    service = RunnerService(hooked, default_timeout_s=600, batch_rows=1024, config=dirs)  # type: ignore[arg-type]
    _, last = execute(service, long_sql)
    assert last.failure.reason == pb.FAILURE_REASON_CANCELLED


def test_a_cancel_as_the_query_starts_is_not_lost(dirs: RunnerConfig) -> None:
    """Checking the early-cancel list and taking the query are one step under the state lock:
    a Cancel right after it finds the query (before, it could land between the two, be filed
    as early, and the query ran)."""
    dirs = replace(dirs, statement_timeout_ms=600_000)  # only the cancel may stop it
    service = RunnerService(open_locked(dirs), default_timeout_s=600, batch_rows=1024, config=dirs)
    real = service._state

    class CancelAfterFirstRelease:
        def __init__(self) -> None:
            self.released = 0

        def __enter__(self) -> None:
            real.acquire()

        def __exit__(self, *exc: object) -> None:
            real.release()
            self.released += 1
            if self.released == 1:
                service.Cancel(pb.CancelRequest(query_id="q"), _Context())

    service._state = CancelAfterFirstRelease()  # type: ignore[assignment]
    _, last = execute(service, "SELECT sum(hash(range)) FROM range(300000000)")  # a few seconds
    assert last.failure.reason == pb.FAILURE_REASON_CANCELLED


@pytest.mark.parametrize(
    ("stop", "reason"),
    [("cancel", pb.FAILURE_REASON_CANCELLED), ("timeout", pb.FAILURE_REASON_TIMEOUT)],
)
def test_a_stop_while_the_result_streams_ends_it_with_its_reason(
    service: RunnerService, stop: str, reason: int
) -> None:
    """DuckDB sees the interrupt between batches, and Arrow's reader raises it as OSError:
    it ends the stream with a failure chunk (it escaped Execute as an error, which the
    launcher took for a lost sandbox)."""
    chunks = service.Execute(
        pb.ExecuteRequest(query_id="q", sql="SELECT range AS x FROM range(10000000)"), _Context()
    )
    assert [next(chunks).HasField("ipc") for _ in range(3)] == [True, True, True]
    if stop == "cancel":
        assert service.Cancel(pb.CancelRequest(query_id="q"), _Context()).interrupted
    else:
        assert service._stop("q", pb.FAILURE_REASON_TIMEOUT)  # what the query's timer calls
    last = list(chunks)[-1]
    assert last.failure.reason == reason, last
    assert execute(service, "SELECT 2 AS b")[0] == [{"b": 2}]


def test_a_sql_error_after_the_first_batches_is_reported_as_one(service: RunnerService) -> None:
    sql = "SELECT CASE WHEN range < 200000 THEN '1' ELSE 'x' END::INTEGER AS v FROM range(400000)"
    chunks = list(service.Execute(pb.ExecuteRequest(query_id="q", sql=sql), _Context()))
    assert sum(c.HasField("ipc") for c in chunks) > 2  # the error came after batches went
    assert chunks[-1].failure.reason == pb.FAILURE_REASON_SQL
    assert "Conversion Error" in chunks[-1].failure.message


def test_a_query_whose_caller_left_while_it_waited_does_not_run(dirs: RunnerConfig) -> None:
    """gRPC refuses a callback once the RPC ended (the caller left while the query waited
    for the connection): the query is stopped before it runs anything."""
    service = RunnerService(open_locked(dirs), default_timeout_s=60, batch_rows=1024, config=dirs)
    chunks = list(
        service.Execute(
            pb.ExecuteRequest(query_id="q", sql="CREATE TEMP TABLE t AS SELECT 1"),
            _Context(active=False),
        )
    )
    assert chunks[-1].failure.reason == pb.FAILURE_REASON_CANCELLED
    tables = execute(service, "SELECT table_name FROM duckdb_tables()")[0]
    assert tables == []


def test_large_batches_are_cut_below_the_message_cap(service: RunnerService) -> None:
    chunks = list(
        service.Execute(
            pb.ExecuteRequest(query_id="q", sql="SELECT repeat('x', 1000) AS s FROM range(20000)"),
            _Context(),
        )
    )
    assert max(len(c.ipc) for c in chunks if c.HasField("ipc")) < 5 * 1024 * 1024
    assert chunks[-1].summary.rows == 20000


# --- table bindings and the lock they set ------------------------------------------------------


def binding(dirs: RunnerConfig, name: str, *files: str, fmt: str = "parquet") -> pb.TableBinding:
    return pb.TableBinding(name=name, format=fmt, paths=[f"{dirs.cache_dir}/{f}" for f in files])


def test_the_first_query_is_locked_before_it_runs(service: RunnerService) -> None:
    """Start-up leaves the configuration open for the lock; the first query finds it locked."""
    _, last = execute(service, "SET threads = 64")
    assert last.failure.reason == pb.FAILURE_REASON_SQL
    assert "configuration has been locked" in last.failure.message


def test_bound_tables_read_their_files_and_nothing_else(
    service: RunnerService, dirs: RunnerConfig
) -> None:
    trips = binding(dirs, "trips", "a.parquet", "b.parquet")
    zones = binding(dirs, "Zones", "zones.csv", fmt="csv")
    rows, _ = execute(
        service,
        "SELECT sum(x) AS total, (SELECT count(*) FROM zones) AS zones FROM trips",
        tables=[trips, zones],
    )
    assert rows == [{"total": 3, "zones": 2}]
    cache = dirs.cache_dir
    for sql in (
        f"SELECT * FROM '{cache}/other.parquet'",
        f"SELECT * FROM glob('{cache}/*')",
        f"SELECT * FROM read_parquet('{cache}/*.parquet')",
        f"COPY (SELECT 1) TO '{cache}/x.csv'",
        f"SELECT * FROM read_text('{cache}/zones.csv.bak')",
    ):
        _, last = execute(service, sql, tables=[trips])
        assert last.failure.reason == pb.FAILURE_REASON_SQL, sql
        assert "Permission Error" in last.failure.message, sql


def test_names_and_paths_are_quoted(service: RunnerService, dirs: RunnerConfig) -> None:
    odd = binding(dirs, 'we"ird name', "it's.parquet")
    rows, _ = execute(service, 'SELECT x FROM "we""ird name"', tables=[odd])
    assert rows == [{"x": 7}]


def test_a_locked_session_refuses_files_it_did_not_allow(
    service: RunnerService, dirs: RunnerConfig
) -> None:
    trips = binding(dirs, "trips", "a.parquet")
    rows, _ = execute(
        service, "CREATE TEMP TABLE kept AS SELECT 5 AS k; FROM trips", tables=[trips]
    )
    assert rows == [{"x": 1}]
    # The same table again, and no table at all, are fine; the session's state is kept.
    rows, _ = execute(service, "SELECT k, (SELECT x FROM trips) AS x FROM kept", tables=[trips])
    assert rows == [{"k": 5, "x": 1}]
    grown = binding(dirs, "trips", "a.parquet", "other.parquet")
    _, last = execute(service, "SELECT * FROM trips", tables=[grown])
    assert last.failure.reason == pb.FAILURE_REASON_DENIED
    assert "can read only the tables bound when its first query locked it" in last.failure.message
    assert "table trips" in last.failure.message
    rows, _ = execute(service, "SELECT k FROM kept")
    assert rows == [{"k": 5}]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pb.TableBinding(name="t", format="parquet", paths=["/etc/passwd"]), "not a normalised"),
        (pb.TableBinding(name="t", format="parquet", paths=["{cache}/../x"]), "not a normalised"),
        (pb.TableBinding(name="t", format="parquet", paths=["{cache}/*"]), "glob"),
        (pb.TableBinding(name="t", format="parquet", paths=["{cache}/[ab].parquet"]), "glob"),
        (pb.TableBinding(name="t", format="json", paths=["{cache}/a.parquet"]), "format 'json'"),
        (pb.TableBinding(name="t", format="parquet"), "has no files"),
        (pb.TableBinding(name="", format="parquet", paths=["{cache}/a.parquet"]), "no name"),
    ],
)
def test_bad_bindings_are_denied_before_anything_runs(
    service: RunnerService, dirs: RunnerConfig, table: pb.TableBinding, message: str
) -> None:
    paths = [path.format(cache=dirs.cache_dir) for path in table.paths]
    bad = pb.TableBinding(name=table.name, format=table.format, paths=paths)
    _, last = execute(service, "SELECT 1", tables=[bad])
    assert last.failure.reason == pb.FAILURE_REASON_DENIED
    assert message in last.failure.message
    # Nothing was locked by the refused request: a good first query still binds its table.
    rows, _ = execute(service, "FROM t", tables=[binding(dirs, "t", "b.parquet")])
    assert rows == [{"x": 2}]


def test_a_bad_file_fails_the_query_with_duckdbs_message(
    service: RunnerService, dirs: RunnerConfig
) -> None:
    _, last = execute(service, "FROM z", tables=[binding(dirs, "z", "zones.csv")])  # not parquet
    assert last.failure.reason == pb.FAILURE_REASON_SQL
    assert "zones.csv" in last.failure.message


def test_runner_client_sends_bindings_over_the_socket(dirs: RunnerConfig) -> None:
    """``RunnerClient.execute(tables=...)`` turns domain Bindings into the protocol's."""
    service = RunnerService(open_locked(dirs), default_timeout_s=2, batch_rows=1024, config=dirs)
    service.warm_up(0.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RunnerServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{dirs.socket_path}")
    server.start()

    async def body() -> list[dict[str, object]]:
        client = RunnerClient(f"unix://{dirs.socket_path}")
        paths = (f"{dirs.cache_dir}/a.parquet", f"{dirs.cache_dir}/b.parquet")
        stream = client.execute(
            query_id="q",
            sql="SELECT sum(x) AS total FROM trips",
            timeout_s=2,
            max_rows=None,
            max_bytes=None,
            tables=[Binding("trips", "parquet", paths)],
        )
        data = b"".join([item async for item in stream if isinstance(item, bytes)])
        await client.close()
        return ipc.open_stream(data).read_all().to_pylist()

    try:
        assert asyncio.run(body()) == [{"total": 3}]
    finally:
        server.stop(0)


def test_a_written_file_is_streamed_back_and_removed(
    service: RunnerService, dirs: RunnerConfig
) -> None:
    """With ``output_path`` the runner sends the file DuckDB wrote (after the COPY count, before
    the summary) in slices, and leaves nothing in /scratch."""
    out = f"{dirs.scratch_dir}/duckcell-out/q.parquet"
    select = "SELECT range AS i, md5(range::VARCHAR) || md5((-range)::VARCHAR) AS s"
    sql = f"COPY ({select} FROM range(40000)) TO '{out}'"  # ~2.5 MB, incompressible
    rows, last = execute(service, sql, output_path=out)
    chunks = list(
        service.Execute(pb.ExecuteRequest(query_id="q2", sql=sql, output_path=out), _Context())
    )
    kinds = [c.WhichOneof("kind") for c in chunks]
    assert rows == [{"Count": 40000}] and last.HasField("summary")
    first_output = kinds.index("output")
    assert set(kinds[:first_output]) == {"ipc"} and kinds[-1] == "summary"
    assert set(kinds[first_output:-1]) == {"output"} and len(kinds[first_output:-1]) > 1
    written = b"".join(c.output for c in chunks if c.HasField("output"))
    table = pq.read_table(pa.BufferReader(written))
    assert table.num_rows == 40000 and table.column("i").to_pylist()[-1] == 39999
    assert not Path(out).exists()


def test_a_failed_write_sends_no_output_and_removes_the_file(
    service: RunnerService, dirs: RunnerConfig
) -> None:
    out = f"{dirs.scratch_dir}/duckcell-out/q.parquet"
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(b"stale")  # a session's earlier query left one: never sent
    sql = f"COPY (SELECT CASE WHEN range > 5 THEN error('boom') END FROM range(10)) TO '{out}'"
    chunks = list(
        service.Execute(pb.ExecuteRequest(query_id="q", sql=sql, output_path=out), _Context())
    )
    assert not any(c.HasField("output") for c in chunks)
    assert (
        chunks[-1].failure.reason == pb.FAILURE_REASON_SQL and "boom" in chunks[-1].failure.message
    )
    assert not Path(out).exists()


@pytest.mark.parametrize("path", ["{scratch}/../victim", "{scratch}victim", "{scratch}/./x"])
def test_an_output_path_outside_scratch_is_denied_and_left_alone(
    service: RunnerService, dirs: RunnerConfig, path: str
) -> None:
    """A bad path is refused and never touched: the runner removes only a checked path."""
    out = path.format(scratch=dirs.scratch_dir)
    victim = Path(os.path.normpath(out))
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text("keep me")
    _, last = execute(service, "SELECT 1", output_path=out)
    assert last.failure.reason == pb.FAILURE_REASON_DENIED
    assert victim.read_text() == "keep me"


def test_runner_client_yields_output_chunks(dirs: RunnerConfig) -> None:
    """``RunnerClient.execute(output_path=...)`` sends the path and yields OutputChunks."""
    service = RunnerService(open_locked(dirs), default_timeout_s=2, batch_rows=1024, config=dirs)
    service.warm_up(0.0)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RunnerServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{dirs.socket_path}")
    server.start()
    out = f"{dirs.scratch_dir}/duckcell-out/q.parquet"

    async def body() -> list[object]:
        client = RunnerClient(f"unix://{dirs.socket_path}")
        stream = client.execute(
            query_id="q",
            sql=f"COPY (SELECT 7 AS x) TO '{out}'",
            timeout_s=2,
            max_rows=None,
            max_bytes=None,
            output_path=out,
        )
        items = [item async for item in stream]
        await client.close()
        return items

    try:
        items = asyncio.run(body())
    finally:
        server.stop(0)
    written = b"".join(i.data for i in items if isinstance(i, OutputChunk))
    assert pq.read_table(pa.BufferReader(written)).to_pylist() == [{"x": 7}]
    assert isinstance(items[-1], QuerySummary)


def test_the_parquet_warm_up_leaves_nothing_behind_and_the_sandbox_unlocked(
    service: RunnerService, dirs: RunnerConfig
) -> None:
    """``warm_up`` (the fixture ran it) wrote and read its file in /scratch, then removed it;
    the first tenant query still locks the sandbox (nothing was bound or locked early)."""
    assert os.listdir(dirs.scratch_dir) == []
    rows, _ = execute(service, "FROM a", tables=[binding(dirs, "a", "a.parquet")])
    assert rows == [{"x": 1}]
    _, last = execute(service, f"SELECT * FROM read_parquet('{dirs.cache_dir}/b.parquet')")
    assert last.failure.reason in (pb.FAILURE_REASON_SQL, pb.FAILURE_REASON_DENIED)
    assert "Permission Error" in last.failure.message


def test_the_parquet_warm_up_is_skipped_when_scratch_cannot_hold_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    con = duckdb.connect()
    assert warm_parquet(con, str(tmp_path), 1024)
    assert not warm_parquet(con, str(tmp_path / "missing"), 1024)
    assert "Parquet warm-up skipped" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    con.close()


def test_a_session_sandbox_is_locked_to_its_directory_not_to_files(dirs: RunnerConfig) -> None:
    session = RunnerConfig(**{**_fields(dirs), "session_dir": f"{dirs.cache_dir}/.sessions/i/s"})
    statements = lock_statements(session, ["/ignored.parquet"])
    assert statements[0] == (
        f"SET allowed_directories = ['{dirs.scratch_dir}/', '{session.session_dir}/']"
    )
    assert not any("allowed_paths" in statement for statement in statements)
    assert statements[-1] == "SET lock_configuration = true"


def test_a_session_binds_new_tables_from_its_directory_only(dirs: RunnerConfig) -> None:
    """Later queries may bind new files of the session directory (the launcher linked them);
    a file outside it is refused before binding, and SQL cannot climb out with ``..``."""
    session_dir = Path(dirs.cache_dir) / ".sessions" / "i" / "s"
    session_dir.mkdir(parents=True)
    for name in ("a.parquet", "b.parquet"):
        os.link(Path(dirs.cache_dir) / name, session_dir / name)
    config = RunnerConfig(**{**_fields(dirs), "session_dir": str(session_dir)})
    runner = RunnerService(open_locked(config), default_timeout_s=2, batch_rows=64, config=config)
    linked = f"{session_dir}/a.parquet"
    rows, _ = execute(
        runner,
        "FROM first",
        tables=[pb.TableBinding(name="first", format="parquet", paths=[linked])],
    )
    assert rows == [{"x": 1}]
    second = pb.TableBinding(name="second", format="parquet", paths=[f"{session_dir}/b.parquet"])
    rows, _ = execute(runner, "SELECT (FROM first) AS a, (FROM second) AS b", tables=[second])
    assert rows == [{"a": 1, "b": 2}]
    outside = binding(dirs, "other", "other.parquet")
    _, last = execute(runner, "FROM other", tables=[outside])
    assert last.failure.reason == pb.FAILURE_REASON_DENIED
    assert "not a normalised path under" in last.failure.message
    for sql in (
        f"SELECT * FROM '{dirs.cache_dir}/other.parquet'",
        f"SELECT * FROM '{session_dir}/../../../other.parquet'",
        f"SELECT * FROM glob('{dirs.cache_dir}/**')",
    ):
        _, last = execute(runner, sql)
        assert "Permission Error" in last.failure.message, sql


def _session_runner(dirs: RunnerConfig) -> tuple[RunnerService, Path]:
    session_dir = Path(dirs.cache_dir) / ".sessions" / "i" / "s"
    session_dir.mkdir(parents=True)
    os.link(Path(dirs.cache_dir) / "a.parquet", session_dir / "a.parquet")
    config = RunnerConfig(**{**_fields(dirs), "session_dir": str(session_dir)})
    runner = RunnerService(open_locked(config), default_timeout_s=2, batch_rows=64, config=config)
    return runner, session_dir


def test_a_session_attaches_in_memory_databases_and_nothing_else(dirs: RunnerConfig) -> None:
    """ATTACH ':memory:' AS name (and DETACH) run in a session sandbox; a path, an option or
    an extension-backed type stay refused, as every ATTACH in a per-query sandbox is."""
    runner, session_dir = _session_runner(dirs)
    for sql in (
        "ATTACH ':memory:' AS scratchpad",
        "CREATE TABLE scratchpad.notes AS SELECT 5 AS n",
        "ATTACH IF NOT EXISTS ':memory:' AS \"other db\";",
        "ATTACH DATABASE ':memory:' AS third",
    ):
        _, last = execute(runner, sql)
        assert not last.HasField("failure"), (sql, last.failure.message)
    rows, _ = execute(runner, "SELECT n FROM scratchpad.notes")
    assert rows == [{"n": 5}]
    _, last = execute(runner, "DETACH scratchpad")
    assert not last.HasField("failure")
    _, last = execute(runner, "SELECT n FROM scratchpad.notes")
    assert last.failure.reason == pb.FAILURE_REASON_SQL  # gone with its database
    for sql in (
        "DETACH duckcell",
        'detach database if exists "DUCKCELL";',
        "DETACH /* x */ duckcell",
        "DETACH duckcell -- x",
    ):
        _, last = execute(runner, sql)
        assert last.failure.reason == pb.FAILURE_REASON_DENIED, sql
        assert "stays attached" in last.failure.message
    for sql in (
        f"ATTACH '{session_dir}/x.db' AS f",
        f"ATTACH '{session_dir}/a.parquet' AS f",
        "ATTACH ':memory:' AS f (READ_ONLY)",
        "ATTACH ':memory:' AS f (TYPE sqlite)",
        "ATTACH 'md:' AS f",
        "ATTACH ':memory:' AS f; ATTACH '/etc/passwd' AS g",
        "ATTACH ':memory:' AS f -- trailing",
    ):
        _, last = execute(runner, sql)
        assert last.failure.reason == pb.FAILURE_REASON_DENIED, sql
        assert "may only ATTACH ':memory:' AS name" in last.failure.message, sql
    assert not (session_dir / "x.db").exists()


def test_the_catalog_clients_are_shown_names_the_bound_tables(
    dirs: RunnerConfig, service: RunnerService
) -> None:
    """Flight SQL shows tables as duckcell.main.<name>: that name works in SQL, per query (its
    database attached at warm-up, or at the lock when there was none) and in a session, next
    to the bare name."""
    tables = [binding(dirs, "a", "a.parquet")]
    rows, _ = execute(service, "SELECT x FROM duckcell.main.a UNION ALL FROM a", tables=tables)
    assert rows == [{"x": 1}, {"x": 1}]
    runner = RunnerService(open_locked(dirs), default_timeout_s=2, batch_rows=64, config=dirs)
    rows, _ = execute(runner, "SELECT x FROM duckcell.main.a UNION ALL FROM a", tables=tables)
    assert rows == [{"x": 1}, {"x": 1}]
    session, session_dir = _session_runner(dirs)
    linked = pb.TableBinding(name="a", format="parquet", paths=[f"{session_dir}/a.parquet"])
    rows, _ = execute(session, "SELECT x FROM duckcell.main.a", tables=[linked])
    assert rows == [{"x": 1}]


def test_a_session_directory_outside_the_cache_breaks_the_sandbox(dirs: RunnerConfig) -> None:
    config = RunnerConfig(**{**_fields(dirs), "session_dir": dirs.cache_dir})
    runner = RunnerService(open_locked(config), default_timeout_s=2, batch_rows=64, config=config)
    _, last = execute(runner, "SELECT 1")
    assert last.failure.reason == pb.FAILURE_REASON_INTERNAL
    assert "could not be locked" in last.failure.message


def _fields(config: RunnerConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in RunnerConfig.__dataclass_fields__}


def test_the_launcher_and_the_runner_agree_on_the_result_streams_flow_control() -> None:
    """A fixed window with bandwidth-delay probing off, on both ends (the fastest of the
    combinations tried); the window also bounds what a runner sends ahead."""
    from duckcell_runner.__main__ import FLOW_CONTROL as RUNNER_SIDE
    from launcher.sandbox.runner_client import FLOW_CONTROL as LAUNCHER_SIDE

    assert dict(RUNNER_SIDE) == dict(LAUNCHER_SIDE)
    assert dict(LAUNCHER_SIDE) == {
        "grpc.http2.bdp_probe": 0,
        "grpc.http2.lookahead_bytes": 8 * 1024 * 1024,
    }
