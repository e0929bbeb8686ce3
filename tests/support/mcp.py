"""MCP test support: a backend of in-process DuckDB connections, and the stdio server's launch.

``DuckdbBackend`` stands in for a launcher in unit tests of the tools and the session
lifecycle: one real DuckDB connection per session (so temp tables behave as in a sandbox), its
results as Arrow IPC bytes like a sandbox's; ``end`` ends a session the way an idle TTL does.
``stdio_server`` is how the integration tests start ``duckcell mcp`` with the real MCP client.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.ipc
from mcp import StdioServerParameters

from launcher.errors import SessionError, SqlError
from launcher.mcp.backend import TableInfo

REPO = Path(__file__).resolve().parents[2]
PIECE = 65_536


class DuckdbBackend:
    def __init__(self, tables: Mapping[str, pa.Table] | None = None) -> None:
        self._tables = dict(tables or {})
        self.sessions: dict[str, duckdb.DuckDBPyConnection] = {}
        self.ended: dict[str, str] = {}
        self.closed: list[str] = []
        self.statements: list[tuple[str, str]] = []  # (session id, sql)

    @property
    def where(self) -> str:
        return "in-process DuckDB (test)"

    async def open_session(self) -> str:
        session_id = uuid.uuid4().hex
        connection = duckdb.connect()
        for name, table in self._tables.items():
            connection.register(name, table)
        self.sessions[session_id] = connection
        return session_id

    async def close_session(self, session_id: str) -> None:
        connection = self.sessions.pop(session_id, None)
        if connection is not None:
            connection.close()
            self.closed.append(session_id)

    def end(self, session_id: str, why: str) -> None:
        self.sessions.pop(session_id).close()
        self.ended[session_id] = why

    async def chunks(self, sql: str, session_id: str) -> AsyncIterator[bytes]:
        if session_id in self.ended:
            raise SessionError(f"session {session_id} has ended: it {self.ended[session_id]}")
        self.statements.append((session_id, sql))
        try:
            table = self.sessions[session_id].sql(sql)
            table = table.to_arrow_table() if table is not None else pa.table({"Count": [0]})
        except duckdb.Error as error:
            raise SqlError(str(error)) from None
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=10_000):
                writer.write_batch(batch)
        data = sink.getvalue().to_pybytes()
        for at in range(0, len(data), PIECE):  # pieces that cut messages, as a network may
            yield data[at : at + PIECE]

    async def tables(self) -> list[TableInfo]:
        return [TableInfo(name, "arrow table (test)") for name in sorted(self._tables)]


def stdio_server(args: list[str], env: Mapping[str, str]) -> StdioServerParameters:
    """``duckcell mcp ARGS`` from this checkout; the server inherits nothing but ``env`` (and
    the few variables the SDK passes), so it gets this checkout's PYTHONPATH here."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "launcher.cli", "mcp", *args],
        env={"PYTHONPATH": str(REPO), **env},
        cwd=str(REPO),
    )
