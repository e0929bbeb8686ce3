"""The worker's query side of the tunnel: run what ``RunQuery`` asks and push the results.

``TunnelClient`` hands every ``RunQuery`` to ``QueryTasks``, which runs it as its own task and
gives the runner's Arrow IPC bytes, untouched (never decoded), to a ``ResultSink``
(``launcher.worker.results``). A small result goes back as one message on the tunnel stream; a
larger one gets its own ``Tunnel.PushResults`` call (query id, the IPC pieces, one ``Outcome``),
so gRPC flow control holds back only that query when its client reads slowly; the tunnel
stream and other queries go on. ``Cancel`` (the client went away) and
the end of the tunnel stream cancel the tasks; cancelling a query releases its sandbox.

``drain`` is the worker's shutdown: new queries are answered at once with the reason
"worker_draining" (a RunQuery may cross the worker's Draining message on the wire; the control
plane then runs it on another worker), running ones get a grace period, then the runner
cancels the rest and they end with "worker_shutdown", so their clients know the query can
simply be retried.

Every query the control plane sends is opened in the worker's audit log
(``launcher.worker.audit``) before anything of it runs, on disk, and closed when its task ends,
whether it succeeded, failed, was cancelled or was stopped by a drain; one the worker's death cut
short is closed as lost when the worker starts again.

The runner is a small Protocol so tests and other launchers can bring their own;
``ExecutorQueryRunner`` is the adapter over the sandbox core's ``Executor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from grpc import aio

from ..data.datapath import DataPath
from ..errors import (
    CAPACITY_REASON,
    POLICY_REASON,
    WORKER_ERROR_REASON,
    DuckcellError,
    PolicyError,
    PoolError,
    QueryError,
    SessionError,
    WorkerDrainingError,
    WorkerShutdownError,
)
from ..executor import Executor, QueryRecord
from ..model.policy import PolicySet
from ..model.sql import check_statement
from ..protocol import controlplane_pb2 as pb
from ..protocol import controlplane_pb2_grpc as pb_grpc
from .audit import NoAuditLog, QueryOpening, WorkerAuditRecord
from .results import ResultSink, Send
from .sessions import WorkerSessions

log = logging.getLogger(__name__)

DEFAULT_POLICY = "default"
# After a drain's grace the runner is asked to stop the remaining queries; a query that still
# has not ended this much later (it never reached the runner's cancel) has its task cancelled.
STOP_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class RunStats:
    """What the runner knows about an ended query beyond its bytes (zeros when unknown)."""

    rows: int = 0
    sandbox: str = ""
    queued_s: float = 0.0
    run_s: float = 0.0
    policy: str = ""  # the policy it ran under (a request's empty name resolved)
    reruns: int = 0  # runs thrown away because a table's listing changed under them


class QueryRunner(Protocol):
    """Runs queries for the tunnel. ``run`` yields Arrow IPC stream bytes and raises
    ``QueryError`` (or another ``DuckcellError``); ``stats`` tells, once, what the runner knows
    about an ended query (rows, sandbox, timings)."""

    def run(
        self, query_id: str, sql: str, policy: str, *, session_id: str = "", parameters: bytes = b""
    ) -> AsyncIterator[bytes]: ...

    async def cancel(self, query_id: str) -> None: ...

    def stats(self, query_id: str) -> RunStats: ...


class AuditSink(Protocol):
    """``launcher.worker.audit.WorkerAuditLog``: ``open`` returns once the opening is recorded;
    ``write`` records how the query ended."""

    async def open(self, opening: QueryOpening) -> None: ...

    def write(self, record: WorkerAuditRecord) -> None: ...


class ExecutorQueryRunner:
    """``QueryRunner`` over an ``Executor`` (a ``LocalLauncher``'s, or a test's).

    An empty policy name means ``default_policy``. ``on_finished`` sees each query's record
    when it ends (the audit log's hook; tests read outcomes from it). ``data`` fetches and
    binds the catalog tables a query names (the catalog the control plane pushed).
    """

    def __init__(
        self,
        executor: Executor,
        policies: PolicySet,
        *,
        default_policy: str = DEFAULT_POLICY,
        on_finished: Callable[[QueryRecord], None] | None = None,
        data: DataPath | None = None,
    ) -> None:
        self._executor = executor
        self._data = data
        self._policies = policies
        self._default_policy = default_policy
        self._on_finished = on_finished or (lambda record: None)
        self._stats: dict[str, RunStats] = {}

    async def run(
        self, query_id: str, sql: str, policy: str, *, session_id: str = "", parameters: bytes = b""
    ) -> AsyncIterator[bytes]:
        """``session_id`` names a local session (``open_session``): the query runs in its
        sandbox, under its policy. ``parameters`` (Arrow IPC, one row) are bound by DuckDB in
        the sandbox."""
        chosen = self._policies.get(policy or self._default_policy)
        # The catalog tables the SQL names are fetched into the cache before a sandbox is
        # taken; ``run_query`` releases the lease when the query ends, however it ends. Early
        # (not in a session, whose query waits for the verdict anyway): a table listed before
        # is not listed again first; the executor holds the results until the fresh listing
        # agrees (``launcher.data.datapath``).
        async with self._executor.run_query(
            sql,
            policy=chosen,
            session_id=session_id or None,
            data=self._data,
            early=not session_id,
            query_id=query_id,
            parameters=parameters,
        ) as execution:
            try:
                # Closed here, not whenever it is collected: a consumer that leaves mid-stream
                # (its client went away) releases the sandbox before the query's end is
                # recorded.
                async with contextlib.aclosing(execution.chunks()) as chunks:
                    async for chunk in chunks:
                        yield chunk
            finally:
                record = execution.record
                if record.outcome == "running":  # closed mid-stream: nobody reads the rest
                    record.outcome = "cancelled"
                self._stats[query_id] = _stats(record)
                self._on_finished(record)

    async def cancel(self, query_id: str) -> None:
        await self._executor.cancel(query_id)

    def stats(self, query_id: str) -> RunStats:
        return self._stats.pop(query_id, RunStats())

    # -- worker.sessions.SessionHost: the control plane's sessions over the launcher's ----------

    async def open_session(self, policy: str) -> tuple[str, str]:
        chosen = self._policies.get(policy or self._default_policy)
        session = await self._executor.sessions.open(chosen)
        return session.session_id, chosen.name

    def close_session(self, local_id: str) -> None:
        self._executor.sessions.close(local_id, "was closed by its client")

    def session_ended(self, local_id: str) -> str | None:
        try:
            self._executor.sessions.get(local_id)
        except SessionError:
            return self._executor.sessions.ended_reason(local_id) or "is gone"
        return None


def _stats(record: QueryRecord) -> RunStats:
    if not record.sandbox:  # it never got one: all of its time was spent waiting
        return RunStats(queued_s=record.total_s, policy=record.policy)
    return RunStats(
        rows=record.summary.rows if record.summary is not None else 0,
        sandbox=record.sandbox,
        queued_s=record.queued_s,
        run_s=max(0.0, record.total_s - record.queued_s),
        policy=record.policy,
        reruns=record.reruns,
    )


class NoQueryRunner:
    """What a worker started without a runner answers every query with."""

    async def run(
        self, query_id: str, sql: str, policy: str, *, session_id: str = "", parameters: bytes = b""
    ) -> AsyncIterator[bytes]:
        raise QueryError("this worker was started without a query runner: it runs no queries")
        yield b""  # pragma: no cover - makes this an async generator

    async def cancel(self, query_id: str) -> None:
        return None

    def stats(self, query_id: str) -> RunStats:
        return RunStats()


class QueryTasks:
    """The queries one tunnel stream is running, each delivering through its ``ResultSink``."""

    def __init__(
        self,
        runner: QueryRunner,
        stub: pb_grpc.TunnelStub,
        *,
        audit: AuditSink | None = None,
        sessions: WorkerSessions | None = None,
        send: Send | None = None,
    ) -> None:
        self._runner = runner
        self._send = send  # the tunnel stream, for results small enough to ride inline
        self._sessions = sessions  # maps a RunQuery's session id to the local session
        self._stub = stub
        self._audit: AuditSink = audit or NoAuditLog()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._refusal: str | None = None  # set by drain: what a new query is answered with
        self._stopped: dict[str, str] = {}  # queries a drain stopped -> their message

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, request: pb.RunQuery) -> None:
        if request.query_id in self._tasks:
            log.warning("query %s is already running: ignoring the repeat", request.query_id)
            return
        self._tasks[request.query_id] = asyncio.create_task(self._push(request))

    async def cancel(self, query_id: str) -> None:
        """Stop one query: the runner kills its sandbox; the task stops even if it had not
        reached the runner yet."""
        task = self._tasks.get(query_id)
        if task is None:
            return
        await self._runner.cancel(query_id)
        task.cancel()

    def refuse_new(self, worker: str) -> None:
        """From now on answer every new query with ``WorkerDrainingError`` (call it before the
        worker says Draining: a RunQuery read in between must not run)."""
        self._refusal = f"worker {worker} is shutting down and took no new query: run it again"

    async def drain(self, grace_s: float, worker: str) -> None:
        """Take no new query, give the running ones ``grace_s`` to finish, stop the rest.

        Returns once every query has ended and pushed its outcome. New queries end with
        ``WorkerDrainingError``'s reason, stopped ones with ``WorkerShutdownError``'s; both
        messages say the query can be retried.
        """
        self.refuse_new(worker)
        running = list(self._tasks.values())
        if running:
            await asyncio.wait(running, timeout=grace_s)
        late = {query_id: task for query_id, task in self._tasks.items() if not task.done()}
        for query_id in late:
            self._stopped[query_id] = (
                f"worker {worker} shut down before the query finished (it waited {grace_s:g} s "
                "for running queries): run it again"
            )
            await self._runner.cancel(query_id)
        if late:
            log.warning(
                "drain: stopping %d query(ies) still running after %g s", len(late), grace_s
            )
            _, stuck = await asyncio.wait(late.values(), timeout=STOP_WAIT_S)
            for task in stuck:
                task.cancel()
        while self._tasks:  # refusals of RunQuery messages read meanwhile end quickly too
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        """Cancel every query and wait until each has released its sandbox."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _push(self, request: pb.RunQuery) -> None:
        query_id = request.query_id
        started = time.time()
        progress = _Progress()
        outcome: pb.Outcome | None = None
        # Once draining, outcomes go on their own acknowledged call: the stream ends soon.
        sink = ResultSink(
            query_id, self._stub, self._send, inline_now=lambda: self._refusal is None
        )
        try:
            await self._audit.open(_opening(request, started))  # before anything of it runs
            outcome = await self._forward(sink, request, progress)
            if not await sink.finish(outcome):
                log.info("results of query %s not delivered: the tunnel stream ended", query_id)
        except (aio.AioRpcError, asyncio.InvalidStateError) as error:
            # The control plane stopped waiting (client gone, tunnel down): nothing to deliver.
            log.info("results of query %s not delivered: %s", query_id, error)
        finally:
            sink.close()
            self._tasks.pop(query_id, None)
            if outcome is None:  # cancelled, or the control plane hung up mid-result
                outcome = self._interrupted(query_id, progress)
            self._stopped.pop(query_id, None)
            self._audit.write(_audit_record(request, started, outcome, progress))

    async def _forward(
        self, sink: ResultSink, request: pb.RunQuery, progress: _Progress
    ) -> pb.Outcome:
        """Run the query, hand its chunks to ``sink``, and say how it ended."""
        query_id = request.query_id
        try:
            if self._refusal is not None:
                raise WorkerDrainingError(self._refusal)
            check_statement(request.sql)  # first, whatever the control plane checked
            bound = {"parameters": request.parameters} if request.parameters else {}
            runner = self._runner.run(
                query_id, request.sql, request.policy, **self._in(request), **bound
            )
            async with contextlib.aclosing(runner) as chunks:
                async for chunk in chunks:
                    progress.bytes += len(chunk)
                    await sink.add(chunk)
            outcome = pb.Outcome(ok=True)
        except DuckcellError as error:
            failure = error
            if query_id in self._stopped:  # the drain's cancel, not the client's
                failure = WorkerShutdownError(self._stopped[query_id])
            outcome = pb.Outcome(ok=False, reason=_reason(failure), message=str(failure))
        progress.stats = self._runner.stats(query_id)
        _add_stats(outcome, progress.stats)
        return outcome

    def _in(self, request: pb.RunQuery) -> dict[str, str]:
        """The runner's session argument for a query of a session (none for other queries, so
        runners that keep no sessions need not take it); raises ``SessionError``."""
        if not request.session_id:
            return {}
        if self._sessions is None:
            raise SessionError("this worker runs no sessions: open none on it")
        return {"session_id": self._sessions.local_id(request.session_id)}

    def _interrupted(self, query_id: str, progress: _Progress) -> pb.Outcome:
        """The audit's outcome of a query whose task ended before it had one."""
        if query_id in self._stopped:
            outcome = pb.Outcome(reason="worker_shutdown", message=self._stopped[query_id])
        else:
            message = "query cancelled: its client went away or the tunnel closed"
            outcome = pb.Outcome(reason="cancelled", message=message)
        progress.stats = self._runner.stats(query_id)
        _add_stats(outcome, progress.stats)
        return outcome


@dataclass(slots=True)
class _Progress:
    """What one query's task learns as it goes, for its audit record."""

    bytes: int = 0
    stats: RunStats = field(default_factory=RunStats)


def _add_stats(outcome: pb.Outcome, stats: RunStats) -> None:
    if outcome.ok:
        outcome.rows = stats.rows
    outcome.sandbox = stats.sandbox
    outcome.queued_s = stats.queued_s
    outcome.run_s = stats.run_s
    outcome.policy = stats.policy
    outcome.reruns = stats.reruns


def _opening(request: pb.RunQuery, started: float) -> QueryOpening:
    policy = request.policy or DEFAULT_POLICY
    return QueryOpening(request.query_id, request.sql, policy, started, request.session_id)


def _audit_record(
    request: pb.RunQuery, started: float, outcome: pb.Outcome, progress: _Progress
) -> WorkerAuditRecord:
    return WorkerAuditRecord(
        query_id=request.query_id,
        sql=request.sql,
        policy=progress.stats.policy or request.policy or DEFAULT_POLICY,
        started_at=started,
        finished_at=time.time(),
        outcome="ok" if outcome.ok else "error",
        reason=outcome.reason,
        message=outcome.message,
        sandbox=outcome.sandbox,
        queued_s=outcome.queued_s,
        run_s=outcome.run_s,
        rows=outcome.rows,
        bytes=progress.bytes,
        reruns=outcome.reruns,
    )


def _reason(error: DuckcellError) -> str:
    if isinstance(error, QueryError):
        return error.reason
    if isinstance(error, PolicyError):
        return POLICY_REASON
    if isinstance(error, PoolError):
        return CAPACITY_REASON
    if isinstance(error, SessionError):
        return SessionError.reason
    return WORKER_ERROR_REASON
