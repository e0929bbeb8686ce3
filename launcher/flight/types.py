"""What the Flight SQL server needs from the control plane, as small typed seams.

The server is handed a router and a key check through its constructor, so tests can pass the
real ones or fakes, and this package never reaches into the control plane's state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from launcher.controlplane.apikeys import ApiKey
from launcher.controlplane.routing import QueryDone


class Router(Protocol):
    """``QueryRouter``'s client side: the worker's Arrow IPC bytes, then ``QueryDone``.

    ``caller`` names the API key for the audit log; ``role`` is its role, which the router
    checks again against the catalog at the moment it places (or moves) the query;
    ``parameters`` is an Arrow IPC stream of one row of bound values (empty: the SQL has no
    placeholders); ``session_id`` runs the query in a session ``owner`` opened with
    ``open_session``.
    """

    def run(
        self,
        sql: str,
        policy: str,
        *,
        caller: str = "",
        role: str | None = None,
        parameters: bytes = b"",
        session_id: str = "",
        owner: str = "",
    ) -> AsyncIterator[bytes | QueryDone]: ...

    async def open_session(self, policy: str = "", *, owner: str) -> str: ...

    async def close_session(self, session_id: str, *, owner: str) -> None: ...


# Checks an API key on the control plane's loop; raises ApiKeyError.
VerifyKey = Callable[[str], Awaitable[ApiKey]]
