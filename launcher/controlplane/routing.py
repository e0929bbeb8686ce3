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
  the query's queue is emptied and given a failure, so the client gets an error, not a hang;
- the worker says it is draining (``worker_draining``): it is no longer picked; its running
  queries go on, and any that its drain stops end with the reason "worker_shutdown". A query
  that crossed the Draining message on the wire is refused by the worker before it runs
  ("worker_draining"): ``run`` sends it to another worker, up to ``MAX_MOVES`` times.

Sessions (``open_session``, ``run(..., session_id=)``, ``close_session``): a session lives in
one sandbox on one worker, so its queries go down that worker's stream and nowhere else
(``sessions.SessionTable`` keeps which, and who owns it). The worker answers ``SessionOpen``
with ``SessionOpened`` (``session_opened``) and reports a session it ended by itself with
``SessionEnded`` (``session_ended``); a worker's hang-up ends all of its sessions.

Every query gets one audit record (``audit.QueryTrail``): opened (outcome "running") before its
RunQuery goes to a worker, so a crash of the control plane leaves it to be reconciled as lost
at the next start, and ended before the client sees the end of its stream: when the outcome
arrives, when no worker is online, and in ``run``'s cleanup when the client left or the worker
was lost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable

from launcher.errors import DuckcellError, QueryDeniedError, SessionError, SqlError
from launcher.model.catalog import Catalog
from launcher.model.sql import ParserPool, SqlParser, check_statement
from launcher.protocol import controlplane_pb2 as pb

from .access import authorize, tables_read
from .audit import AuditSink, Clock, NoAudit, QueryTrail
from .placement import Candidate, choose_worker, pin_for
from .relay import (
    End,
    Outbox,
    Pending,
    QueryDone,
    UnknownQueryError,
    WholeResult,
    disconnected,
    drain,
    end_trail,
    outcome_end,
    reason_of,
    refused_by_drain,
)
from .sessions import RoutedSession, SessionTable, session_policy

log = logging.getLogger(__name__)

__all__ = ["MAX_MOVES", "Outbox", "QueryDone", "QueryRouter", "UnknownQueryError", "WholeResult"]

# How many times one query may be moved on after draining workers refused it.
MAX_MOVES = 3


class QueryRouter:
    """Routes queries to workers; ``audit`` receives one record per query (see ``audit``).

    ``parser`` finds the catalog tables a query reads, when its role or the pins need them
    (``access.tables_read``); by default a ``ParserPool`` of its own, whose processes start
    only when a catalog first needs a parse.
    """

    def __init__(
        self,
        *,
        audit: AuditSink | None = None,
        clock: Clock = time.time,
        catalog: Callable[[], Catalog] = lambda: Catalog.EMPTY,
        parser: SqlParser | None = None,
    ) -> None:
        self._parser: SqlParser = parser or ParserPool()
        self._outboxes: dict[str, Outbox] = {}
        self._names: dict[str, str] = {}
        self._catalog = catalog
        self._draining: set[str] = set()
        self._pending: dict[str, Pending] = {}
        self._sessions = SessionTable()
        self._turn = itertools.count()
        self._audit: AuditSink = audit or NoAudit()
        self._clock = clock

    # -- the tunnel's side ------------------------------------------------------------------

    def worker_connected(self, worker_id: str, name: str = "") -> Outbox:
        """A new outbox for ``worker_id``'s stream; it replaces any older one. ``name`` is the
        worker's name, which a catalog may pin a connection to instead of its id."""
        outbox: Outbox = asyncio.Queue()
        self._outboxes[worker_id] = outbox
        self._names[worker_id] = name
        self._draining.discard(worker_id)
        return outbox

    def worker_draining(self, worker_id: str, outbox: Outbox) -> None:
        """``worker_id``'s stream with ``outbox`` is draining: pick it no more."""
        if self._outboxes.get(worker_id) is outbox:
            log.info("worker %s is draining: routing no new query to it", worker_id)
            self._draining.add(worker_id)

    def worker_gone(self, worker_id: str, outbox: Outbox) -> None:
        """``worker_id``'s stream with ``outbox`` ended: fail the queries it was running."""
        if self._outboxes.get(worker_id) is outbox:  # else a newer stream took over
            del self._outboxes[worker_id]
            self._draining.discard(worker_id)
        self._sessions.worker_gone(worker_id, outbox)
        for query_id, pending in self._pending.items():
            # A delivered query keeps its queued chunks and outcome: a drained worker hangs up
            # right after its last PushResults call, maybe before a slow client read the end.
            if pending.outbox is outbox and not pending.closed and not pending.delivered:
                log.info("query %s lost its worker %s", query_id, worker_id)
                pending.fail(disconnected(worker_id))

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
                    await pending.relay.put(self._end_of(pending, chunk.outcome))
                    pending.delivered = finished = True
                    return
                await pending.relay.put(chunk.ipc)
        finally:
            if not finished and not pending.closed:
                pending.fail(disconnected(worker_id))

    def deliver(self, worker_id: str, result: pb.QueryResult) -> None:
        """A whole result the worker sent inline on its stream (``launcher.worker.results``).

        The relay of a waiting query is empty and has room for both items, so this never
        blocks the stream's reader. A result nobody waits for any more is dropped.
        """
        pending = self._pending.get(result.query_id)
        if pending is None or pending.worker_id != worker_id or pending.claimed or pending.closed:
            log.info("dropping the result of query %s: nobody waits for it", result.query_id)
            return
        pending.claimed = pending.delivered = True
        if result.ipc:
            pending.relay.put_nowait(WholeResult(result.ipc))
        pending.relay.put_nowait(self._end_of(pending, result.outcome))

    def session_opened(self, worker_id: str, outbox: Outbox, answer: pb.SessionOpened) -> None:
        """The worker's answer to a ``SessionOpen`` sent down ``outbox``."""
        self._sessions.answered(worker_id, outbox, answer)

    def session_ended(self, worker_id: str, outbox: Outbox, ended: pb.SessionEnded) -> None:
        """The worker ended a session by itself (idle TTL, max lifetime, lost sandbox)."""
        if self._sessions.forget(ended.session_id, ended.reason, outbox=outbox) is not None:
            log.info("session %s ended on worker %s: %s", ended.session_id, worker_id, ended.reason)

    def _end_of(self, pending: Pending, outcome: pb.Outcome) -> End:
        """A query's end; the worker's "session" reason means its session is over there."""
        if outcome.ok or outcome.reason != SessionError.reason or not pending.session_id:
            return outcome_end(outcome)
        self._sessions.forget(pending.session_id, "is no longer open on its worker")
        error = SessionError(
            f"session {pending.session_id} has ended on worker {pending.worker_id} "
            f"({outcome.message}): open a new session"
        )
        return End(error, outcome)

    def broadcast(self, message: pb.ControlMessage) -> None:
        """Send ``message`` down every connected worker's stream (a catalog push)."""
        for outbox in self._outboxes.values():
            outbox.put_nowait(message)

    # -- the client's side ------------------------------------------------------------------

    async def _place(self, sql: str, policy: str, role: str | None) -> tuple[str, str]:
        """The worker and policy for a query, by the catalog's roles and pins."""
        catalog = self._catalog()
        tables = await tables_read(catalog, role, sql, self._parser)
        if role is not None:
            policy = authorize(catalog, role, tables, policy)
        pin = pin_for(catalog, tables)
        online = [Candidate(w, self._names.get(w, "")) for w in self.online()]
        return choose_worker(online, pin, next(self._turn)), policy

    async def _in_session(
        self, sql: str, role: str | None, session_id: str, owner: str
    ) -> tuple[str, Outbox, str]:
        """The worker, stream and policy of a query of a session: its worker, never another."""
        session = self._sessions.get(session_id, owner)
        catalog = self._catalog()
        policy = session.policy
        tables = await tables_read(catalog, role, sql, self._parser)
        if role is not None:
            authorize(catalog, role, tables)  # the tables it may read; the session fixed the policy
        pin = pin_for(catalog, tables)
        name = self._names.get(session.worker_id, "")
        if pin is not None and pin.worker not in (session.worker_id, name):
            raise QueryDeniedError(
                f"the query reads connection {pin.connection}, pinned to worker {pin.worker}, "
                f"but session {session_id} runs on worker {session.worker_id}: run it outside "
                "the session or open the session there"
            )
        return session.worker_id, session.outbox, policy

    def online(self) -> list[str]:
        """The workers a query may be routed to: connected and not draining."""
        return sorted(set(self._outboxes) - self._draining)

    def has_session(self, session_id: str) -> bool:
        """Whether the session is opening or open (not closed, ended or forgotten)."""
        return session_id in self._sessions

    async def run(
        self,
        sql: str,
        policy: str,
        *,
        caller: str = "",
        role: str | None = None,
        session_id: str = "",
        owner: str = "",
        parameters: bytes = b"",
    ) -> AsyncIterator[bytes | QueryDone]:
        """Arrow IPC bytes as the worker pushes them, then ``QueryDone``.

        ``parameters`` (an Arrow IPC stream of one row) go to the worker untouched and are
        bound by DuckDB in the sandbox to the SQL's placeholders.

        ``caller`` names who asked, for the audit log (``<API key id>/<role>`` for the Query
        service). With ``role``, the catalog's role rule decides the policy and the tables the
        query may read (``access.authorize``); the catalog's pins decide the worker
        (``placement``). With ``session_id`` the query runs in that session, on its worker,
        under its policy (``policy`` is ignored); ``owner`` (default: ``caller``) must be the
        one that opened it, else ``SessionError`` as for an unknown or ended session.
        Raises ``QueryDeniedError``, ``SqlError`` (unparsable SQL; ``StatementLimitError``
        for one too large, checked first), ``WorkerUnavailableError`` (no worker, or it left)
        or the query's ``QueryError``.
        Close the generator (``contextlib.aclosing``) so an early exit cancels the query.
        """
        try:
            check_statement(sql)  # before anything keeps the text (the audit log does)
        except SqlError as error:
            log.info("refused a statement from %s: %s", caller or "a client", error)
            raise
        query_id = uuid.uuid4().hex
        requested = policy
        trail = QueryTrail(
            self._audit,
            query_id=query_id,
            caller=caller,
            sql=sql,
            policy=policy,
            session_id=session_id,
            clock=self._clock,
        )
        try:
            if session_id:
                in_session = self._in_session(sql, role, session_id, owner or caller)
                worker_id, outbox, policy = await in_session
            else:
                worker_id, policy = await self._place(sql, policy, role)
                outbox = self._outboxes[worker_id]
        except DuckcellError as error:
            trail.end("error", reason_of(error), str(error), policy=policy)
            raise
        trail.open(worker_id, policy)  # committed before the RunQuery goes out
        pending = Pending(worker_id, outbox, session_id)
        self._pending[query_id] = pending
        done = False
        moves = 0
        try:
            message = pb.RunQuery(
                query_id=query_id,
                sql=sql,
                policy=policy,
                session_id=session_id,
                parameters=parameters,
            )
            pending.outbox.put_nowait(pb.ControlMessage(run_query=message))
            while True:
                item = await pending.relay.get()
                if isinstance(item, bytes):
                    trail.bytes += len(item)
                    yield item
                    continue
                if refused_by_drain(item) and not session_id and moves < MAX_MOVES:
                    moved = await self._move(query_id, pending, sql, requested, role)
                    if moved is not None:  # else the client gets the drain's refusal
                        moves += 1
                        pending, message.policy = moved
                        worker_id = pending.worker_id
                        trail.open(worker_id, message.policy)
                        pending.outbox.put_nowait(pb.ControlMessage(run_query=message))
                        continue
                done = True
                end_trail(trail, item)  # before the client sees the end
                if item.error is not None:
                    raise item.error
                yield QueryDone(item.rows)
                return
        finally:
            trail.end("cancelled", "client_gone", "the client left before the query ended")
            pending.closed = True
            drain(pending.relay)  # wakes an accept() waiting for room
            del self._pending[query_id]
            if not done and self._outboxes.get(worker_id) is pending.outbox:
                log.info("query %s abandoned by its client: cancelling it", query_id)
                cancel = pb.Cancel(query_id=query_id)
                pending.outbox.put_nowait(pb.ControlMessage(cancel=cancel))

    async def _move(
        self, query_id: str, refused: Pending, sql: str, policy: str, role: str | None
    ) -> tuple[Pending, str] | None:
        """A new worker (and the policy there) for a query a draining worker refused before
        running it; ``None`` when no other worker may take it (pins, or none online).

        The draining worker is no longer among the candidates: its Draining message came
        down the same stream before its refusal.
        """
        try:
            worker_id, policy = await self._place(sql, policy, role)
        except DuckcellError as error:
            log.info("query %s refused by draining %s: %s", query_id, refused.worker_id, error)
            return None
        refused.closed = True
        pending = Pending(worker_id, self._outboxes[worker_id])
        self._pending[query_id] = pending
        log.info(
            "query %s refused by draining worker %s: running it on %s",
            query_id,
            refused.worker_id,
            worker_id,
        )
        return pending, policy

    async def open_session(self, policy: str = "", *, owner: str, role: str | None = None) -> str:
        """Open a session on an online worker for ``owner``; returns its id.

        With ``role``, a role bound to a policy may open sessions of that policy only. Raises
        ``QueryDeniedError``, ``WorkerUnavailableError`` (no worker, or it left meanwhile) or
        ``SessionError`` (the worker refused: not a session policy, unknown policy, no
        sandbox). Cancelled while the worker opens it, the session is closed there.
        """
        if role is not None:
            policy = session_policy(self._catalog(), role, policy)
        online = [Candidate(w, self._names.get(w, "")) for w in self.online()]
        worker_id = choose_worker(online, None, next(self._turn))
        session_id = f"ses-{uuid.uuid4().hex}"
        session = RoutedSession(session_id, worker_id, self._outboxes[worker_id], owner)
        self._sessions.add(session)
        opened = False
        try:
            request = pb.SessionOpen(session_id=session_id, policy=policy)
            session.outbox.put_nowait(pb.ControlMessage(session_open=request))
            answer = await session.opened
            if not answer.ok:
                raise SessionError(
                    f"worker {worker_id} could not open a session of policy "
                    f"{policy or '(its default)'}: {answer.message}"
                )
            opened = True
            log.info("session %s opened on worker %s for %s", session_id, worker_id, owner)
            return session_id
        finally:
            if not opened:
                self._sessions.forget(session_id, "was never opened")
                self._tell(session, pb.SessionClose(session_id=session_id))

    async def close_session(self, session_id: str, *, owner: str) -> None:
        """End ``owner``'s session and have its worker destroy its sandbox. Closing a session
        that already ended is not an error; an unknown one (or another owner's) raises
        ``SessionError``."""
        if self._sessions.has_ended(session_id, owner):
            return
        session = self._sessions.get(session_id, owner)
        self._sessions.forget(session_id, "was closed by its client")
        self._tell(session, pb.SessionClose(session_id=session_id))
        log.info("session %s closed by %s", session_id, owner)

    def _tell(self, session: RoutedSession, close: pb.SessionClose) -> None:
        """Send ``close`` to the session's worker, if the stream it lives on is still up."""
        if self._outboxes.get(session.worker_id) is session.outbox:
            session.outbox.put_nowait(pb.ControlMessage(session_close=close))
