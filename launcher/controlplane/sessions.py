"""The control plane's session table: which worker holds each session, and who owns it.

A session is opened on one worker and lives in one of its sandboxes, so every query of it must
go to that worker's stream and nowhere else. The table maps the control plane's session id to
that stream's outbox and to the owner (the API key that opened it): another owner is answered
as if the session did not exist, so ids cannot be probed. Sessions end four ways, and the table
remembers why (a bounded record) so the next query of an ended session gets a clear error:
the client closes it, the worker ends it by itself (``SessionEnded``: idle TTL, max lifetime,
lost sandbox), the worker says it is not there (a query answered with the reason "session"),
or the worker's stream ends. Idle expiry is the worker's job (its ``SessionManager`` has the
policy's TTLs); the table only forgets what the worker reports.

All of it runs on the control plane's event loop; nothing here awaits.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

from launcher.errors import DuckcellError, QueryDeniedError, SessionError, WorkerUnavailableError
from launcher.model.catalog import Catalog
from launcher.protocol import controlplane_pb2 as pb

from .access import role_of

# How many ended sessions are remembered for their error message.
ENDED_MEMORY = 4096
# Sessions one API key may hold at once (opening or open): each is a sandbox on a worker, so
# without a cap one key (a Flight SQL client opening connections in a loop, an agent framework
# spawning conversations) could take every worker's session capacity from the others.
MAX_SESSIONS_PER_OWNER = 16

Outbox = asyncio.Queue[pb.ControlMessage]


@dataclass(eq=False, slots=True)
class RoutedSession:
    """One session as the control plane sees it. ``opened`` resolves with the worker's answer
    (or the error that ended the wait); ``policy`` is known once it opened."""

    session_id: str
    worker_id: str
    outbox: Outbox  # the stream the session lives on; its end ends the session
    owner: str
    policy: str = ""
    is_open: bool = False  # the worker said it opened
    opened: asyncio.Future[pb.SessionOpened] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SessionTable:
    """Sessions by id, opening or open; and why recent ones ended."""

    def __init__(self) -> None:
        self._sessions: dict[str, RoutedSession] = {}
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (owner, why)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def add(self, session: RoutedSession) -> None:
        """Take a session being opened; raises ``SessionError`` when its owner already holds
        ``MAX_SESSIONS_PER_OWNER``."""
        held = sum(1 for other in self._sessions.values() if other.owner == session.owner)
        if held >= MAX_SESSIONS_PER_OWNER:
            raise SessionError(
                f"this API key already holds {held} sessions (at most "
                f"{MAX_SESSIONS_PER_OWNER}): close one (CloseSession, or close the connection) "
                "or wait for one to end"
            )
        self._sessions[session.session_id] = session

    def answered(self, worker_id: str, outbox: Outbox, answer: pb.SessionOpened) -> None:
        """The worker's ``SessionOpened``; an answer for a session nobody waits for is dropped
        (the worker closes a session it opened after the control plane gave up on it)."""
        session = self._sessions.get(answer.session_id)
        if session is None or session.outbox is not outbox or session.opened.done():
            return
        if answer.ok:
            session.policy, session.is_open = answer.policy, True
        session.opened.set_result(answer)

    def get(self, session_id: str, owner: str) -> RoutedSession:
        """The open session ``owner`` may use; raises ``SessionError``."""
        session = self._sessions.get(session_id)
        if session is not None and session.owner == owner and session.is_open:
            return session
        ended = self._ended.get(session_id) if session is None else None
        if ended is not None and ended[0] == owner:
            raise SessionError(f"session {session_id} has ended: it {ended[1]}; open a new one")
        raise SessionError(
            f"unknown session {session_id!r}: open one with OpenSession "
            "(`ControlPlaneClient.open_session`) and use the id it returns"
        )

    def has_ended(self, session_id: str, owner: str) -> bool:
        ended = self._ended.get(session_id)
        return ended is not None and ended[0] == owner

    def forget(
        self, session_id: str, why: str, *, outbox: Outbox | None = None
    ) -> RoutedSession | None:
        """End the session for the control plane; ``why`` completes "it ...". A waiting open
        fails with ``SessionError``. With ``outbox``, only a session living on that stream."""
        session = self._sessions.get(session_id)
        if session is None or (outbox is not None and session.outbox is not outbox):
            return None
        del self._sessions[session_id]
        self._remember(session, why)
        if not session.opened.done():
            session.opened.set_exception(SessionError(f"session {session_id} {why}"))
        return session

    def worker_gone(self, worker_id: str, outbox: Outbox) -> None:
        """The stream with ``outbox`` ended: its sessions are over, its opens fail."""
        why = f"lost its worker {worker_id}, which disconnected"
        for session_id, session in list(self._sessions.items()):
            if session.outbox is not outbox:
                continue
            del self._sessions[session_id]
            self._remember(session, why)
            if not session.opened.done():
                error: DuckcellError = WorkerUnavailableError(
                    f"worker {worker_id} disconnected while opening the session: open it again"
                )
                session.opened.set_exception(error)

    def _remember(self, session: RoutedSession, why: str) -> None:
        self._ended[session.session_id] = (session.owner, why)
        while len(self._ended) > ENDED_MEMORY:
            self._ended.popitem(last=False)


def session_policy(catalog: Catalog, role_name: str, requested: str) -> str:
    """The policy a role's session runs under: the role's own, when it is bound to one.
    Raises ``QueryDeniedError`` (undefined role, or another policy than the role's)."""
    role = role_of(catalog, role_name)
    if role.policy and requested and requested != role.policy:
        raise QueryDeniedError(
            f"role {role_name!r} runs under policy {role.policy!r}; it may not open a session "
            f"of policy {requested!r}"
        )
    return role.policy or requested
