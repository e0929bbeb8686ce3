"""One MCP session's duckcell session: opened at its first statement, ended with it.

Temp tables, views, macros and variables live in the session's sandbox, so they persist
across the tool calls of one conversation and never reach another. The session ends when
the conversation does (``close``), when the agent resets it (``reset``), or when duckcell ends
it (the policy's idle TTL or max lifetime, a sandbox that was lost); in that last case the next
statement is answered with why it ended and that its state is gone, and the one after opens a
fresh session, so an agent never runs on a silently emptied session.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from ..errors import SessionError
from .backend import SqlBackend
from .export import Exports


class SessionEndedError(SessionError):
    """The conversation's session ended since its last statement; the message says why."""


class Conversation:
    """``exports``: where this conversation's exports go, when it has a directory of its own
    (the HTTP endpoint's); else the server's (``ToolSettings.exports``)."""

    def __init__(self, backend: SqlBackend, exports: Exports | None = None) -> None:
        self.backend = backend
        self.exports = exports
        self.session_id: str | None = None
        self.statements = 0  # statements run in the current session
        self.running = 0  # statements running now
        self._opening = asyncio.Lock()
        self._closed = False

    async def _session(self) -> str:
        async with self._opening:
            if self._closed:
                raise SessionError("this MCP session is closing: start a new conversation")
            if self.session_id is None:
                self.session_id = await self.backend.open_session()
                self.statements = 0
            return self.session_id

    async def chunks(self, sql: str) -> AsyncIterator[bytes]:
        """The statement's IPC bytes, run in the conversation's session (opened if need be).
        Raises ``SessionEndedError`` when that session had ended meanwhile."""
        session_id = await self._session()
        stream = self.backend.chunks(sql, session_id)
        self.running += 1
        try:
            async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    yield chunk
        except SessionError as error:
            if self.session_id == session_id:
                self.session_id = None
            raise SessionEndedError(
                f"{error}. Its temp tables, views and settings are gone; your next statement "
                "opens a new session."
            ) from None
        finally:
            self.running -= 1
        self.statements += 1

    @property
    def idle(self) -> bool:
        return self.running == 0

    async def reset(self) -> str | None:
        """End the current session (None if there was none); the next statement opens anew."""
        async with self._opening:
            session_id, self.session_id = self.session_id, None
        if session_id is not None:
            await self.backend.close_session(session_id)
        return session_id

    async def close(self) -> None:
        """The conversation ended: close its session; later statements are refused."""
        async with self._opening:
            self._closed = True
            session_id, self.session_id = self.session_id, None
        if session_id is not None:
            with contextlib.suppress(SessionError):
                await self.backend.close_session(session_id)
