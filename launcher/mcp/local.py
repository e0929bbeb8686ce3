"""The MCP tools' backend on this host: an embedded launcher and, with a catalog, its data path.

What ``duckcell query --catalog`` does for one statement, kept open for a conversation: the
session is the launcher's (``SessionManager``: idle TTL and max lifetime from the policy), and
each statement's catalog tables are prepared by the data path and linked into the session's
sandbox before it runs (``Executor.run_query``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from ..data.datapath import DataPath
from ..host import LocalLauncher
from .backend import TableInfo


class LocalBackend:
    """Sessions of ``policy`` on ``launcher``; ``data`` (None: no catalog) binds tables."""

    def __init__(self, launcher: LocalLauncher, data: DataPath | None, policy: str) -> None:
        self._launcher = launcher
        self._data = data
        self._policy = launcher.policies.get(policy)  # UnknownPolicyError now, not later
        self.policy = self._policy.name

    @property
    def where(self) -> str:
        return f"a sandbox on this host (policy {self.policy})"

    async def open_session(self) -> str:
        session = await self._launcher.sessions.open(self._policy)
        return session.session_id

    async def close_session(self, session_id: str) -> None:
        self._launcher.close_session(session_id)

    async def chunks(self, sql: str, session_id: str) -> AsyncIterator[bytes]:
        self._launcher.sessions.get(session_id)  # SessionError (why it ended) before any work
        run = self._launcher.executor.run_query(sql, session_id=session_id, data=self._data)
        async with run as execution, contextlib.aclosing(execution.chunks()) as chunks:
            async for chunk in chunks:
                yield chunk

    async def tables(self) -> list[TableInfo]:
        if self._data is None:
            return []
        catalog = self._data.catalog
        return [
            TableInfo(name, f"{table.format} on connection {table.connection}")
            for name, table in sorted(catalog.tables.items())
        ]
