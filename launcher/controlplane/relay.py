"""One routed query's hand-off between the worker's results and the client that asked.

``Pending`` is what the router keeps per query: the worker and stream it went down, and a small
bounded queue (the relay) of Arrow IPC bytes ending with an ``End``. The helpers turn a
worker's ``Outcome`` into that end and the end into the query's audit record.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from launcher.errors import (
    DuckcellError,
    QueryError,
    SessionError,
    WorkerDrainingError,
    WorkerUnavailableError,
    query_error,
)
from launcher.protocol import controlplane_pb2 as pb

from .audit import QueryTrail

# Chunks waiting between a worker's PushResults call and the client, per query.
RELAY_DEPTH = 8

Outbox = asyncio.Queue[pb.ControlMessage]


class WholeResult(bytes):
    """IPC bytes that are a query's whole result (it came inline on the tunnel stream): only
    its outcome follows. Still ``bytes`` for every consumer; one that can use the whole result
    at once (Flight SQL's ``GetFlightInfo``) checks for this type rather than guessing."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class QueryDone:
    """The last item of a successful query's stream."""

    rows: int


@dataclass(frozen=True, slots=True)
class End:
    error: DuckcellError | None
    outcome: pb.Outcome | None = None  # the worker's, when it sent one

    @property
    def rows(self) -> int:
        return self.outcome.rows if self.outcome is not None else 0


@dataclass(slots=True)
class Pending:
    worker_id: str
    outbox: Outbox  # the stream the RunQuery went down; its end fails the query
    session_id: str = ""  # the session it runs in, if any
    relay: asyncio.Queue[bytes | End] = field(
        default_factory=lambda: asyncio.Queue(maxsize=RELAY_DEPTH)
    )
    claimed: bool = False  # a PushResults call (or an inline result) is delivering it
    delivered: bool = False  # its outcome is in the relay: the worker may now leave
    closed: bool = False  # nobody reads the relay any more

    def fail(self, error: DuckcellError) -> None:
        """End the client's stream with ``error`` now, whatever is still queued."""
        drain(self.relay)
        self.relay.put_nowait(End(error))


class UnknownQueryError(DuckcellError):
    """A PushResults call for a query nobody waits for (finished, cancelled, or not this
    worker's)."""


def outcome_end(outcome: pb.Outcome) -> End:
    if outcome.ok:
        return End(None, outcome)
    return End(query_error(outcome.reason, outcome.message), outcome)


def end_trail(trail: QueryTrail, end: End) -> None:
    """Write the audit record of a query whose end arrived (an outcome, or the worker lost)."""
    if end.error is None:
        outcome, reason = "ok", ""
    elif isinstance(end.error, QueryError | SessionError):
        outcome, reason = "error", reason_of(end.error)
    else:
        outcome, reason = "error", "worker_lost"
    worker = end.outcome
    trail.end(
        outcome,
        reason,
        "" if end.error is None else str(end.error),
        rows=end.rows,
        queued_s=worker.queued_s if worker is not None else None,
        run_s=worker.run_s if worker is not None else None,
        sandbox=worker.sandbox if worker is not None else "",
        policy=worker.policy if worker is not None else "",
        reruns=worker.reruns if worker is not None else 0,
    )


def refused_by_drain(end: End) -> bool:
    """Whether a query ended as a draining worker's refusal, which ran nothing of it."""
    return isinstance(end.error, WorkerDrainingError)


def reason_of(error: DuckcellError) -> str:
    """The audit log's reason for a query that failed before or without an outcome."""
    if isinstance(error, QueryError | SessionError):
        return error.reason
    return "no_worker"  # the audit's word for WorkerUnavailableError: none was online


def disconnected(worker_id: str) -> WorkerUnavailableError:
    return WorkerUnavailableError(f"worker {worker_id} disconnected during the query: run it again")


def drain(queue: asyncio.Queue[bytes | End]) -> None:
    while not queue.empty():
        queue.get_nowait()
