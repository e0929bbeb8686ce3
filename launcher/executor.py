"""Run one query: a sandbox from the pool (or the session), the runner, the result stream.

Four things can end a query early and the caller is always told which: the runner's statement
timeout, the launcher's hard wall-clock kill (timeout plus a grace, for calls DuckDB cannot
interrupt), the container's memory limit (OOM kill, read back from the engine), and a cancel.
Per-query sandboxes are released (destroyed) whatever happened; a session's sandbox is kept
unless it was killed or lost. A sandbox reads its tables through a directory of its own:
before each query the query's leased files are linked there (``launcher.sandbox.files``), so
no sandbox can open another query's files, and a session may read a new table at any query.

A writing query (``TableFiles.write``, see ``launcher.data.writes``) runs its rewritten SQL; the
runner's output chunks are spooled on the host and uploaded only after the query succeeded and
its sandbox was released, and the write's one-row result replaces DuckDB's COPY count.

Tables prepared early (``DataPath.prepare(..., early=True)``) are bound to their last listings
while fresh LISTs run: a per-query sandbox starts at once, but no result byte leaves and no
upload starts before ``TableFiles.confirmed()``; when a listing changed, that sandbox is
destroyed and the query runs again, once, on fresh files. A session's sandbox keeps state
between queries, so a session query waits for the verdict before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import pyarrow as pa
import pyarrow.ipc

from .data.datapath import TableFiles
from .errors import (
    DuckcellError,
    MemoryLimitError,
    QueryCancelledError,
    QueryError,
    QueryTimeoutError,
    ResultLimitError,
    RunnerInvalidError,
    SandboxLostError,
    SqlError,
    runner_invalid,
)
from .model.catalog import Binding
from .model.policy import Isolation, Policy
from .sandbox.backend.base import SandboxBackend
from .sandbox.pool import SandboxPool
from .sandbox.result_check import ResultGuard
from .sandbox.runner_client import BATCH_ROWS, OutputChunk, QuerySummary, StreamBroken
from .sandbox.sessions import Session, SessionManager
from .sandbox.spec import Sandbox

log = logging.getLogger(__name__)

_EXIT_WAIT_S = 3.0
T = TypeVar("T")


@dataclass(slots=True)
class QueryRecord:
    """What happened to one query; the audit log and the CLI read it."""

    query_id: str
    policy: str
    sandbox: str = ""
    slot: str = ""
    session_id: str | None = None
    queued_s: float = 0.0  # waiting for a sandbox (or a session's turn), a rerun's wait added
    total_s: float = 0.0
    summary: QuerySummary | None = None
    outcome: str = "running"
    reruns: int = 0  # times prepared again: a table changed since its last listing (early)


class TablePreparer(Protocol):
    """What ``Executor.run_query`` needs of a data path (``launcher.data.datapath.DataPath``):
    a query's tables as leased files; nothing stays leased when it raises."""

    async def prepare(self, sql: str, policy: Policy, *, early: bool = False) -> TableFiles: ...


class QueryExecution:
    """One query's run. Iterate ``chunks()`` once; cancel with ``cancel()``; ``close()`` ends
    it however far it got (``Executor.run_query`` does that for its callers)."""

    def __init__(
        self,
        executor: Executor,
        sql: str,
        policy: Policy,
        session: Session | None,
        query_id: str,
        tables: TableFiles | None = None,
        parameters: bytes = b"",
    ) -> None:
        self._executor = executor
        self._parameters = parameters
        self._tables = tables if tables is not None else TableFiles()
        write = self._tables.write
        self._original_sql = sql
        self._sql = write.plan.sql if write is not None else sql
        self._policy = policy
        self._session = session
        self._sandbox: Sandbox | None = None
        self._stop_reason: str | None = None
        self._cancelled = asyncio.Event()
        self._refetched = False  # a damaged cached file was dropped and fetched again
        self._stream: AsyncGenerator[bytes, None] | None = None
        self.record = QueryRecord(
            query_id, policy.name, session_id=session.session_id if session else None
        )

    @property
    def query_id(self) -> str:
        return self.record.query_id

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """Arrow IPC stream bytes, in order. Raises QueryError subclasses.

        The query's table files stay leased in the cache until this ends, however it ends.
        """
        self._stream = self._chunks()
        return self._stream

    async def close(self) -> None:
        """End this run however far it got: a stream left part-way is closed now (its sandbox
        released, or its session's turn given back), and the table files are released, also
        when ``chunks()`` was never iterated. Harmless to call twice. Not while another task
        is iterating ``chunks()``: cancel that task first."""
        if self._stream is not None:
            await self._stream.aclose()
        self._tables.release()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        started = time.monotonic()
        executor = self._executor
        executor._running[self.query_id] = self
        try:
            # aclosing: a consumer that leaves early closes this generator; the inner one must
            # release its sandbox (or session lock) now, before the leases below go.
            if self._session is not None:
                run = self._run_in_session(self._session)
            else:
                run = self._run_per_query(started)
            async with contextlib.aclosing(run) as items:
                async for chunk in items:
                    yield chunk
            if self._tables.write is not None:
                # After the release: an upload needs no sandbox, so it should not hold one.
                yield await self._tables.write.publish()
            self.record.outcome = "ok"
        except QueryError as error:
            self.record.outcome = error.reason
            raise
        except DuckcellError as error:
            self.record.outcome = type(error).__name__
            raise
        except asyncio.CancelledError:
            self.record.outcome = "cancelled"
            raise
        finally:
            self._tables.release()
            self.record.total_s = time.monotonic() - started
            executor._running.pop(self.query_id, None)

    async def _run_per_query(self, started: float) -> AsyncIterator[bytes]:
        """Run in a fresh sandbox; when the tables' listings prove to have changed meanwhile,
        nothing of that run has left: run again on fresh files."""
        pool = self._executor._pool_for(self._policy)
        waiting = started  # a rerun's queued time is its own wait, not the run thrown away
        while True:
            try:
                sandbox = await self._unless_cancelled(pool.acquire(), pool.release)
            finally:  # a wait that fails (no capacity, no start) was queued time too
                self.record.queued_s += time.monotonic() - waiting
            stale = sent = False
            try:
                bindings = await _linked(sandbox, self._tables.bindings)
                stream = self._run_in(sandbox, bindings)
                try:
                    async for chunk in stream:
                        if not await self._tables.confirmed():
                            stale = True
                            break
                        sent = True
                        yield chunk
                finally:
                    await stream.aclose()
                # A writing query yields nothing: its upload waits for the verdict here.
                stale = stale or not await self._tables.confirmed()
            except SqlError as error:
                # DuckDB's error on early-bound files (a column gone, say) stands only if they
                # were the right files; timeouts and memory limits stand whatever the files.
                # A cached file DuckDB could not read and the cache found damaged is dropped
                # and the query runs again on a fresh copy, once (a copy damaged at its source
                # would fail again), and only if nothing of the result has left.
                if self._stop_reason is not None:
                    raise
                if not sent and not self._refetched and await self._tables.suspect(str(error)):
                    self._refetched = True
                elif await self._tables.confirmed():
                    raise
                stale = True
            finally:
                pool.release(sandbox)
            if not stale:
                return
            await self._prepare_again()
            waiting = time.monotonic()

    async def _prepare_again(self) -> None:
        """Swap the early-bound tables for freshly listed ones (never early again)."""
        again, old = self._tables.again, self._tables
        self._tables = TableFiles()
        old.release()
        if self._stop_reason == "cancelled":  # no LIST, no download for a query nobody wants
            raise QueryCancelledError("query cancelled")
        if again is None:  # confirmed() is only false for tables prepared early
            raise QueryError("the query's table listings changed and it cannot be prepared again")
        self.record.reruns += 1
        self.record.summary = None
        self._tables = await again()
        write = self._tables.write
        self._sql = write.plan.sql if write is not None else self._original_sql

    async def _run_in_session(self, session: Session) -> AsyncIterator[bytes]:
        if not await self._tables.confirmed():
            await self._prepare_again()
        # A session runs one query at a time; the lock is the queue.
        waiting = time.monotonic()
        try:
            await self._unless_cancelled(session.lock.acquire(), lambda _: session.lock.release())
        finally:
            self.record.queued_s += time.monotonic() - waiting
        try:
            # The session may have ended while this query waited for its turn.
            self._executor.sessions.get(session.session_id)
            session.active_queries += 1
            try:
                # Under the session's lock: no query of this session reads meanwhile.
                bindings = await _linked(session.sandbox, self._tables.bindings)
                try:
                    async for chunk in self._run_in(session.sandbox, bindings):
                        yield chunk
                except SqlError as error:
                    # Not run again: the session's earlier statements may have had effects.
                    if await self._tables.suspect(str(error)):
                        raise SqlError(
                            f"{error} (a damaged cached file was dropped: run the query again)"
                        ) from None
                    raise
            finally:
                session.active_queries -= 1
                session.last_used = time.monotonic()
        finally:
            session.lock.release()

    async def _unless_cancelled(self, waiting: Awaitable[T], give_back: Callable[[T], object]) -> T:
        """Wait for a sandbox (or the session's turn) unless cancel() comes first.

        Whatever way this is left early (cancel(), or the caller's task being cancelled), a
        sandbox or lock the wait obtained anyway is given back, now or when it arrives.
        """
        task = asyncio.ensure_future(waiting)
        stop = asyncio.ensure_future(self._cancelled.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            _abandon(task, give_back)
            raise
        finally:
            stop.cancel()
        if self._stop_reason == "cancelled":
            _abandon(task, give_back)
            raise QueryCancelledError("query cancelled while it waited for a sandbox")
        return task.result()

    async def _run_in(
        self, sandbox: Sandbox, bindings: tuple[Binding, ...]
    ) -> AsyncIterator[bytes]:
        self._sandbox = sandbox
        self.record.sandbox = sandbox.name
        self.record.slot = sandbox.slot
        # A cancel() that came while nothing was running (a session's files being linked)
        # sent nothing to a runner: it is seen here, before the runner is asked.
        if self._stop_reason == "cancelled":
            raise QueryCancelledError("query cancelled")
        limits = self._policy.limits
        loop = asyncio.get_running_loop()
        hard_deadline = loop.time() + limits.statement_timeout_s + self._executor.kill_grace_s
        stream = sandbox.client.execute(
            query_id=self.query_id,
            sql=self._sql,
            timeout_s=limits.statement_timeout_s,
            max_rows=limits.max_result_rows,
            max_bytes=limits.max_result_bytes,
            tables=bindings,
            output_path=write.plan.output_path if (write := self._tables.write) else "",
            parameters=self._parameters,
            batch_rows=BATCH_ROWS,
        )
        guard = ResultGuard(limits.max_result_rows, limits.max_result_bytes, batch_rows=BATCH_ROWS)
        try:
            while True:
                # The deadline covers only the wait for the next item, never the consumer's
                # time at the yield below (a timeout there would cancel the consumer's await).
                # timeout_at, unlike wait_for on 3.11, starts no task per chunk.
                try:
                    async with asyncio.timeout_at(hard_deadline):
                        item = await anext(stream)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise await self._hard_kill(sandbox) from None
                except RunnerInvalidError as error:  # the runner client's own checks
                    await self._contain(sandbox, guard, error)
                    raise
                checked = await self._take(item, sandbox, guard, hard_deadline)
                if checked:
                    yield checked
        except StreamBroken as broken:
            # Explain first: losing the session removes the container we must inspect.
            error = await self._explain_loss(sandbox, broken)
            self._lose_session()
            raise error from None
        finally:
            await stream.aclose()

    async def _take(
        self,
        item: bytes | OutputChunk | QuerySummary,
        sandbox: Sandbox,
        guard: ResultGuard,
        hard_deadline: float,
    ) -> bytes:
        """One item from the runner; the result bytes it completes, once checked, to pass on.

        Nothing of a result is trusted before ``guard`` checked it
        (``launcher.sandbox.result_check``), and the record's summary is the worker's own count,
        not the runner's. A write's output file is held to the sandbox's /scratch size and checked
        with its COPY result before the sandbox is released (``PendingWrite.check``).
        """
        write = self._tables.write
        try:
            if isinstance(item, OutputChunk):
                if write is None:
                    raise runner_invalid("an output file no query asked for")
                if not guard.ended:
                    raise runner_invalid("an output file before the end of its result")
                limit = self._policy.limits.scratch_bytes
                await write.accept_output(item.data, max_bytes=limit)
                return b""
            if isinstance(item, QuerySummary):
                self.record.summary = guard.finish(item)
                if write is not None:
                    write.check()
                return b""
            checked = await self._check(item, sandbox, guard, hard_deadline)
            if write is not None and checked:
                write.accept_result(checked)  # DuckDB's COPY count; publish() answers instead
                return b""
            return checked
        except (RunnerInvalidError, ResultLimitError) as error:
            # Past a limit too: an honest runner stops before the guard sees the excess.
            await self._contain(sandbox, guard, error)
            raise

    async def _check(
        self, data: bytes, sandbox: Sandbox, guard: ResultGuard, hard_deadline: float
    ) -> bytes:
        """``guard``'s check of one slice, in steps of bounded work (``ResultGuard.step``): other
        queries run between steps, and a slice whose check lasts past the hard deadline is
        stopped like a runner that does. A message whose check may take long (a wide schema, a
        large batch: ``heavy_next``) is checked in a worker thread, in a step of its own."""
        loop = asyncio.get_running_loop()
        guard.start(data)
        while True:
            if guard.heavy_next:
                checked = await asyncio.to_thread(guard.step, heavy=True)
            else:
                checked = guard.step()
            if checked is not None:
                return checked
            if loop.time() >= hard_deadline:
                raise await self._hard_kill(sandbox)
            if not guard.heavy_next:
                await asyncio.sleep(0)

    async def _hard_kill(self, sandbox: Sandbox) -> QueryTimeoutError:
        """Kill the sandbox at the hard deadline; the error to raise."""
        self._stop_reason = "hard_kill"
        await self._executor.backend.kill(sandbox.handle)
        self._lose_session()
        return self._hard_kill_error()

    async def _contain(self, sandbox: Sandbox, guard: ResultGuard, error: QueryError) -> None:
        """A runner that sent what no honest one sends may run an attacker's code: kill its
        sandbox now, as the hard kill does, and log it for the operator; the audit records
        what the worker counted."""
        self.record.summary = guard.counted()
        log.warning(
            "possible sandbox compromise: sandbox %s (policy %s, query %s) sent what no honest "
            "runner sends and was killed: %s",
            sandbox.name,
            self._policy.name,
            self.query_id,
            error,
        )
        await self._executor.backend.kill(sandbox.handle)
        self._lose_session()

    def _hard_kill_error(self) -> QueryTimeoutError:
        limits = self._policy.limits
        return QueryTimeoutError(
            f"query killed by the launcher after {limits.statement_timeout_s:g} s "
            f"(+{self._executor.kill_grace_s:g} s grace) past the statement timeout of policy "
            f"{self._policy.name}: DuckDB could not be interrupted, or the result was read "
            "too slowly"
        )

    def _lose_session(self) -> None:
        if self._session is not None:
            self._executor.sessions.close(
                self._session.session_id, "lost its sandbox when a query was killed"
            )

    async def _explain_loss(self, sandbox: Sandbox, broken: StreamBroken) -> QueryError:
        if self._stop_reason == "cancelled":
            return QueryCancelledError("query cancelled; its sandbox was destroyed")
        if self._stop_reason == "hard_kill":
            return self._hard_kill_error()
        if self._session is not None:
            why = self._executor.sessions.ended_reason(self._session.session_id)
            if why:
                return SandboxLostError(
                    f"session {self._session.session_id} ended during the query: it {why}"
                )
        backend = self._executor.backend
        try:
            state = await backend.inspect(sandbox.handle)
            deadline = time.monotonic() + _EXIT_WAIT_S
            while state.status == "running" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                state = await backend.inspect(sandbox.handle)
        except DuckcellError as error:  # the engine went away with it (a restart): still lost
            return SandboxLostError(
                f"sandbox {sandbox.name} stopped during the query and the Docker engine does "
                f"not answer ({error}; {broken.detail})"
            )
        # Only the engine's OOMKilled flag: exit 137 is any SIGKILL, not just the OOM killer.
        if state.oom_killed:
            mib = self._policy.limits.memory_bytes // (1024 * 1024)
            return MemoryLimitError(
                f"query used more than the sandbox memory limit of {mib} MiB (policy "
                f"{self._policy.name}); the sandbox was killed"
            )
        return SandboxLostError(
            f"sandbox {sandbox.name} stopped during the query (status {state.status}, exit "
            f"code {state.exit_code}; {broken.detail})"
        )

    async def cancel(self) -> None:
        """Stop the query. A per-query sandbox is killed outright; a session's is interrupted.

        A query still waiting for its sandbox (or its session's turn) stops waiting.
        """
        self._stop_reason = "cancelled"
        self._cancelled.set()
        sandbox = self._sandbox
        if sandbox is None:
            return
        if self._session is None:
            await self._executor.backend.kill(sandbox.handle)
        else:
            await sandbox.client.cancel(self.query_id)


class Executor:
    """Runs queries on one host's sandboxes: ``run_query`` is the one entry point (the data
    path's tables, a sandbox from the policy's pool or the session's own, the runner, the
    checked result, the release of everything on every outcome). It keeps the queries that
    run, so ``cancel`` by id and ``running`` answer for the tunnel and for drain.

    It raises the ``QueryError`` family (``launcher.errors``): what the sandbox, the runner or
    the result check found, never a Docker or gRPC exception.
    """

    def __init__(
        self,
        backend: SandboxBackend,
        pool_for: Callable[[Policy], SandboxPool],
        sessions: SessionManager,
        *,
        kill_grace_s: float = 5.0,
    ) -> None:
        self.backend = backend
        self.sessions = sessions
        self.kill_grace_s = kill_grace_s
        self._pool_for = pool_for
        self._running: dict[str, QueryExecution] = {}

    @contextlib.asynccontextmanager
    async def run_query(
        self,
        sql: str,
        *,
        policy: Policy | None = None,
        session_id: str | None = None,
        data: TablePreparer | None = None,
        early: bool = False,
        tables: TableFiles | None = None,
        query_id: str | None = None,
        parameters: bytes = b"",
    ) -> AsyncIterator[QueryExecution]:
        """Run a query on this host: the one entry point (the CLI's local mode, the tunnel's
        runner and the benches use it)::

            async with executor.run_query(sql, policy=policy, data=data_path) as execution:
                async for chunk in execution.chunks():
                    ...

        ``data`` prepares the tables the SQL names (``early`` as ``DataPath.prepare`` says)
        under the session's policy when ``session_id`` is given, else ``policy``; or the
        caller hands in ``tables`` it prepared itself. Leaving the block ends the query
        (``QueryExecution.close``): the tables are released on every outcome, whether
        preparing, ``execute``, the sandbox or the consumer failed, or the consumer stopped
        reading early. Raises what ``DataPath.prepare`` and ``execute`` raise.
        """
        if data is not None and tables is not None:
            tables.release()
            raise ValueError("run_query takes data or tables, not both")
        if data is not None:
            if session_id:
                policy = self.sessions.get(session_id).policy
            if policy is None:
                raise ValueError("run_query needs a policy or a session")
            tables = await data.prepare(sql, policy, early=early)
        execution = self.execute(  # releases the tables itself if it raises
            sql,
            policy=policy,
            session_id=session_id,
            query_id=query_id,
            tables=tables,
            parameters=parameters,
        )
        try:
            yield execution
        finally:
            await execution.close()

    def execute(
        self,
        sql: str,
        *,
        policy: Policy | None = None,
        session_id: str | None = None,
        query_id: str | None = None,
        tables: TableFiles | None = None,
        parameters: bytes = b"",
    ) -> QueryExecution:
        """A query ready to run, the step under ``run_query`` (which callers use: it also ends
        a run whose ``chunks()`` was never read to the end). ``tables`` (from
        ``DataPath.prepare``) are bound in its sandbox and released when it ends;
        ``parameters`` (an Arrow IPC stream of one row) are bound by DuckDB to the SQL's
        placeholders in the sandbox."""
        try:
            session = self.sessions.get(session_id) if session_id else None
            if session is not None:
                policy = session.policy
            if policy is None:
                raise ValueError("execute needs a policy or a session")
            if session is None and policy.isolation is Isolation.SESSION:
                raise QueryError(
                    f"policy {policy.name} is a session policy: open a session to run queries"
                )
        except BaseException:
            if tables is not None:
                tables.release()  # the query will never run: unpin its files now
            raise
        query_id = query_id or uuid.uuid4().hex
        return QueryExecution(self, sql, policy, session, query_id, tables, parameters)

    async def cancel(self, query_id: str) -> bool:
        execution = self._running.get(query_id)
        if execution is None:
            return False
        await execution.cancel()
        return True

    def running(self) -> list[str]:
        return list(self._running)


async def _linked(sandbox: Sandbox, bindings: tuple[Binding, ...]) -> tuple[Binding, ...]:
    """The bindings, re-pointed at links in the sandbox's own directory: the only cached files
    its container can open (``launcher.sandbox.files``)."""
    if sandbox.files is None or not bindings:
        return bindings
    return await asyncio.to_thread(sandbox.files.link, bindings)


def _abandon(task: asyncio.Future[T], give_back: Callable[[T], object]) -> None:
    """Stop a wait nobody will use; if it obtained something after all, give it back."""

    def settle(done: asyncio.Future[T]) -> None:
        if not done.cancelled() and done.exception() is None:
            give_back(done.result())

    task.cancel()
    task.add_done_callback(settle)


async def collect_table(execution: QueryExecution) -> pa.Table:
    """Run a query to the end and decode its whole result (CLI and tests; not the hot path)."""
    parts = [chunk async for chunk in execution.chunks()]
    return pa.ipc.open_stream(b"".join(parts)).read_all()
