"""The host-wide cap on live sandboxes, shared by every pool of one launcher.

A slot is taken before a container is created and given back after it is removed, so the
count is of containers that exist, warm or busy. Pools register a wake-up callback: when a
slot frees, every pool's filler looks again. When a pool with waiting queries finds no slot,
``reclaim`` destroys an idle warm sandbox of a pool nobody is waiting on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Reclaimable(Protocol):
    def reclaim_idle(self) -> bool:
        """Give up one idle warm sandbox (its slot comes back once it is removed)."""
        ...

    def has_waiters(self) -> bool: ...

    def unmet_demand(self) -> int: ...


class Capacity:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("capacity limit must be at least 1")
        self.limit = limit
        self._used = 0
        self._pools: list[tuple[Reclaimable, Callable[[], None]]] = []

    @property
    def used(self) -> int:
        return self._used

    def register(self, pool: Reclaimable, wake: Callable[[], None]) -> None:
        self._pools.append((pool, wake))

    def unregister(self, pool: Reclaimable) -> None:
        """Forget a closed pool (a policy update retires pools while the launcher runs)."""
        self._pools = [(p, wake) for p, wake in self._pools if p is not pool]

    def pool_count(self) -> int:
        return len(self._pools)

    def try_take(self) -> bool:
        if self._used >= self.limit:
            return False
        self._used += 1
        return True

    def give_back(self, skip: Reclaimable | None = None) -> None:
        """Return a slot and wake the pools (but ``skip``: a pool backing off a failure)."""
        if self._used <= 0:
            raise RuntimeError("capacity slot given back twice")
        self._used -= 1
        for pool, wake in self._pools:
            if pool is not skip:
                wake()

    def free(self) -> int:
        return self.limit - self._used

    def demand_elsewhere(self, asking: Reclaimable) -> int:
        """Slots other pools' waiting queries still need."""
        return sum(pool.unmet_demand() for pool, _ in self._pools if pool is not asking)

    def wake_all(self) -> None:
        for _, wake in self._pools:
            wake()

    def reclaim(self, asking: Reclaimable) -> bool:
        for pool, _ in self._pools:
            if pool is not asking and not pool.has_waiters() and pool.reclaim_idle():
                return True
        return False
