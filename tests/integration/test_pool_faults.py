"""The pool under faults, against the real engine: warm at start, a warm sandbox killed behind
the pool's back, slow queries side by side (issue 17, items 2, 3 and 7).

Each test builds a launcher over one policy of its own, so what its pool holds is all there is.
Waits are on state (the engine's container list, the pool's counts, a query's sandbox), except
where the pool's own rule is a duration (``IDLE_CHECK_S``), which the test names.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import docker
import pytest

from launcher.executor import QueryExecution, collect_table
from launcher.host import LocalLauncher
from launcher.model.policy import Policy, PolicySet, load_policy_text
from launcher.sandbox.backend.docker_engine import DockerBackend
from launcher.sandbox.pool import IDLE_CHECK_S
from tests.support.waiting import eventually

from .conftest import containers_of, make_config, run

pytestmark = pytest.mark.docker

DEADLINE_S = 60.0
_POLICY = """
name: {name}
isolation: query
runtime: runc
limits: {{cpus: 1, memory: 256MiB, pids: 128, scratch: 64MiB, statement_timeout: 60s}}
duckdb: {{threads: 1, memory_limit: 128MiB}}
pool: {{warm: {warm}}}
"""
# Streams rows until its reader stops: once its first chunk arrived it holds its sandbox,
# blocked on the stream's flow control, without burning the shared CPUs.
ENDLESS = "SELECT range AS n FROM range(100000000000)"


def policy(name: str, warm: int) -> Policy:
    return load_policy_text(_POLICY.format(name=name, warm=warm), f"<{name}>")


def running(engine: docker.DockerClient, launcher_id: str) -> set[str]:
    found = engine.api.containers(filters={"label": f"duckcell.launcher={launcher_id}"})
    return {name.lstrip("/") for c in found for name in c["Names"][:1]}


class HeldQuery:
    """A query that runs until ``stop``: it reads one chunk, then holds its sandbox."""

    def __init__(self, execution: QueryExecution) -> None:
        self.execution = execution
        self.running = asyncio.Event()  # its first chunk arrived: it runs in its sandbox
        self._stop = asyncio.Event()
        self.task = asyncio.ensure_future(self._hold())

    async def _hold(self) -> None:
        async with contextlib.aclosing(self.execution.chunks()) as chunks:
            async for _ in chunks:
                self.running.set()
                await self._stop.wait()
                return  # closing the stream releases (destroys) its sandbox

    async def until_running(self) -> None:
        waiting = asyncio.ensure_future(self.running.wait())
        done, _ = await asyncio.wait(
            {waiting, self.task}, timeout=DEADLINE_S, return_when=asyncio.FIRST_COMPLETED
        )
        waiting.cancel()
        if self.task in done:
            self.task.result()
            raise AssertionError("the query ended before it held its sandbox")
        assert waiting in done, "the query never reached a sandbox"

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(self.task, DEADLINE_S)


def test_pools_fill_at_start_and_a_killed_warm_sandbox_is_replaced(
    image: str, policies_dir: Path, engine: docker.DockerClient
) -> None:
    """Without any query the policy's pool fills at start (item 7); ``docker kill`` of every
    warm sandbox behind the pool's back, and the next query still succeeds (item 3): the
    pool inspects a warm sandbox idle longer than ``IDLE_CHECK_S`` and replaces a dead one."""
    config = make_config(image, policies_dir)
    warm_two = policy("warm-two", warm=2)

    async def body() -> None:
        async with LocalLauncher(
            config, DockerBackend.for_config(config), policies=PolicySet([warm_two])
        ) as launcher:
            # No pool_for, no query: the launcher's start began the fill.
            await eventually(
                lambda: len(running(engine, config.launcher_id)) == 2,
                "two warm sandboxes running after start",
                DEADLINE_S,
            )
            pool = launcher.pool_for(warm_two)
            await pool.wait_warm(DEADLINE_S)
            warmed_at = time.monotonic()
            killed = running(engine, config.launcher_id)
            for name in killed:
                engine.api.kill(name)
            await eventually(
                lambda: not running(engine, config.launcher_id) & killed, "the kills", DEADLINE_S
            )
            # The pool's rule, not a guess: warm sandboxes idle this long are inspected.
            await eventually(lambda: time.monotonic() - warmed_at > IDLE_CHECK_S, "idle")
            execution = launcher.execute("SELECT 42 AS answer", policy="warm-two")
            table = await collect_table(execution)
            assert table.to_pylist() == [{"answer": 42}]
            assert execution.record.sandbox not in killed
            await eventually(
                lambda: not set(containers_of(engine, config.launcher_id)) & killed,
                "the killed sandboxes removed",
                DEADLINE_S,
            )
            await pool.wait_warm(DEADLINE_S)
        assert containers_of(engine, config.launcher_id) == []

    run(body())


def test_slow_queries_each_get_a_sandbox_at_once_below_the_cap(
    image: str, policies_dir: Path, engine: docker.DockerClient
) -> None:
    """Pool of warm 1, host cap 3: three slow queries arriving one after the other each get
    a sandbox while the others still run (item 2: busy sandboxes never stand for a queued
    query); a fourth, at the cap, waits until one ends, then runs."""
    config = make_config(image, policies_dir, max_sandboxes=3)
    warm_one = policy("warm-one", warm=1)

    async def body() -> list[float]:
        async with LocalLauncher(
            config, DockerBackend.for_config(config), policies=PolicySet([warm_one])
        ) as launcher:
            pool = launcher.pool_for(warm_one)
            await pool.wait_warm(DEADLINE_S)
            held: list[HeldQuery] = []
            for _ in range(3):
                query = HeldQuery(launcher.execute(ENDLESS, policy="warm-one"))
                await query.until_running()
                assert not any(other.task.done() for other in held)  # no one had to end
                held.append(query)
            assert len(set(q.execution.record.sandbox for q in held)) == 3
            fourth = HeldQuery(launcher.execute(ENDLESS, policy="warm-one"))
            await eventually(lambda: pool.stats()["waiting"] == 1, "the fourth queues at the cap")
            assert launcher.capacity.used == 3
            await held[0].stop()
            await fourth.until_running()
            for query in [*held[1:], fourth]:
                await query.stop()
            return [q.execution.record.queued_s for q in [*held, fourth]]

    queued = run(body())
    print("queued s:", " ".join(f"{q:.2f}" for q in queued))
    # Below the cap a query waits at most for one container start, never for a query.
    assert max(queued[:3]) < 15.0, queued
    assert containers_of(engine, config.launcher_id) == []
