"""Sessions for Flight SQL clients: statements that share one sandbox, by a header.

A client that wants its statements to share state (temp tables, variables) names a session in
the header ``x-duckcell-session: <name>`` on its calls; ADBC sets it on every call with
``adbc.flight.sql.rpc.call_header.x-duckcell-session``. The first statement with a name this
API key has no open session for opens one through the router (one sandbox on one worker, under
the role's policy, else ``agent-session``); later statements with that name run there. Names
are the client's own (``[A-Za-z0-9._-]``, up to 64): a header that is the same on every call is
all the ADBC driver can send, so the server, not the client, remembers the router's session id.

The session ends when the client closes it (Flight SQL's ``CloseSession`` action with the same
header, which ``conn.close()`` sends), when it idles past its policy's TTL or outlives its
maximum lifetime (the worker ends it and destroys the sandbox), or when the server stops. A
statement naming a session that ended fails once with the router's message (its temp state is
gone) and the name is forgotten, so the next statement opens a fresh session.

Flight SQL's own ``SetSessionOptions`` is not used: the ADBC driver sends it only when a client
sets session options, and it carries no way to ask for a sandbox.
"""

from __future__ import annotations

import contextlib
import re
import threading

from launcher.controlplane.apikeys import ApiKey
from launcher.controlplane.query import caller_name
from launcher.controlplane.sessions import session_policy
from launcher.errors import SessionError
from launcher.model.catalog import Catalog

from .bridge import LoopBridge, never_cancelled
from .messages import InvalidRequest
from .types import Router

# The policy of a session when the caller's role fixes none.
SESSION_POLICY = "agent-session"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class FlightSessions:
    """Client session names -> the router's session ids, per API key (handler threads)."""

    def __init__(self, router: Router, bridge: LoopBridge) -> None:
        self._router = router
        self._bridge = bridge
        self._lock = threading.Lock()
        # (key id, name) -> (the router's session id, its owner as the router knows it)
        self._ids: dict[tuple[str, str], tuple[str, str]] = {}

    def session_id(self, caller: ApiKey, name: str, catalog: Catalog) -> str:
        """The router's id of ``caller``'s session ``name``, opened now if there is none.

        Raises ``QueryDeniedError`` (role), ``SessionError`` (the worker could not open one)
        or ``WorkerUnavailableError``; ``InvalidRequest`` for a malformed name."""
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"x-duckcell-session: {name!r} is not a session name; use up to 64 letters, "
                "digits, '.', '_' or '-'"
            )
        key, owner = (caller.key_id, name), caller_name(caller)
        with self._lock:
            found = self._ids.get(key)
        if found is not None:
            return found[0]
        policy = session_policy(catalog, caller.role, "") or SESSION_POLICY
        opened = self._bridge.call(self._router.open_session(policy, owner=owner))
        with self._lock:
            found = self._ids.setdefault(key, (opened, owner))
        if found[0] != opened:  # another call opened it meanwhile: keep one
            self._bridge.spawn(self._close(opened, owner))
        return found[0]

    def forget(self, caller: ApiKey, name: str) -> None:
        """The session ended on its own: the next statement with ``name`` opens a new one."""
        with self._lock:
            self._ids.pop((caller.key_id, name), None)

    def close(self, caller: ApiKey, name: str) -> bool:
        """End ``caller``'s session ``name`` and destroy its sandbox; False if none is open."""
        with self._lock:
            found = self._ids.pop((caller.key_id, name), None)
        if found is None:
            return False
        self._bridge.call(self._close(*found), never_cancelled)
        return True

    def close_all(self) -> None:
        """The server is stopping: end every session it opened."""
        with self._lock:
            found, self._ids = list(self._ids.values()), {}
        for session_id, owner in found:
            self._bridge.spawn(self._close(session_id, owner))

    async def _close(self, session_id: str, owner: str) -> None:
        # SessionError: ended and forgotten by the router already, nothing left to close.
        with contextlib.suppress(SessionError):
            await self._router.close_session(session_id, owner=owner)
