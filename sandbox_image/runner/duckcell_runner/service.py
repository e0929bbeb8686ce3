"""The Runner gRPC service: runs SQL on the locked connection and streams Arrow IPC.

One query runs at a time on the sandbox's single connection (a session's queries queue behind
each other). The first Execute locks the connection before any of its SQL runs: file access
becomes /scratch plus the files of that query's catalog tables, which are then bound as temp
views. A per-query sandbox serves no later query. A session's sandbox is locked to its session
directory instead (``lockdown``): each of its queries may bind any file the launcher linked
there, and nothing outside it.

A query that writes (the launcher rewrote a ``COPY ... TO 's3://...'`` to a file under
/scratch and named it in ``output_path``) gets that file streamed back as ``output`` chunks once
DuckDB has closed it, before the Summary; the file is removed whatever happens. The runner never
uploads anything: the sandbox has no network and no credentials, the launcher does the upload.

Three things can stop a running query from here: the statement timeout (a timer that interrupts
DuckDB, beside DuckDB's own ``max_execution_time``, which does not stop every long call), a
Cancel RPC, and the caller going away (the RPC's termination callback).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import duckdb
import grpc
import pyarrow as pa
import pyarrow.ipc as ipc

from launcher.protocol import runner_pb2 as pb
from launcher.protocol import runner_pb2_grpc as pb_grpc

from . import __version__
from .lockdown import RunnerConfig, lock_statements, path_problem, session_dir_problem
from .warmup import warm_parquet

# Statements a sandbox never runs, whatever the locked configuration would say. ATTACH is
# here because DuckDB allows attaching a database file inside an allowed directory; a session
# sandbox makes one exception, an in-memory database (``_ATTACH_MEMORY``), and may DETACH.
_DENIED = {
    "ATTACH": "ATTACH is not allowed in a duckcell sandbox; query catalog tables instead",
    "DETACH": "DETACH is not allowed in a duckcell sandbox",
    "LOAD": "INSTALL and LOAD are not allowed in a duckcell sandbox; extensions are fixed "
    "by the sandbox image",
    "EXPORT": "EXPORT DATABASE is not allowed in a duckcell sandbox",
    "COPY_DATABASE": "COPY FROM DATABASE is not allowed in a duckcell sandbox",
}
# The one ATTACH a session sandbox runs: a new in-memory database under a plain name, no
# options (no TYPE, no READ_ONLY, no path). Matched on the statement's whole text.
_ATTACH_MEMORY = re.compile(
    r"\s*ATTACH\s+(?:DATABASE\s+)?(?:IF\s+NOT\s+EXISTS\s+)?':memory:'\s+AS\s+"
    r"(?:[A-Za-z_][A-Za-z0-9_]*|\"[^\"\x00]{1,64}\")\s*;?\s*",
    re.IGNORECASE,
)
_SESSION_ALLOWED = {"ATTACH", "DETACH"}
# The one DETACH a session sandbox runs: a plain or quoted name, nothing else (no comment).
_DETACH = re.compile(
    r"\s*DETACH\s+(?:DATABASE\s+)?(?:IF\s+EXISTS\s+)?"
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*|\"[^\"\x00]{1,64}\")\s*;?\s*",
    re.IGNORECASE,
)
# The catalog name Flight SQL clients are shown (``launcher.flight``): every bound table is
# also a view in this in-memory database, so ``duckcell.main.trips`` works in SQL.
_CATALOG = "duckcell"
# Statement types whose rows come from a lazy relation (no extra copy); others are
# executed directly and their (small) result read afterwards.
_QUERY_TYPES = {"SELECT", "EXPLAIN"}
# Keep each gRPC message well under clients' 16 MiB default.
_MAX_CHUNK_BYTES = 4 * 1024 * 1024
_OUTPUT_CHUNK_BYTES = 1024 * 1024
# How often a stopped query's interrupt is repeated until the query ends: DuckDB forgets an
# interrupt that finds nothing running, which a stop landing between two calls into it does.
_REINTERRUPT_S = 0.02
_READERS = {"parquet": "read_parquet", "csv": "read_csv"}
_SESSION_LOCKED = (
    "Permission Error: this session's sandbox can read only the tables bound when its first "
    "query locked it, and table {name} was not among them (or its files have changed since); "
    "open a new session to query it"
)


class QueryFailed(Exception):
    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(slots=True)
class _Running:
    query_id: str
    stop_reason: int = pb.FAILURE_REASON_UNSPECIFIED
    ended: threading.Event = field(default_factory=threading.Event)  # set under the state lock


class _ChunkSink:
    """File-like sink for the IPC writer; hands back what was written since the last take."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _statement_kind(statement: duckdb.Statement) -> str:
    return str(statement.type).rsplit(".", 1)[-1]


def _parameters(data: bytes) -> list[object] | None:
    """The values an ExecuteRequest binds to the last statement's placeholders, from its one
    Arrow row (None: no parameters). DuckDB binds them; they never become SQL text."""
    if not data:
        return None
    try:
        table = ipc.open_stream(data).read_all()
    except pa.ArrowException as error:
        raise QueryFailed(pb.FAILURE_REASON_SQL, f"unreadable query parameters: {error}") from None
    if table.num_rows != 1:
        raise QueryFailed(
            pb.FAILURE_REASON_SQL, f"expected one row of query parameters, got {table.num_rows}"
        )
    return [column[0].as_py() for column in table.columns]


def _batches(reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
    """The reader's batches. An error DuckDB raises while streaming (an interrupt between
    batches, a cast that fails on a later row) reaches Arrow's reader as ``OSError`` or
    ``ArrowException`` carrying DuckDB's message: it is raised again as the duckdb error the
    message names, so it is reported like one raised before the first batch."""
    batches = iter(reader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as error:
            message = str(error)
            if message.startswith("INTERRUPT Error"):
                raise duckdb.InterruptException(message) from None
            if message.startswith("Out of Memory Error"):
                raise duckdb.OutOfMemoryException(message) from None
            raise duckdb.Error(message) from None
        yield batch


def _stopped(reason: int, detail: str) -> QueryFailed:
    """How a stopped query fails: cancelled, or else (the timer, DuckDB's own limit) timed out."""
    if reason == pb.FAILURE_REASON_CANCELLED:
        return QueryFailed(reason, "query cancelled")
    return QueryFailed(pb.FAILURE_REASON_TIMEOUT, f"statement timeout: {detail}")


def _slices(batch: pa.RecordBatch) -> Iterator[pa.RecordBatch]:
    if batch.nbytes <= _MAX_CHUNK_BYTES or batch.num_rows <= 1:
        yield batch
        return
    parts = -(-batch.nbytes // _MAX_CHUNK_BYTES)
    step = max(1, -(-batch.num_rows // parts))
    for offset in range(0, batch.num_rows, step):
        yield batch.slice(offset, step)


class RunnerService(pb_grpc.RunnerServicer):
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        *,
        default_timeout_s: float,
        batch_rows: int,
        config: RunnerConfig | None = None,
    ) -> None:
        self._con = con
        self._config = config if config is not None else RunnerConfig.from_env()
        self._allowed: frozenset[str] | None = None  # set by the first Execute's lock
        self._catalog_attached = False  # the `duckcell` database (``_attach_catalog``)
        self._broken: str | None = None  # the lock failed half-way: serve nothing more
        self._default_timeout_s = default_timeout_s
        self._batch_rows = batch_rows
        self._warmup_ipc = b""
        self._startup_seconds = 0.0
        self._exclusive = threading.Lock()  # one query at a time on the connection
        self._state = threading.Lock()  # guards _running
        self._running: _Running | None = None
        self._cancelled_early: deque[str] = deque(maxlen=256)

    def warm_up(self, started: float) -> None:
        """Scan a small Parquet file (``warmup``), then run one query through the whole Execute
        path, so a tenant's first query is not cold. Before the lock; no tenant SQL yet."""
        warm_parquet(self._con, self._config.scratch_dir, self._batch_rows)
        self._attach_catalog()  # here, in the pool, not on the first query's path (~1 ms)
        request = pb.ExecuteRequest(query_id="warmup", sql="SELECT 42::INTEGER AS answer")
        chunks = list(self._execute(request, _Running("warmup")))
        if not chunks or not chunks[-1].HasField("summary"):
            raise RuntimeError("runner warm-up query failed")
        self._warmup_ipc = b"".join(chunk.ipc for chunk in chunks if chunk.HasField("ipc"))
        self._startup_seconds = time.perf_counter() - started

    def _attach_catalog(self) -> None:
        """Attach the in-memory database named as the catalog clients are shown (once)."""
        if not self._catalog_attached:
            self._con.execute(f"ATTACH ':memory:' AS {_CATALOG}")
            self._catalog_attached = True

    # --- RPCs -------------------------------------------------------------------------
    def Ready(self, request: pb.ReadyRequest, context: grpc.ServicerContext) -> pb.ReadyReply:
        return pb.ReadyReply(
            runner_version=__version__,
            duckdb_version=duckdb.__version__,
            warmup_ipc=self._warmup_ipc,
            startup_seconds=self._startup_seconds,
        )

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelReply:
        interrupted = self._stop(request.query_id, pb.FAILURE_REASON_CANCELLED)
        if not interrupted:
            # The query may not have reached us yet (or waits behind another): remember it.
            with self._state:
                self._cancelled_early.append(request.query_id)
        return pb.CancelReply(interrupted=interrupted)

    def Execute(
        self, request: pb.ExecuteRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteChunk]:
        with self._exclusive:
            # One line per query for `docker logs`: its id, never its SQL.
            print(f"runner: query {request.query_id} started", file=sys.stderr, flush=True)
            running = _Running(request.query_id)
            with self._state:  # one step: a Cancel sees either the early list or the query
                cancelled = request.query_id in self._cancelled_early
                if not cancelled:
                    self._running = running
            if cancelled:
                yield pb.ExecuteChunk(
                    failure=pb.Failure(
                        reason=pb.FAILURE_REASON_CANCELLED, message="query cancelled"
                    )
                )
                return
            # The RPC ending early (client cancel, launcher gone) must stop DuckDB too; if it
            # ended while this query waited for the connection, the query is already stopped.
            stop = lambda: self._stop(running.query_id, pb.FAILURE_REASON_CANCELLED)  # noqa: E731
            if not context.add_callback(stop):
                stop()
            timeout_s = request.timeout_seconds or self._default_timeout_s
            timer = threading.Timer(
                timeout_s, self._stop, (running.query_id, pb.FAILURE_REASON_TIMEOUT)
            )
            timer.daemon = True
            timer.start()
            output = ""  # set only once the path is checked: never remove an unchecked one
            try:
                self._prepare(request.tables, running)
                output = self._clear_output(request.output_path)
                yield from self._execute(request, running)
            except QueryFailed as failed:
                yield pb.ExecuteChunk(
                    failure=pb.Failure(reason=failed.reason, message=failed.message)
                )
            finally:
                timer.cancel()
                if output:
                    with contextlib.suppress(OSError):
                        os.unlink(output)
                with self._state:
                    running.ended.set()
                    self._running = None

    # --- internals ----------------------------------------------------------------------
    def _prepare(self, tables: Sequence[pb.TableBinding], running: _Running) -> None:
        """Lock the sandbox (first query) or check the lock covers ``tables``, then bind them."""
        if self._broken is not None:
            raise QueryFailed(pb.FAILURE_REASON_INTERNAL, self._broken)
        for table in tables:
            problem = self._binding_problem(table)
            if problem is not None:
                raise QueryFailed(pb.FAILURE_REASON_DENIED, f"Permission Error: {problem}")
        paths = {path for table in tables for path in table.paths}
        if self._allowed is None:
            unusable = session_dir_problem(self._config)
            if unusable is not None:
                self._broken = f"the sandbox could not be locked ({unusable}); it serves no query"
                raise QueryFailed(pb.FAILURE_REASON_INTERNAL, self._broken)
            try:
                # Under the state lock: a cancel or timeout waits the few SETs out rather than
                # interrupting one and leaving the sandbox half-locked (it is seen just below).
                with self._state:
                    self._attach_catalog()  # done already unless warm-up was skipped
                    for statement in lock_statements(self._config, sorted(paths)):
                        self._con.execute(statement)
            except duckdb.Error as error:
                self._broken = f"the sandbox could not be locked ({error}); it serves no query"
                raise QueryFailed(pb.FAILURE_REASON_INTERNAL, self._broken) from None
            self._allowed = frozenset(paths)
        self._check_stopped(running)
        for table in tables:
            # A session directory's lock covers every path path_problem let through.
            if not self._config.session_dir and not self._allowed.issuperset(table.paths):
                raise QueryFailed(pb.FAILURE_REASON_DENIED, _SESSION_LOCKED.format(name=table.name))
        try:
            for table in tables:
                files = ", ".join(_quote(path) for path in table.paths)
                name = _identifier(table.name)
                self._con.execute(
                    f"CREATE OR REPLACE TEMP VIEW {name} AS "
                    f"SELECT * FROM {_READERS[table.format]}([{files}])"
                )
                self._con.execute(
                    f"CREATE OR REPLACE VIEW {_CATALOG}.main.{name} AS "
                    f"SELECT * FROM temp.main.{name}"
                )
        except duckdb.Error as error:
            raise self._translate(error, running) from None

    def _check_stopped(self, running: _Running) -> None:
        """Raise if the query was stopped. Called where DuckDB is not running (between
        statements, between result chunks and output slices): an interrupt that finds nothing
        running is forgotten, so without this the query would go on."""
        with self._state:
            reason = running.stop_reason
        if reason != pb.FAILURE_REASON_UNSPECIFIED:
            raise _stopped(reason, "query interrupted")

    def _binding_problem(self, table: pb.TableBinding) -> str | None:
        if not table.name or "\0" in table.name:
            return "a table binding has no name"
        if table.format not in _READERS:
            return f"table {table.name} has format {table.format!r}; expected parquet or csv"
        if not table.paths:
            return f"table {table.name} has no files to read"
        for path in table.paths:
            problem = path_problem(self._config, path)
            if problem is not None:
                return f"table {table.name}: {problem}"
        return None

    def _stop(self, query_id: str, reason: int) -> bool:
        with self._state:
            running = self._running
            if running is None or running.ended.is_set() or running.query_id != query_id:
                return False
            first = running.stop_reason == pb.FAILURE_REASON_UNSPECIFIED
            if first:
                running.stop_reason = reason
            # Under the lock: a late timer or cancel must not interrupt the next query.
            self._con.interrupt()
        if first:
            threading.Thread(target=self._keep_interrupting, args=(running,), daemon=True).start()
        return True

    def _keep_interrupting(self, running: _Running) -> None:
        """Repeat a stopped query's interrupt until it ends: one that landed while no DuckDB
        call ran (between two statements, before a reader's first fetch) is forgotten."""
        while not running.ended.wait(_REINTERRUPT_S):
            with self._state:
                if running.ended.is_set():
                    return
                self._con.interrupt()

    def _execute(self, request: pb.ExecuteRequest, running: _Running) -> Iterator[pb.ExecuteChunk]:
        started = time.perf_counter()
        statements = self._parse(request.sql)
        last = statements[-1]
        kind = _statement_kind(last)
        params = _parameters(request.parameters)
        reader: pa.RecordBatchReader | None = None
        try:
            for statement in statements[:-1]:
                self._check_stopped(running)
                # Every execute() result must be run to its end before the next statement.
                self._con.execute(statement.query).complete()
            self._check_stopped(running)
            if kind in _QUERY_TYPES:
                batch_rows = request.batch_rows or self._batch_rows
                reader = self._con.sql(last.query, params=params).to_arrow_reader(batch_rows)
            else:
                # Non-SELECT results (a row count) are tiny: the copy DuckDB warns of is moot.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    reader = self._con.execute(last.query, params).to_arrow_reader()
            rows, sent = 0, 0
            for data, chunk_rows in self._ipc_chunks(reader):
                self._check_stopped(running)  # a result DuckDB finished still honours a stop
                rows += chunk_rows
                sent += len(data)
                self._check_limits(request, rows, sent)
                yield pb.ExecuteChunk(ipc=data)
            if request.output_path:
                yield from self._output_chunks(request.output_path, running)
        except duckdb.Error as error:
            raise self._translate(error, running) from None
        finally:
            # A half-read result keeps the connection busy until it is destroyed.
            if reader is not None:
                reader.close()
                del reader
        yield pb.ExecuteChunk(
            summary=pb.Summary(
                rows=rows,
                ipc_bytes=sent,
                execute_seconds=time.perf_counter() - started,
                statement_type=kind,
            )
        )

    def _clear_output(self, path: str) -> str:
        """The launcher's output path once checked to be a file under /scratch, with room made
        for it (a session may reuse one); "" when the query writes no file."""
        if not path:
            return ""
        scratch = self._config.scratch_dir.rstrip("/") + "/"
        if not path.startswith(scratch) or os.path.normpath(path) != path or "\0" in path:
            raise QueryFailed(
                pb.FAILURE_REASON_DENIED,
                f"Permission Error: output path {path!r} is not a normalised path under {scratch}",
            )
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as error:
            raise QueryFailed(
                pb.FAILURE_REASON_INTERNAL, f"cannot prepare the output file: {error}"
            ) from None
        return path

    def _output_chunks(self, path: str, running: _Running) -> Iterator[pb.ExecuteChunk]:
        """The written file in slices; DuckDB closed it when the COPY statement finished."""
        try:
            with open(path, "rb") as written:
                while data := written.read(_OUTPUT_CHUNK_BYTES):
                    self._check_stopped(running)
                    yield pb.ExecuteChunk(output=data)
        except FileNotFoundError:
            raise QueryFailed(
                pb.FAILURE_REASON_SQL,
                "the query wrote no output file; write with COPY (SELECT ...) TO 's3://...'",
            ) from None

    def _parse(self, sql: str) -> list[duckdb.Statement]:
        try:
            statements = self._con.extract_statements(sql)
        except duckdb.Error as error:
            raise QueryFailed(pb.FAILURE_REASON_SQL, str(error)) from None
        if not statements:
            raise QueryFailed(pb.FAILURE_REASON_SQL, "no SQL statement given")
        for statement in statements:
            kind = _statement_kind(statement)
            denied = _DENIED.get(kind)
            if denied and self._session_allows(kind, statement):
                continue
            if denied:
                raise QueryFailed(pb.FAILURE_REASON_DENIED, f"Permission Error: {denied}")
        return statements

    def _session_allows(self, kind: str, statement: duckdb.Statement) -> bool:
        """A session sandbox attaches in-memory databases (nothing else) and detaches them."""
        if not self._config.session_dir or kind not in _SESSION_ALLOWED:
            return False
        if kind == "DETACH":
            detach = _DETACH.fullmatch(statement.query)
            if detach is None or detach["name"].strip('"').lower() == _CATALOG:
                raise QueryFailed(
                    pb.FAILURE_REASON_DENIED,
                    f"Permission Error: a session may DETACH what it attached (DETACH name); "
                    f"{_CATALOG} holds the catalog's tables and stays attached",
                )
            return True
        if _ATTACH_MEMORY.fullmatch(statement.query) is None:
            raise QueryFailed(
                pb.FAILURE_REASON_DENIED,
                "Permission Error: a session may only ATTACH ':memory:' AS name (an in-memory "
                "database, no options); files, URLs and extensions stay refused",
            )
        return True

    def _ipc_chunks(self, reader: pa.RecordBatchReader) -> Iterator[tuple[bytes, int]]:
        sink = _ChunkSink()
        with ipc.new_stream(sink, reader.schema) as writer:
            yield sink.take(), 0
            for batch in _batches(reader):
                for part in _slices(batch):
                    writer.write_batch(part)
                    yield sink.take(), part.num_rows
        yield sink.take(), 0  # end-of-stream marker

    @staticmethod
    def _check_limits(request: pb.ExecuteRequest, rows: int, sent: int) -> None:
        if request.max_rows and rows > request.max_rows:
            raise QueryFailed(
                pb.FAILURE_REASON_RESULT_LIMIT,
                f"result has more than {request.max_rows} rows (policy max_result_rows)",
            )
        if request.max_bytes and sent > request.max_bytes:
            raise QueryFailed(
                pb.FAILURE_REASON_RESULT_LIMIT,
                f"result is larger than {request.max_bytes} bytes (policy max_result_bytes)",
            )

    @staticmethod
    def _translate(error: duckdb.Error, running: _Running) -> QueryFailed:
        if isinstance(error, duckdb.InterruptException) or "maximum execution time" in str(error):
            return _stopped(running.stop_reason or pb.FAILURE_REASON_TIMEOUT, str(error))
        if isinstance(error, duckdb.OutOfMemoryException):
            return QueryFailed(pb.FAILURE_REASON_MEMORY, str(error))
        return QueryFailed(pb.FAILURE_REASON_SQL, str(error))
