"""Sessions for Flight SQL clients: the statements of one connection share one sandbox.

A connection (``connections.py``: a handshake's token, the session cookie, or a name in the
header ``x-duckcell-session: <name>``) has at most one session per API key. Whether its
statements run there depends on the role:

- a **session-mode role** (its policy has ``isolation: session``, ``role_in_sessions``) runs
  every statement in its connection's session, opened at the first statement; a statement on
  a call that names no connection is refused (``SessionRequired``) with how to get one;
- any other role runs each statement in a fresh sandbox, as before; only an explicit
  ``x-duckcell-session`` header opens a session for it (under the role's policy, else
  ``agent-session``), tokens and cookies do not.

The session ends when the client closes it (Flight SQL's ``CloseSession`` action on the same
connection, which ADBC's ``conn.close()`` and the Altertable client's ``close()`` send), when it
idles past its policy's TTL or outlives its maximum lifetime (the worker ends it and destroys the
sandbox), or when the server stops. A statement in a session that ended fails once with the
router's message (its temp state is gone) and the connection's session is forgotten, so the
next statement opens a fresh one.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict

from launcher.controlplane.apikeys import ApiKey
from launcher.controlplane.query import caller_name
from launcher.controlplane.sessions import session_policy
from launcher.errors import SessionError
from launcher.model.catalog import Catalog

from .bridge import LoopBridge, never_cancelled
from .connections import Connection
from .types import Router

# The policy of a session when the caller's role fixes none.
SESSION_POLICY = "agent-session"


# Connections whose session ids are remembered at once (see ``FlightSessions._ids``).
MAX_CONNECTIONS = 10_000


class FlightSessions:
    """Client connections -> the router's session ids, per API key (handler threads)."""

    def __init__(self, router: Router, bridge: LoopBridge) -> None:
        self._router = router
        self._bridge = bridge
        self._lock = threading.Lock()
        # (key id, name) -> (the router's session id, its owner as the router knows it), the
        # latest used last. An entry stays until its connection closes it or learns that it
        # ended; past MAX_CONNECTIONS the oldest is closed and dropped, so connections that
        # are abandoned after their session ended cannot grow the table without end.
        self._ids: OrderedDict[tuple[str, str], tuple[str, str]] = OrderedDict()

    def session_id(self, caller: ApiKey, connection: Connection, catalog: Catalog) -> str:
        """The router's id of the session of ``caller``'s ``connection``, opened now if there
        is none.

        Raises ``QueryDeniedError`` (role), ``SessionError`` (the worker could not open one)
        or ``WorkerUnavailableError``."""
        key, owner = (caller.key_id, connection.key), caller_name(caller)
        with self._lock:
            found = self._ids.get(key)
            if found is not None:
                self._ids.move_to_end(key)  # in use: the last to be dropped
        if found is not None:
            return found[0]
        policy = session_policy(catalog, caller.role, "") or SESSION_POLICY
        opened = self._bridge.call(self._router.open_session(policy, owner=owner))
        with self._lock:
            found = self._ids.setdefault(key, (opened, owner))
            dropped = []
            while len(self._ids) > MAX_CONNECTIONS:
                dropped.append(self._ids.popitem(last=False)[1])
        if found[0] != opened:  # another call opened it meanwhile: keep one
            self._bridge.spawn(self._close(opened, owner))
        for session_id, its_owner in dropped:
            self._bridge.spawn(self._close(session_id, its_owner))
        return found[0]

    def current(self, caller: ApiKey, connection: Connection) -> str:
        """The router's id of the connection's open session ("" for none); opens nothing."""
        with self._lock:
            found = self._ids.get((caller.key_id, connection.key))
        return found[0] if found is not None else ""

    def forget(self, caller: ApiKey, connection: Connection) -> None:
        """The session ended on its own: the connection's next statement opens a new one."""
        with self._lock:
            self._ids.pop((caller.key_id, connection.key), None)

    def close(self, caller: ApiKey, connection: Connection) -> bool:
        """End the session of ``caller``'s ``connection`` and destroy its sandbox; False if
        none is open."""
        with self._lock:
            found = self._ids.pop((caller.key_id, connection.key), None)
        if found is None:
            return False
        self._bridge.call(self._close(*found), never_cancelled)
        return True

    def close_all(self) -> None:
        """The server is stopping: end every session it opened."""
        with self._lock:
            found, self._ids = list(self._ids.values()), OrderedDict()
        for session_id, owner in found:
            self._bridge.spawn(self._close(session_id, owner))

    async def _close(self, session_id: str, owner: str) -> None:
        # SessionError: ended and forgotten by the router already, nothing left to close.
        with contextlib.suppress(SessionError):
            await self._router.close_session(session_id, owner=owner)
