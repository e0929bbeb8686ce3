"""The worker's query side of the tunnel: run what ``RunQuery`` asks and push the results.

``TunnelClient`` hands every ``RunQuery`` to ``QueryTasks``, which runs it as its own task: the
task opens ``Tunnel.PushResults`` on the tunnel's channel, sends the query id, forwards the
runner's Arrow IPC bytes untouched (never decoded) and ends with one ``Outcome``. Each query has
its own client-streaming call, so gRPC flow control holds back only that query when its client
reads slowly; the tunnel stream and other queries go on. ``Cancel`` (the client went away) and
the end of the tunnel stream cancel the tasks; cancelling a query releases its sandbox.

The runner is a small Protocol so tests and other launchers can bring their own;
``ExecutorQueryRunner`` is the adapter over the sandbox core's ``Executor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from grpc import aio

from .errors import DuckcellError, PolicyError, PoolError, QueryError
from .executor import Executor, QueryRecord
from .policy import PolicySet
from .protocol import controlplane_pb2 as pb
from .protocol import controlplane_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_POLICY = "default"


class QueryRunner(Protocol):
    """Runs queries for the tunnel. ``run`` yields Arrow IPC stream bytes and raises
    ``QueryError`` (or another ``DuckcellError``); ``rows`` tells, once, how many rows a
    finished query returned (0 when unknown)."""

    def run(self, query_id: str, sql: str, policy: str) -> AsyncIterator[bytes]: ...

    async def cancel(self, query_id: str) -> None: ...

    def rows(self, query_id: str) -> int: ...


class ExecutorQueryRunner:
    """``QueryRunner`` over an ``Executor`` (a ``LocalLauncher``'s, or a test's).

    An empty policy name means ``default_policy``. ``on_finished`` sees each query's record
    when it ends (the audit log's hook; tests read outcomes from it).
    """

    def __init__(
        self,
        executor: Executor,
        policies: PolicySet,
        *,
        default_policy: str = DEFAULT_POLICY,
        on_finished: Callable[[QueryRecord], None] | None = None,
    ) -> None:
        self._executor = executor
        self._policies = policies
        self._default_policy = default_policy
        self._on_finished = on_finished or (lambda record: None)
        self._rows: dict[str, int] = {}

    async def run(self, query_id: str, sql: str, policy: str) -> AsyncIterator[bytes]:
        chosen = self._policies.get(policy or self._default_policy)
        execution = self._executor.execute(sql, policy=chosen, query_id=query_id)
        try:
            async for chunk in execution.chunks():
                yield chunk
            summary = execution.record.summary
            self._rows[query_id] = summary.rows if summary is not None else 0
        finally:
            self._on_finished(execution.record)

    async def cancel(self, query_id: str) -> None:
        await self._executor.cancel(query_id)

    def rows(self, query_id: str) -> int:
        return self._rows.pop(query_id, 0)


class NoQueryRunner:
    """What a worker started without a runner answers every query with."""

    async def run(self, query_id: str, sql: str, policy: str) -> AsyncIterator[bytes]:
        raise QueryError("this worker was started without a query runner: it runs no queries")
        yield b""  # pragma: no cover - makes this an async generator

    async def cancel(self, query_id: str) -> None:
        return None

    def rows(self, query_id: str) -> int:
        return 0


class QueryTasks:
    """The queries one tunnel stream is running, each pushing on its own PushResults call."""

    def __init__(self, runner: QueryRunner, stub: pb_grpc.TunnelStub) -> None:
        self._runner = runner
        self._stub = stub
        self._tasks: dict[str, asyncio.Task[None]] = {}

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

    async def close(self) -> None:
        """Cancel every query and wait until each has released its sandbox."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _push(self, request: pb.RunQuery) -> None:
        query_id = request.query_id
        call = self._stub.PushResults()
        try:
            await call.write(pb.ResultChunk(query_id=query_id))
            outcome = pb.Outcome(ok=True)
            runner = self._runner.run(query_id, request.sql, request.policy)
            try:
                async with contextlib.aclosing(runner) as chunks:
                    async for chunk in chunks:
                        await call.write(pb.ResultChunk(ipc=chunk))
                outcome.rows = self._runner.rows(query_id)
            except DuckcellError as error:
                outcome = pb.Outcome(ok=False, reason=_reason(error), message=str(error))
            await call.write(pb.ResultChunk(outcome=outcome))
            await call.done_writing()
            await call
        except (aio.AioRpcError, asyncio.InvalidStateError) as error:
            # The control plane stopped waiting (client gone, tunnel down): nothing to deliver.
            log.info("results of query %s not delivered: %s", query_id, error)
        finally:
            call.cancel()
            self._tasks.pop(query_id, None)


def _reason(error: DuckcellError) -> str:
    if isinstance(error, QueryError):
        return error.reason
    if isinstance(error, PolicyError):
        return "policy"
    if isinstance(error, PoolError):
        return "capacity"
    return "worker_error"
