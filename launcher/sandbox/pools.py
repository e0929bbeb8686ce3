"""The launcher's warm pools, one per policy version, and how a policy update retires them.

A policy's settings shape its sandboxes (limits, DuckDB settings, runtime), so when a policy
changes (a push from the control plane, see ``LocalLauncher.replace_policies``) its pool is
*retired* and a new one starts for the new version. Retiring never cuts work short:

- the retired pool stops keeping sandboxes warm (``warm = 0``) and its idle ready sandboxes
  are destroyed at once (a query still waiting on it gets a sandbox started for it: a pool
  starts one per waiting query whatever its warm size);
- queries already running, or already waiting for a sandbox, finish under the version they
  started with, and sessions keep their sandbox (and so their version) until they end: each
  releases to the pool it acquired from;
- a background task closes the retired pool once nothing of it is left, and
  ``PolicyPools.close`` closes whatever is still around at shutdown, so no container leaks.

A query whose policy was resolved before an update but that asks for its pool only after it
gets a pool of its own old version (retired from the start): its results are what it asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from ..model.policy import Policy, PolicySet, same_settings
from .pool import SandboxPool

log = logging.getLogger(__name__)

RETIRE_POLL_S = 0.5


class PolicyPools:
    """Pools by policy name for the versions in force, plus retired pools still draining.

    ``new_pool`` builds an unstarted pool for a policy (``LocalLauncher`` sizes it);
    ``retire_poll_s`` is how often a retired pool is looked at until it can be closed.
    """

    def __init__(
        self,
        new_pool: Callable[[Policy], SandboxPool],
        *,
        retire_poll_s: float = RETIRE_POLL_S,
    ) -> None:
        self._new_pool = new_pool
        self._retire_poll_s = retire_poll_s
        self._current: dict[str, SandboxPool] = {}
        self._retired: set[SandboxPool] = set()
        self._closing: set[SandboxPool] = set()  # retired, drained, being closed
        self._closers: set[asyncio.Task[None]] = set()

    def pool_for(self, policy: Policy) -> SandboxPool:
        """The pool that runs ``policy``'s sandboxes, started on first use."""
        pool = self._current.get(policy.name)
        if pool is None:
            pool = self._current[policy.name] = self._start(policy)
            return pool
        if same_settings(pool.policy, policy):
            return pool
        for retired in self._retired:
            if same_settings(retired.policy, policy):
                return retired
        stale = self._start(policy)  # an old version asked for late: a pool just for it
        self._retire(stale)
        return stale

    def replace(self, policies: PolicySet) -> list[str]:
        """Make ``policies`` the versions in force; returns the names whose pool was retired.

        A pool whose policy changed is retired and a pool for the new version started; a pool
        whose policy is gone is retired; pools of unchanged policies stay as they are.
        """
        changed = []
        for name, pool in sorted(self._current.items()):
            new = policies.get(name) if name in policies else None
            if new is not None and same_settings(pool.policy, new):
                continue
            del self._current[name]
            self._retire(pool)
            changed.append(name)
            if new is not None:
                self._current[name] = self._start(new)
        return changed

    def warm_all(self, policies: Iterable[Policy]) -> list[str]:
        """Start a pool for each of ``policies`` that has none yet, so it fills its warm stock
        in the background now rather than at its first query; returns their names."""
        started = []
        for policy in policies:
            if policy.name not in self._current:
                self._current[policy.name] = self._start(policy)
                started.append(policy.name)
        return started

    def current(self) -> dict[str, SandboxPool]:
        return dict(self._current)

    def retired(self) -> list[SandboxPool]:
        """Retired pools not closed yet (sandboxes of an old version still in use)."""
        return list(self._retired)

    async def close(self) -> None:
        """Close every pool, current and retired: all their sandboxes are destroyed."""
        for closer in self._closers:
            closer.cancel()
        pools = [*self._current.values(), *self._retired, *self._closing]
        self._current.clear()
        self._retired.clear()
        await asyncio.gather(*(pool.close() for pool in pools))

    def _start(self, policy: Policy) -> SandboxPool:
        pool = self._new_pool(policy)
        pool.start()
        return pool

    def _retire(self, pool: SandboxPool) -> None:
        pool.warm = 0
        while pool.reclaim_idle():
            pass
        self._retired.add(pool)
        closer = asyncio.get_running_loop().create_task(self._close_when_drained(pool))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        log.info("pool %s retired: %s", pool.policy.name, pool.stats())

    async def _close_when_drained(self, pool: SandboxPool) -> None:
        """Poll until nothing of the retired pool is in use, then close it."""
        while True:
            await asyncio.sleep(self._retire_poll_s)
            if not pool.has_waiters():
                while pool.reclaim_idle():  # a start that was under way when it retired
                    pass
            stats = pool.stats()
            if any(stats[key] for key in ("busy", "waiting", "starting", "checking", "ready")):
                continue
            self._retired.discard(pool)
            self._closing.add(pool)
            try:
                # Shielded: ``close`` cancels this task but must not cut a removal short; it
                # closes the pool again itself, which waits for the same removals.
                await asyncio.shield(pool.close())
            finally:
                self._closing.discard(pool)
            log.info("retired pool %s closed", pool.policy.name)
            return
