"""Routing queries to workers and relaying their results back to the client that asked.

The router knows which workers have a live tunnel (``TunnelService`` reports each connect and
hang-up) and owns each one's outbox: the queue the tunnel's writer task drains into that worker's
response stream. ``run`` picks an online worker round robin (pinning by connection comes with
the catalog), puts a ``RunQuery`` in its outbox and yields what the worker's ``PushResults`` call
delivers (``accept``), chunk by chunk, through a small bounded queue: a slow client makes
``accept`` wait, which holds back that one PushResults stream through gRPC flow control, never
the tunnel or other queries, and never buffers the whole result.

Hand-offs, all on the control plane's event loop:
- the client leaves early (its call is cancelled): ``run``'s cleanup sends ``Cancel`` to the
  worker, marks the query closed and empties its queue, so a waiting ``accept`` wakes, sees it
  is closed and ends the worker's PushResults call;
- the worker's tunnel ends (``worker_gone``) or its PushResults call ends without an outcome:
  the query's queue is emptied and given a failure, so the client gets an error, not a hang.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field

from launcher.errors import DuckcellError, WorkerUnavailableError, query_error
from launcher.protocol import controlplane_pb2 as pb

log = logging.getLogger(__name__)

# Chunks waiting between a worker's PushResults call and the client, per query.
RELAY_DEPTH = 8

Outbox = asyncio.Queue[pb.ControlMessage]


@dataclass(frozen=True, slots=True)
class QueryDone:
    """The last item of a successful query's stream."""

    rows: int


@dataclass(frozen=True, slots=True)
class _End:
    error: DuckcellError | None
    rows: int = 0


@dataclass(slots=True)
class _Pending:
    worker_id: str
    outbox: Outbox  # the stream the RunQuery went down; its end fails the query
    relay: asyncio.Queue[bytes | _End] = field(
        default_factory=lambda: asyncio.Queue(maxsize=RELAY_DEPTH)
    )
    claimed: bool = False  # a PushResults call is delivering this query
    closed: bool = False  # nobody reads the relay any more

    def fail(self, error: DuckcellError) -> None:
        """End the client's stream with ``error`` now, whatever is still queued."""
        _drain(self.relay)
        self.relay.put_nowait(_End(error))


class UnknownQueryError(DuckcellError):
    """A PushResults call for a query nobody waits for (finished, cancelled, or not this
    worker's)."""


class QueryRouter:
    def __init__(self) -> None:
        self._outboxes: dict[str, Outbox] = {}
        self._pending: dict[str, _Pending] = {}
        self._turn = itertools.count()

    # -- the tunnel's side ------------------------------------------------------------------

    def worker_connected(self, worker_id: str) -> Outbox:
        """A new outbox for ``worker_id``'s stream; it replaces any older one."""
        outbox: Outbox = asyncio.Queue()
        self._outboxes[worker_id] = outbox
        return outbox

    def worker_gone(self, worker_id: str, outbox: Outbox) -> None:
        """``worker_id``'s stream with ``outbox`` ended: fail the queries it was running."""
        if self._outboxes.get(worker_id) is outbox:  # else a newer stream took over
            del self._outboxes[worker_id]
        for query_id, pending in self._pending.items():
            if pending.outbox is outbox and not pending.closed:
                log.info("query %s lost its worker %s", query_id, worker_id)
                pending.fail(_disconnected(worker_id))

    async def accept(
        self, worker_id: str, query_id: str, chunks: AsyncIterable[pb.ResultChunk]
    ) -> None:
        """Relay one PushResults call; raises ``UnknownQueryError`` when nobody waits for it."""
        pending = self._pending.get(query_id)
        if pending is None or pending.worker_id != worker_id or pending.claimed:
            raise UnknownQueryError(f"no query {query_id} is waiting for worker {worker_id}")
        pending.claimed = True
        finished = False
        try:
            async for chunk in chunks:
                if pending.closed:
                    return
                if chunk.HasField("outcome"):
                    await pending.relay.put(_outcome(chunk.outcome))
                    finished = True
                    return
                await pending.relay.put(chunk.ipc)
        finally:
            if not finished and not pending.closed:
                pending.fail(_disconnected(worker_id))

    # -- the client's side ------------------------------------------------------------------

    def online(self) -> list[str]:
        return sorted(self._outboxes)

    async def run(self, sql: str, policy: str) -> AsyncIterator[bytes | QueryDone]:
        """Arrow IPC bytes as the worker pushes them, then ``QueryDone``.

        Raises ``WorkerUnavailableError`` (no worker, or it left) or the query's ``QueryError``.
        Close the generator (``contextlib.aclosing``) so an early exit cancels the query.
        """
        workers = self.online()
        if not workers:
            raise WorkerUnavailableError(
                "no worker online: start one with `duckcell worker --state DIR`"
            )
        worker_id = workers[next(self._turn) % len(workers)]
        query_id = uuid.uuid4().hex
        pending = _Pending(worker_id, self._outboxes[worker_id])
        self._pending[query_id] = pending
        done = False
        try:
            message = pb.RunQuery(query_id=query_id, sql=sql, policy=policy)
            pending.outbox.put_nowait(pb.ControlMessage(run_query=message))
            while True:
                item = await pending.relay.get()
                if isinstance(item, bytes):
                    yield item
                    continue
                done = True
                if item.error is not None:
                    raise item.error
                yield QueryDone(item.rows)
                return
        finally:
            pending.closed = True
            _drain(pending.relay)  # wakes an accept() waiting for room
            del self._pending[query_id]
            if not done and self._outboxes.get(worker_id) is pending.outbox:
                log.info("query %s abandoned by its client: cancelling it", query_id)
                cancel = pb.Cancel(query_id=query_id)
                pending.outbox.put_nowait(pb.ControlMessage(cancel=cancel))


def _outcome(outcome: pb.Outcome) -> _End:
    if outcome.ok:
        return _End(None, rows=outcome.rows)
    return _End(query_error(outcome.reason, outcome.message))


def _disconnected(worker_id: str) -> WorkerUnavailableError:
    return WorkerUnavailableError(f"worker {worker_id} disconnected during the query: run it again")


def _drain(queue: asyncio.Queue[bytes | _End]) -> None:
    while not queue.empty():
        queue.get_nowait()
