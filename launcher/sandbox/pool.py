"""A warm pool of ready sandboxes for one policy.

Checkout is O(1): a ready sandbox is popped from a deque, or the caller waits in a FIFO of
futures that the filler serves as sandboxes come up. The filler is the only place that
creates sandboxes; it runs in the background, never doing engine work under a lock (there is
none: one event loop owns the state). It starts one sandbox per waiting query at once (while
the host cap allows, whatever else runs) and keeps the ``warm`` stock; a busy per-query
sandbox stands in for its replacement in that stock, never for a waiting query. Per-query
sandboxes are never reused: release destroys off the critical path and wakes the filler.

A warm sandbox can die while it waits (``docker kill``; an engine restart stops them all): one
idle longer than ``idle_check_s``, or ready before the engine last failed a call, is inspected
before it is handed out and replaced unless it runs. A failed removal is retried with backoff
until it succeeds, at ``close`` too (up to ``removal_deadline_s``); its slot stays taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque

from ..errors import (
    DuckcellError,
    EngineUnavailableError,
    ImageMissingError,
    OverCapacityError,
    SandboxStartError,
)
from ..model.policy import Isolation, Policy
from .capacity import Capacity
from .factory import SandboxFactory
from .spec import Sandbox, SandboxState

log = logging.getLogger(__name__)

# Errors no retry will fix: waiting queries fail at once instead of at their queue timeout.
_FATAL = (ImageMissingError, EngineUnavailableError)

IDLE_CHECK_S = 1.0  # a ready sandbox idle longer than this is inspected before hand-out (~1 ms)
CLOSING_RETRY_S = 1.0  # at close, a failed removal is retried at least this often
REMOVAL_DEADLINE_S = 30.0  # how long close waits for removals that keep failing


class SandboxPool:
    """Ready sandboxes of one policy, checked out by ``acquire`` and given back by ``release``.

    ``acquire`` raises OverCapacityError (closed, or no slot within the queue timeout),
    SandboxStartError (nothing became ready in time) or the fatal start error (image missing,
    no engine). A ready sandbox idle longer than ``idle_check_s`` is inspected before it is
    handed out; ``removal_deadline_s`` bounds how long ``close`` retries failed removals.
    """

    def __init__(
        self,
        policy: Policy,
        factory: SandboxFactory,
        capacity: Capacity,
        *,
        warm: int | None = None,
        queue_timeout_s: float = 30.0,
        max_parallel_starts: int = 2,
        idle_check_s: float = IDLE_CHECK_S,
        removal_deadline_s: float = REMOVAL_DEADLINE_S,
    ) -> None:
        self.policy = policy
        self.warm = policy.warm_pool if warm is None else warm
        self._factory = factory
        self._capacity = capacity
        self._queue_timeout_s = queue_timeout_s
        self._max_parallel_starts = max_parallel_starts
        self._ready: deque[Sandbox] = deque()
        self._waiters: deque[asyncio.Future[Sandbox]] = deque()
        self._live: set[Sandbox] = set()
        self._starting = 0
        self._checking = 0  # popped from ``_ready``, being inspected before hand-out
        self._busy = 0
        self._idle_check_s = idle_check_s
        self._removal_deadline_s = removal_deadline_s
        self._closing = asyncio.Event()  # cuts removal backoff short when close begins
        # Sandboxes ready at or before this (monotonic) time are inspected before hand-out:
        # the engine failed a call then, or a warm sandbox was found dead.
        self._doubt_at = -math.inf
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()  # tells the filler to look again
        self._changed = asyncio.Event()  # a sandbox became ready or a start failed
        self._filler: asyncio.Task[None] | None = None
        self._closed = False
        self._failures = 0
        self._retry_at = 0.0  # the filler starts nothing before this (monotonic) time
        self.last_error: DuckcellError | None = None
        capacity.register(self, self._wake.set)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        if self._filler is None:
            self._filler = asyncio.get_running_loop().create_task(self._fill_loop())

    async def wait_warm(self, timeout_s: float) -> None:
        """Wait until ``warm`` sandboxes are ready (the first fill, shown as progress)."""
        deadline = time.monotonic() + timeout_s
        while len(self._ready) < self.warm:
            if isinstance(self.last_error, _FATAL):
                raise self.last_error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                detail = f" (last error: {self.last_error})" if self.last_error else ""
                raise SandboxStartError(
                    f"pool {self.policy.name}: only {len(self._ready)} of {self.warm} "
                    f"sandboxes ready after {timeout_s:.0f} s{detail}"
                )
            self._changed.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def close(self) -> None:
        """Stop filling, fail waiters, destroy every sandbox this pool owns.

        Removals that fail are retried until they succeed or ``removal_deadline_s`` passes;
        then the containers left are logged (``duckcell sandboxes reap`` removes them).
        """
        self._closed = True
        self._closing.set()
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(OverCapacityError("launcher is shutting down"))
        for sandbox in list(self._live):
            self._destroy_later(sandbox)
        deadline = time.monotonic() + self._removal_deadline_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(list(self._tasks), timeout=deadline - time.monotonic())
        if self._tasks:
            log.error(
                "pool %s: could not remove sandbox(es) %s within %.0f s; "
                "`duckcell sandboxes reap` removes them once the engine answers",
                self.policy.name,
                ", ".join(sorted(s.name for s in self._live)) or "(a start under way)",
                self._removal_deadline_s,
            )
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        self._capacity.unregister(self)

    # --- checkout -------------------------------------------------------------------------
    async def acquire(self) -> Sandbox:
        if self._closed:
            raise OverCapacityError(f"pool {self.policy.name} is closed")
        while self._ready:
            sandbox = self._ready.popleft()
            if await self._still_alive(sandbox):
                return self._hand_out(sandbox)
            if self._closed:
                raise OverCapacityError(f"pool {self.policy.name} is closed")
        if self._retry_at == math.inf:
            # A fatal start error stopped the filler; this caller's wait is one new attempt.
            self._retry_at = 0.0
        waiter: asyncio.Future[Sandbox] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        try:
            return self._hand_out(
                await asyncio.wait_for(asyncio.shield(waiter), self._queue_timeout_s)
            )
        except TimeoutError:
            raise self._timeout_error() from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._capacity.wake_all()
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Served after we gave up: put it back for the next caller.
                sandbox = waiter.result()
                if sandbox.state is SandboxState.READY:
                    self._offer(sandbox)
            elif not waiter.done():
                waiter.cancel()

    async def _still_alive(self, sandbox: Sandbox) -> bool:
        """Whether a warm sandbox just popped from ``_ready`` may be handed out.

        Fresh ones are trusted; one idle longer than ``idle_check_s`` or ready before the
        engine last failed is inspected, and destroyed (and so replaced) unless it runs; an
        inspect that fails counts as dead. A caller cancelled meanwhile puts it back.
        """
        idle_s = time.monotonic() - sandbox.created_at
        if idle_s <= self._idle_check_s and sandbox.created_at > self._doubt_at:
            return True
        self._checking += 1
        try:
            status = (await self._factory.backend.inspect(sandbox.handle)).status
        except DuckcellError as error:
            status = f"not answering ({error})"
        except BaseException:  # the caller was cancelled: the sandbox goes back
            if sandbox.state is SandboxState.READY:
                self._offer(sandbox)
            raise
        finally:
            self._checking -= 1
        if sandbox.state is not SandboxState.READY:
            return False  # the pool closed (or retired it) meanwhile
        if status == "running":
            return True
        log.warning(
            "pool %s: warm sandbox %s is %s; replacing it", self.policy.name, sandbox.name, status
        )
        self._doubt_at = time.monotonic()  # its siblings are likely gone too: check them
        self._destroy_later(sandbox)
        return False

    def _hand_out(self, sandbox: Sandbox) -> Sandbox:
        sandbox.state = SandboxState.BUSY
        self._busy += 1
        self._wake.set()
        return sandbox

    def _timeout_error(self) -> DuckcellError:
        if self._capacity.used >= self._capacity.limit and self._starting == 0:
            return OverCapacityError(
                f"over capacity: all {self._capacity.limit} sandbox slots stayed busy for "
                f"{self._queue_timeout_s:.0f} s; retry later or raise max_sandboxes"
            )
        detail = f" (last error: {self.last_error})" if self.last_error else ""
        return SandboxStartError(
            f"no {self.policy.name} sandbox became ready within "
            f"{self._queue_timeout_s:.0f} s{detail}"
        )

    def release(self, sandbox: Sandbox) -> None:
        """Done with a sandbox: per-query sandboxes (and broken ones) are destroyed."""
        self._destroy_later(sandbox)

    # --- Reclaimable ----------------------------------------------------------------------
    def has_waiters(self) -> bool:
        return bool(self._waiters)

    def unmet_demand(self) -> int:
        """Waiting queries not yet covered by a start, if this pool may start now."""
        if time.monotonic() < self._retry_at:
            return 0
        return max(0, len(self._waiters) - self._starting)

    def reclaim_idle(self) -> bool:
        if not self._ready:
            return False
        self._destroy_later(self._ready.pop())
        return True

    # --- filling --------------------------------------------------------------------------
    def _deficit(self) -> int:
        stock = self.warm
        if self.policy.isolation is Isolation.QUERY:
            # A busy per-query sandbox is replaced when it is released, not when it is
            # checked out: on a small host a container start beside a running query slows
            # that query down (measured: a 10M-row aggregate 1.27x -> 1.04x of in-process).
            # So busy sandboxes stand in for the warm stock, but never for a waiting query:
            # a query that finds nothing ready starts one at once, whatever else is running.
            stock = max(0, self.warm - self._busy)
        have = len(self._ready) + self._checking + self._starting
        return stock + len(self._waiters) - have

    async def _fill_loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            while (
                time.monotonic() >= self._retry_at
                and self._deficit() > 0
                and self._starting < self._max_parallel_starts
                and self._take_slot()
            ):
                self._starting += 1
                self._spawn(self._start_one())
            await self._wake.wait()

    def _take_slot(self) -> bool:
        # A pool only refilling its warm stock leaves the last free slots to pools whose
        # queries are waiting (and that can start now).
        if not self._waiters and self._capacity.free() <= self._capacity.demand_elsewhere(self):
            return False
        if self._capacity.try_take():
            return True
        if self._waiters:
            self._capacity.reclaim(self)
        return False

    async def _start_one(self) -> None:
        try:
            sandbox = await self._factory.start(self.policy)
        except Exception as error:  # any failure is recorded and backed off, never lost
            self._starting -= 1
            if not isinstance(error, DuckcellError):
                error = SandboxStartError(f"sandbox start failed: {type(error).__name__}: {error}")
            self._on_failure(error)
            # Wake the other pools only: this one waits for its retry time.
            self._capacity.give_back(skip=self)
            return
        except BaseException:
            self._starting -= 1
            self._capacity.give_back()
            raise
        self._starting -= 1
        self._failures = 0
        self._retry_at = 0.0
        self.last_error = None
        self._live.add(sandbox)
        if self._closed:
            self._destroy_later(sandbox)
        else:
            self._offer(sandbox)

    def _on_failure(self, error: DuckcellError) -> None:
        self.last_error = error
        self._doubt_at = time.monotonic()  # the engine may have lost the warm ones too
        self._changed.set()
        self._failures += 1
        log.warning("pool %s: sandbox start failed: %s", self.policy.name, error)
        if isinstance(error, _FATAL):
            # No retry fixes these: stop filling until a caller asks again.
            self._retry_at = math.inf
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
            self._capacity.wake_all()
            return
        # Back off before the filler tries again, so a broken engine is not hammered.
        delay = min(5.0, 0.2 * 2 ** min(self._failures, 5))
        self._retry_at = time.monotonic() + delay
        asyncio.get_running_loop().call_later(delay, self._wake.set)

    def _offer(self, sandbox: Sandbox) -> None:
        sandbox.state = SandboxState.READY
        self._changed.set()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(sandbox)
                self._capacity.wake_all()  # demand fell: pools that deferred may refill
                return
        self._ready.append(sandbox)

    def _destroy_later(self, sandbox: Sandbox) -> None:
        if sandbox.state is SandboxState.DESTROYING:
            return
        if sandbox.state is SandboxState.BUSY:
            self._busy -= 1
        sandbox.state = SandboxState.DESTROYING
        self._wake.set()
        with contextlib.suppress(ValueError):
            self._ready.remove(sandbox)
        self._spawn(self._destroy(sandbox))

    async def _destroy(self, sandbox: Sandbox) -> None:
        """Remove a sandbox, retrying with backoff until the engine lets it go (its slot is
        given back only then: the container exists until it is removed)."""
        try:
            for attempt in itertools.count(1):
                try:
                    await self._factory.destroy(sandbox)
                except DuckcellError as error:  # the engine's answer: it may answer later
                    self._doubt_at = time.monotonic()
                    delay = min(10.0, 0.5 * 2 ** min(attempt - 1, 5))  # 0.5, 1, 2 ... 10 s
                    if attempt & (attempt - 1) == 0:  # attempts 1, 2, 4, 8...: the log stays short
                        log.warning(
                            "could not remove sandbox %s (attempt %d, next in %.1f s): %s",
                            sandbox.name,
                            attempt,
                            delay,
                            error,
                        )
                    await self._removal_pause(delay)
                    continue
                if attempt > 1:
                    log.info("sandbox %s removed at attempt %d", sandbox.name, attempt)
                return
        except Exception:  # a bug, not the engine: retrying would not help
            log.exception("could not remove sandbox %s", sandbox.name)
        finally:
            self._live.discard(sandbox)
            self._capacity.give_back()

    async def _removal_pause(self, delay_s: float) -> None:
        """Back off between removal attempts; once ``close`` began, retry at least every
        ``CLOSING_RETRY_S`` (a pause under way ends when close begins)."""
        if self._closed:
            await asyncio.sleep(min(delay_s, CLOSING_RETRY_S))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay_s)

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- introspection --------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        return {
            "ready": len(self._ready),
            "starting": self._starting,
            "checking": self._checking,
            "waiting": len(self._waiters),
            "busy": self._busy,
            "live": len(self._live),
            "removing": sum(1 for s in self._live if s.state is SandboxState.DESTROYING),
        }
