"""The MCP tools' backend through a control plane: its ``Query`` service, with an API key.

The control plane authenticates the key, checks its role against every table a statement
reads, routes the session to a worker and audits every statement, as for any client; this is
a ``ControlPlaneClient`` kept open for the conversation.

The session's policy: the one named (``policy``), else the role's own when the role is bound to
one, else ``agent-session``. The ``Query`` service does not say a role's policy, so a session is
asked for as ``agent-session`` first and, refused because the role is bound to another policy,
again with no name (the control plane then uses the role's).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ..client import ControlPlaneClient
from ..errors import QueryDeniedError
from .backend import TableInfo

AGENT_POLICY = "agent-session"


class RemoteBackend:
    def __init__(
        self,
        client: ControlPlaneClient,
        address: str,
        policy: str = "",
    ) -> None:
        self._client = client
        self._address = address
        self._policy = policy

    @property
    def where(self) -> str:
        return f"a worker of the control plane at {self._address}"

    async def open_session(self) -> str:
        if self._policy:
            return await self._client.open_session(self._policy)
        try:
            return await self._client.open_session(AGENT_POLICY)
        except QueryDeniedError:
            return await self._client.open_session("")  # the role's own policy

    async def close_session(self, session_id: str) -> None:
        await self._client.close_session(session_id)

    async def chunks(self, sql: str, session_id: str) -> AsyncIterator[bytes]:
        # Closed however the reader stops: the statement ends now, not when the garbage
        # collector finalizes an abandoned stream.
        async with contextlib.aclosing(self._client.chunks(sql, session_id=session_id)) as stream:
            async for chunk in stream:
                yield chunk

    async def tables(self) -> list[TableInfo]:
        return [
            TableInfo(t.name, f"{t.format} on connection {t.connection}")
            for t in await self._client.tables(timeout_s=30)
        ]
