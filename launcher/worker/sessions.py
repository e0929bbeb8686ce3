"""The worker's session side of the tunnel: open and close sessions the control plane asks for.

A session is one sandbox bound to a session id (``launcher.sandbox.sessions.SessionManager``), so
temp tables survive between its queries. The control plane names each session it opens
(``SessionOpen.session_id``); the worker opens a local session of the requested policy through
its ``SessionHost`` and keeps the map from the control plane's id to the local one, which the
tunnel's query side uses to run a ``RunQuery`` that names a session (``local_id``).

Opening takes a sandbox and may wait for one, so each ``SessionOpen`` runs as its own task and
is answered with ``SessionOpened`` when it is done; the tunnel's reader never waits. A
``SessionClose`` that crosses an open still in progress closes the session as soon as it
exists. The worker ends sessions by itself too (idle TTL, max lifetime, a lost sandbox): the
``SessionManager``'s reaper does that without telling anyone, so ``sweep`` (called before
every heartbeat) finds the sessions that ended and reports each with ``SessionEnded``, and the
control plane forgets them within one heartbeat interval. Sessions belong to one tunnel
stream, like queries: when the stream ends the control plane forgets them, so ``close_all``
ends them here too and frees their sandboxes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from ..errors import (
    CAPACITY_REASON,
    POLICY_REASON,
    DuckcellError,
    PolicyError,
    PoolError,
    SessionError,
)
from ..protocol import controlplane_pb2 as pb

log = logging.getLogger(__name__)

Send = Callable[[pb.WorkerMessage], Awaitable[bool]]


@runtime_checkable
class SessionHost(Protocol):
    """What runs the sessions on this worker (``ExecutorQueryRunner`` over a launcher's
    ``SessionManager``). ``open_session`` returns the local session id and the policy name it
    runs under, or raises ``SessionError`` (not a session policy), ``PolicyError`` or
    ``PoolError``; ``session_ended`` says why a local session ended, or None while it lives."""

    async def open_session(self, policy: str) -> tuple[str, str]: ...

    def close_session(self, local_id: str) -> None: ...

    def session_ended(self, local_id: str) -> str | None: ...


class NoSessionHost:
    """What a worker whose runner keeps no sessions answers every ``SessionOpen`` with."""

    async def open_session(self, policy: str) -> tuple[str, str]:
        raise SessionError("this worker runs no sessions: start it with a sandbox launcher")

    def close_session(self, local_id: str) -> None:
        return None

    def session_ended(self, local_id: str) -> str | None:
        return "was never opened"


class WorkerSessions:
    """The sessions one tunnel stream opened; ``send`` writes a message on that stream."""

    def __init__(self, host: SessionHost, send: Send) -> None:
        self._host = host
        self._send = send
        self._local: dict[str, str] = {}  # control plane's session id -> local session id
        self._opening: dict[str, asyncio.Task[None]] = {}
        self._closed_while_opening: set[str] = set()

    def __len__(self) -> int:
        return len(self._local)

    def open(self, request: pb.SessionOpen) -> None:
        """Start opening the session; ``SessionOpened`` answers when it is open or refused."""
        session_id = request.session_id
        if session_id in self._local or session_id in self._opening:
            log.warning("session %s is already open: ignoring the repeat", session_id)
            return
        task = asyncio.create_task(self._open(session_id, request.policy))
        self._opening[session_id] = task

    def close(self, session_id: str) -> None:
        """End the session and free its sandbox; an unknown id is a no-op (it already ended)."""
        if session_id in self._opening:
            self._closed_while_opening.add(session_id)
            return
        local_id = self._local.pop(session_id, None)
        if local_id is not None:
            log.info("session %s closed by the control plane", session_id)
            self._host.close_session(local_id)

    def local_id(self, session_id: str) -> str:
        """The local session for the control plane's id; raises ``SessionError``."""
        local_id = self._local.get(session_id)
        if local_id is None:
            raise SessionError(
                f"session {session_id} is not open on this worker (it ended, or the worker "
                "reconnected since): open a new session"
            )
        return local_id

    async def sweep(self) -> None:
        """Report every session the worker ended by itself since the last sweep."""
        for session_id, local_id in list(self._local.items()):
            why = self._host.session_ended(local_id)
            if why is None:
                continue
            del self._local[session_id]
            log.info("session %s ended on the worker: it %s", session_id, why)
            ended = pb.SessionEnded(session_id=session_id, reason=why)
            await self._send(pb.WorkerMessage(session_ended=ended))

    async def close_all(self) -> None:
        """The stream ended: stop opening, and close every session (their sandboxes go)."""
        tasks = list(self._opening.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for local_id in self._local.values():
            self._host.close_session(local_id)
        self._local.clear()

    async def _open(self, session_id: str, policy: str) -> None:
        try:
            local_id, resolved = await self._host.open_session(policy)
        except DuckcellError as error:
            log.info("session %s not opened: %s", session_id, error)
            refused = pb.SessionOpened(
                session_id=session_id, ok=False, reason=_reason(error), message=str(error)
            )
            await self._send(pb.WorkerMessage(session_opened=refused))
            return
        finally:
            self._opening.pop(session_id, None)
            closed = session_id in self._closed_while_opening
            self._closed_while_opening.discard(session_id)
        if closed:
            self._host.close_session(local_id)  # nobody waits for it any more
            return
        self._local[session_id] = local_id
        log.info("session %s opened (policy %s)", session_id, resolved)
        opened = pb.SessionOpened(session_id=session_id, ok=True, policy=resolved)
        await self._send(pb.WorkerMessage(session_opened=opened))


def _reason(error: DuckcellError) -> str:
    if isinstance(error, PolicyError):
        return POLICY_REASON
    if isinstance(error, PoolError):
        return CAPACITY_REASON
    return SessionError.reason
