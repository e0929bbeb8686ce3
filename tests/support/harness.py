"""One host's sandboxes over ``FakeBackend``: pools, capacity, sessions and the executor.

The unit tier's stand-in for ``LocalLauncher`` without Docker: real runners, real DuckDB, one
``SandboxPool`` per policy, started on first use.
"""

from __future__ import annotations

from launcher.executor import Executor
from launcher.model.policy import Policy
from launcher.sandbox.capacity import Capacity
from launcher.sandbox.factory import FactorySettings, SandboxFactory
from launcher.sandbox.pool import IDLE_CHECK_S, REMOVAL_DEADLINE_S, SandboxPool
from launcher.sandbox.sessions import SessionManager

from .fakes import FakeBackend


class Harness:
    """Pools made on demand by ``pool_for``; ``close`` ends sessions, then every pool."""

    def __init__(
        self,
        backend: FakeBackend,
        capacity: int = 8,
        queue_timeout_s: float = 5,
        cache_dir: str | None = None,
        idle_check_s: float = IDLE_CHECK_S,
        removal_deadline_s: float = REMOVAL_DEADLINE_S,
    ) -> None:
        self.backend = backend
        self.factory = SandboxFactory(
            backend, FactorySettings("img", "unit", "inst", cache_dir, start_timeout_s=5)
        )
        self.capacity = Capacity(capacity)
        self.queue_timeout_s = queue_timeout_s
        self.idle_check_s = idle_check_s
        self.removal_deadline_s = removal_deadline_s
        self.pools: dict[str, SandboxPool] = {}
        self.sessions = SessionManager(self.pool_for)
        self.executor = Executor(backend, self.pool_for, self.sessions, kill_grace_s=1)

    def pool_for(self, policy: Policy) -> SandboxPool:
        if policy.name not in self.pools:
            pool = SandboxPool(
                policy,
                self.factory,
                self.capacity,
                queue_timeout_s=self.queue_timeout_s,
                idle_check_s=self.idle_check_s,
                removal_deadline_s=self.removal_deadline_s,
            )
            pool.start()
            self.pools[policy.name] = pool
        return self.pools[policy.name]

    async def close(self) -> None:
        await self.sessions.close_all()
        for pool in self.pools.values():
            await pool.close()
