"""Session mode: one sandbox bound to one session id until close, idle TTL or max lifetime.

Temp tables live in the sandbox's DuckDB, so they survive between the session's queries and
vanish with it. A reaper task ends sessions that idled too long or lived too long.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import SessionError
from ..model.policy import Isolation, Policy
from .pool import SandboxPool
from .spec import Sandbox


@dataclass(eq=False, slots=True)
class Session:
    """A sandbox held for one session: its queries run there one at a time (``lock``), so
    their temp tables and settings persist, until it is closed, idles past its policy's TTL
    or outlives its maximum lifetime."""

    session_id: str
    policy: Policy
    sandbox: Sandbox
    pool: SandboxPool
    opened_at: float
    last_used: float
    active_queries: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def expired_reason(self, now: float) -> str | None:
        settings = self.policy.session
        if now - self.opened_at >= settings.max_lifetime_s:
            return f"reached its max lifetime of {settings.max_lifetime_s:.0f} s"
        if self.active_queries == 0 and now - self.last_used >= settings.idle_ttl_s:
            return f"was idle for more than {settings.idle_ttl_s:.0f} s"
        return None


class SessionManager:
    """The open sessions of one host: ``open`` takes a sandbox from the session policy's pool
    and keeps it; ``get`` raises ``SessionError`` for an unknown or ended session (saying why
    it ended); a reaper task ends the idle and the too-old ones every ``reap_interval_s``;
    ``close_all`` ends every one at shutdown (their sandboxes are destroyed)."""

    def __init__(
        self,
        pool_for: Callable[[Policy], SandboxPool],
        *,
        clock: Callable[[], float] = time.monotonic,
        reap_interval_s: float = 1.0,
    ) -> None:
        self._pool_for = pool_for
        self._clock = clock
        self._reap_interval_s = reap_interval_s
        self._sessions: dict[str, Session] = {}
        self._ended: dict[str, str] = {}  # session id -> why it ended, for clear errors
        self._reaper: asyncio.Task[None] | None = None

    async def open(self, policy: Policy) -> Session:
        if policy.isolation is not Isolation.SESSION:
            raise SessionError(
                f"policy {policy.name} has isolation {policy.isolation.value}; sessions need "
                "a policy with isolation: session (for example agent-session)"
            )
        pool = self._pool_for(policy)
        sandbox = await pool.acquire()
        now = self._clock()
        session = Session(uuid.uuid4().hex, policy, sandbox, pool, now, now)
        self._sessions[session.session_id] = session
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())
        return session

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            why = self._ended.get(session_id)
            if why:
                raise SessionError(f"session {session_id} has ended: it {why}")
            raise SessionError(f"unknown session {session_id}")
        return session

    def ended_reason(self, session_id: str) -> str | None:
        return self._ended.get(session_id)

    def close(self, session_id: str, why: str = "was closed") -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        self._ended[session_id] = why
        session.pool.release(session.sandbox)

    def reap(self) -> list[str]:
        """End expired sessions now; returns their ids."""
        now = self._clock()
        ended = []
        for session in list(self._sessions.values()):
            why = session.expired_reason(now)
            if why:
                self.close(session.session_id, why)
                ended.append(session.session_id)
        return ended

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval_s)
            self.reap()

    async def close_all(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for session_id in list(self._sessions):
            self.close(session_id, "was closed when the launcher stopped")

    def __len__(self) -> int:
        return len(self._sessions)
