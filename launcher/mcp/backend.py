"""The port the MCP tools run SQL through: one small protocol, two implementations.

``LocalBackend`` (``launcher.mcp.local``) runs on this host's launcher; ``RemoteBackend``
(``launcher.mcp.remote``) through a control plane with an API key. The tools and the session
lifecycle (``launcher.mcp.conversation``) see only this, so the same code serves both, and a
unit test can hand in a backend of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A catalog table the caller may read. ``source`` says what it is over, for a person
    (a format and a connection's name; never a credential)."""

    name: str
    source: str = ""


class SqlBackend(Protocol):
    """Sessions and statements. Every method raises ``DuckcellError`` subclasses only:
    ``SessionError`` when the session has ended (its message says why), ``QueryError`` for a
    refused or failed statement (DuckDB's message, or the refusal's reason)."""

    @property
    def where(self) -> str:
        """Where statements run, for a person ("this host", "control plane HOST:PORT")."""
        ...

    async def open_session(self) -> str:
        """Open a session under the policy this backend uses for agents; returns its id."""
        ...

    async def close_session(self, session_id: str) -> None:
        """Close it and destroy its sandbox; an ended or unknown one closes quietly."""
        ...

    def chunks(self, sql: str, session_id: str) -> AsyncIterator[bytes]:
        """The statement's Arrow IPC stream bytes as they arrive. Leaving the iteration early
        (or cancelling the task reading it) stops the statement."""
        ...

    async def tables(self) -> list[TableInfo]:
        """The catalog tables the caller may read, by name."""
        ...
