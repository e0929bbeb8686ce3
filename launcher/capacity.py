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


class Capacity:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("capacity limit must be at least 1")
        self.limit = limit
        self._used = 0
        self._wakers: list[Callable[[], None]] = []
        self._pools: list[Reclaimable] = []

    @property
    def used(self) -> int:
        return self._used

    def register(self, pool: Reclaimable, wake: Callable[[], None]) -> None:
        self._pools.append(pool)
        self._wakers.append(wake)

    def try_take(self) -> bool:
        if self._used >= self.limit:
            return False
        self._used += 1
        return True

    def give_back(self) -> None:
        self._used = max(0, self._used - 1)
        for wake in self._wakers:
            wake()

    def reclaim(self, asking: Reclaimable) -> bool:
        for pool in self._pools:
            if pool is not asking and not pool.has_waiters() and pool.reclaim_idle():
                return True
        return False
