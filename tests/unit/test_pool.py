"""The pool, sessions and executor over FakeBackend: real runners, no Docker engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from launcher.capacity import Capacity
from launcher.catalog import Binding
from launcher.datapath import TableFiles
from launcher.errors import (
    ImageMissingError,
    OverCapacityError,
    QueryCancelledError,
    SandboxLostError,
    SandboxStartError,
    SessionError,
    SqlError,
)
from launcher.executor import Executor, QueryExecution, collect_table
from launcher.factory import FactorySettings, SandboxFactory
from launcher.policy import Policy, load_policy_text
from launcher.pool import SandboxPool
from launcher.session import SessionManager

from .fakes import FakeBackend

T = TypeVar("T")

QUERY_POLICY = """
name: q
isolation: query
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}
pool: {warm: 2}
"""
SESSION_POLICY = QUERY_POLICY.replace("name: q", "name: s").replace("query\n", "session\n", 1)


class Harness:
    def __init__(
        self,
        backend: FakeBackend,
        capacity: int = 8,
        queue_timeout_s: float = 5,
        cache_dir: str | None = None,
    ) -> None:
        self.backend = backend
        self.factory = SandboxFactory(
            backend, FactorySettings("img", "unit", "inst", cache_dir, start_timeout_s=5)
        )
        self.capacity = Capacity(capacity)
        self.queue_timeout_s = queue_timeout_s
        self.pools: dict[str, SandboxPool] = {}
        self.sessions = SessionManager(self.pool_for)
        self.executor = Executor(backend, self.pool_for, self.sessions, kill_grace_s=1)

    def pool_for(self, policy: Policy) -> SandboxPool:
        if policy.name not in self.pools:
            pool = SandboxPool(
                policy, self.factory, self.capacity, queue_timeout_s=self.queue_timeout_s
            )
            pool.start()
            self.pools[policy.name] = pool
        return self.pools[policy.name]

    async def close(self) -> None:
        await self.sessions.close_all()
        for pool in self.pools.values():
            await pool.close()


def scenario(body: Callable[[Harness], Awaitable[T]], **kwargs: object) -> T:
    async def main() -> T:
        harness = Harness(FakeBackend(), **kwargs)  # type: ignore[arg-type]
        try:
            return await body(harness)
        finally:
            await harness.close()
            assert harness.backend.live() == 0, "pool left containers behind"

    return asyncio.run(main())


QUERY = load_policy_text(QUERY_POLICY, "<test>")


async def until_in_sandbox(execution: QueryExecution) -> None:
    """Wait (bounded) until a query has been handed its sandbox."""
    for _ in range(500):
        if execution.record.sandbox:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("query never reached a sandbox")


SESSION = load_policy_text(SESSION_POLICY, "<test>")
DEADLINE_S = 10.0


def test_pool_warms_to_its_size_and_never_reuses_a_sandbox() -> None:
    async def body(h: Harness) -> None:
        pool = h.pool_for(QUERY)
        await pool.wait_warm(10)
        assert pool.stats()["ready"] == 2
        seen = set()
        for _ in range(4):
            execution = h.executor.execute("SELECT 1", policy=QUERY)
            await collect_table(execution)
            seen.add(execution.record.sandbox)
        assert len(seen) == 4
        await pool.wait_warm(10)
        assert pool.stats()["ready"] == 2

    scenario(body)


def test_temp_table_does_not_survive_into_the_next_query() -> None:
    async def body(h: Harness) -> None:
        await collect_table(h.executor.execute("CREATE TEMP TABLE t AS SELECT 1", policy=QUERY))
        with pytest.raises(SqlError, match="t does not exist"):
            await collect_table(h.executor.execute("SELECT * FROM t", policy=QUERY))

    scenario(body)


def test_session_keeps_state_and_expires_when_idle() -> None:
    async def body(h: Harness) -> None:
        session = await h.sessions.open(SESSION)
        sid = session.session_id
        await collect_table(
            h.executor.execute("CREATE TEMP TABLE t AS SELECT 5 AS v", session_id=sid)
        )
        table = await collect_table(h.executor.execute("SELECT v FROM t", session_id=sid))
        assert table.to_pylist() == [{"v": 5}]
        session.last_used -= SESSION.session.idle_ttl_s + 1
        assert h.sessions.reap() == [sid]
        with pytest.raises(SessionError, match="idle"):
            h.executor.execute("SELECT 1", session_id=sid)

    scenario(body)


def test_query_policy_cannot_open_a_session() -> None:
    async def body(h: Harness) -> None:
        with pytest.raises(SessionError, match="isolation: session"):
            await h.sessions.open(QUERY)

    scenario(body)


def test_over_capacity_after_queue_timeout() -> None:
    async def body(h: Harness) -> None:
        pool = h.pool_for(QUERY)
        held = [await pool.acquire(), await pool.acquire()]
        with pytest.raises(OverCapacityError, match="all 2 sandbox slots"):
            await pool.acquire()
        for sandbox in held:
            pool.release(sandbox)

    scenario(body, capacity=2, queue_timeout_s=0.3)


def test_missing_image_fails_waiters_at_once() -> None:
    async def body(h: Harness) -> None:
        h.backend.images.clear()
        pool = h.pool_for(QUERY)
        with pytest.raises(ImageMissingError):
            await asyncio.wait_for(pool.acquire(), 3)

    scenario(body)


def test_a_runner_that_never_starts_is_removed() -> None:
    async def body(h: Harness) -> None:
        h.backend.fail_start = True
        with pytest.raises(SandboxStartError, match="exited with code 1"):
            await h.factory.start(QUERY)
        assert h.backend.live() == 0

    scenario(body)


def test_cancel_kills_the_per_query_sandbox() -> None:
    async def body(h: Harness) -> None:
        execution = h.executor.execute(
            "SELECT sum(hash(range)) FROM range(100000000000)", policy=QUERY
        )
        task = asyncio.ensure_future(collect_table(execution))
        await until_in_sandbox(execution)
        assert await h.executor.cancel(execution.query_id)
        with pytest.raises(QueryCancelledError):
            await task

    scenario(body)


def test_session_cancel_interrupts_but_keeps_the_session() -> None:
    async def body(h: Harness) -> None:
        session = await h.sessions.open(SESSION)
        sid = session.session_id
        execution = h.executor.execute(
            "SELECT sum(hash(range)) FROM range(100000000000)", session_id=sid
        )
        task = asyncio.ensure_future(collect_table(execution))
        await until_in_sandbox(execution)
        await asyncio.sleep(0.2)
        assert await h.executor.cancel(execution.query_id)
        with pytest.raises(QueryCancelledError):
            await task
        table = await collect_table(h.executor.execute("SELECT 2 AS x", session_id=sid))
        assert table.to_pylist() == [{"x": 2}]

    scenario(body)


def test_oom_killed_sandbox_is_reported_as_memory_limit() -> None:
    async def body(h: Harness) -> None:
        pool = h.pool_for(QUERY)
        await pool.wait_warm(10)
        execution = h.executor.execute(
            "SELECT sum(hash(range)) FROM range(100000000000)", policy=QUERY
        )
        task = asyncio.ensure_future(collect_table(execution))
        await until_in_sandbox(execution)
        container = next(
            c for c in h.backend.containers.values() if c.spec.name == execution.record.sandbox
        )
        container.oom_killed = True
        assert container.server is not None
        container.server.stop(0)
        container.status = "exited"
        with pytest.raises(Exception) as caught:
            await task
        assert "memory limit of 512 MiB" in str(caught.value)
        assert not isinstance(caught.value, SandboxLostError)

    scenario(body)


def test_failing_starts_back_off_instead_of_spinning() -> None:
    """A start that keeps failing is retried with backoff, not thousands of times a second."""

    async def body(h: Harness) -> None:
        h.backend.fail_start = True
        pool = h.pool_for(QUERY)
        with pytest.raises(SandboxStartError):
            await pool.wait_warm(1.0)
        await asyncio.sleep(1.0)
        assert h.backend.created <= 8, f"{h.backend.created} starts in ~2 s"

    scenario(body)


def test_missing_image_stops_the_filler_until_asked_again() -> None:
    async def body(h: Harness) -> None:
        h.backend.images.clear()
        pool = h.pool_for(QUERY)
        with pytest.raises(ImageMissingError):
            await pool.acquire()
        await asyncio.sleep(0.5)
        before = h.backend.created
        await asyncio.sleep(0.5)
        assert h.backend.created == before  # nothing retried on its own
        h.backend.images.add("img")  # the image gets built; the next query works
        await collect_table(h.executor.execute("SELECT 1", policy=QUERY))

    scenario(body)


def test_cancel_while_queued_stops_waiting() -> None:
    """A query waiting for a slot is cancelled without ever running."""

    async def body(h: Harness) -> None:
        pool = h.pool_for(QUERY)
        held = await pool.acquire()
        queued = h.executor.execute("CREATE TEMP TABLE ran AS SELECT 1", policy=QUERY)
        task = asyncio.ensure_future(collect_table(queued))
        await asyncio.sleep(0.2)
        assert await h.executor.cancel(queued.query_id)
        with pytest.raises(QueryCancelledError, match="waited"):
            await task
        assert queued.record.sandbox == ""
        pool.release(held)

    scenario(body, capacity=1, queue_timeout_s=5)


def test_a_waiting_pool_gets_the_slot_of_an_idle_warm_sandbox() -> None:
    """With one slot held by pool q's idle warm sandbox, a query of pool s still runs."""

    async def body(h: Harness) -> None:
        await h.pool_for(QUERY).wait_warm(10)
        session = await asyncio.wait_for(h.sessions.open(SESSION), 10)
        execution = h.executor.execute("SELECT 3 AS x", session_id=session.session_id)
        table = await collect_table(execution)
        assert table.to_pylist() == [{"x": 3}]

    scenario(body, capacity=2, queue_timeout_s=5)


def test_closing_a_session_under_a_running_query_is_a_clear_error() -> None:
    async def body(h: Harness) -> None:
        session = await h.sessions.open(SESSION)
        sid = session.session_id
        execution = h.executor.execute(
            "SELECT sum(hash(range)) FROM range(100000000000)", session_id=sid
        )
        task = asyncio.ensure_future(collect_table(execution))
        await until_in_sandbox(execution)
        await asyncio.sleep(0.1)
        h.sessions.close(sid, "reached its max lifetime of 1 s")
        with pytest.raises(SandboxLostError, match="ended during the query"):
            await task

    scenario(body)


async def _consume(execution: QueryExecution) -> None:
    async for _ in execution.chunks():
        pass


@pytest.mark.parametrize("ticks", [1, 2, 3, 4])
def test_consumer_cancelled_during_hand_out_leaks_nothing(ticks: int) -> None:
    """A client that disconnects just as its sandbox is handed over gives it back."""

    async def body(h: Harness) -> None:
        pool = h.pool_for(QUERY)
        await pool.wait_warm(10)
        task = asyncio.ensure_future(_consume(h.executor.execute("SELECT 1", policy=QUERY)))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.wait_warm(10)
        assert pool.stats()["busy"] == 0
        session = await h.sessions.open(SESSION)
        sid = session.session_id
        task = asyncio.ensure_future(_consume(h.executor.execute("SELECT 1", session_id=sid)))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The session's turn was given back: its next query runs.
        next_query = h.executor.execute("SELECT 2 AS x", session_id=sid)
        table = await asyncio.wait_for(collect_table(next_query), 5)
        assert table.to_pylist() == [{"x": 2}]

    scenario(body)


def test_session_cancel_before_the_runner_sees_the_query() -> None:
    """A cancel that reaches the runner before the query's Execute is not lost."""

    async def body(h: Harness) -> None:
        session = await h.sessions.open(SESSION)
        execution = h.executor.execute(
            "SELECT sum(hash(range)) FROM range(100000000000)", session_id=session.session_id
        )
        task = asyncio.ensure_future(collect_table(execution))
        for _ in range(100_000):  # a few loop ticks: cancel before Execute reaches the runner
            if execution.record.sandbox:
                break
            await asyncio.sleep(0)
        assert await h.executor.cancel(execution.query_id)
        # A lost cancel would end the query at the 5 s statement timeout instead.
        with pytest.raises(QueryCancelledError):
            await task

    scenario(body)


def test_a_session_cancel_while_its_files_are_linked_stops_the_query() -> None:
    """cancel() while the session's files are linked finds no sandbox to tell: the query
    checks before it asks the runner (it ran)."""

    async def body(h: Harness) -> None:
        session = await h.sessions.open(SESSION)
        linking, linked = threading.Event(), threading.Event()

        class SlowLink:
            def link(self, bindings: tuple[Binding, ...]) -> tuple[Binding, ...]:
                linking.set()
                linked.wait(DEADLINE_S)
                return bindings

        session.sandbox.session_dir = SlowLink()  # type: ignore[assignment]
        tables = TableFiles(bindings=(Binding("t", "parquet", ("/cache/t.parquet",)),))
        execution = h.executor.execute(
            "CREATE TEMP TABLE ran AS SELECT 1", session_id=session.session_id, tables=tables
        )
        task = asyncio.ensure_future(collect_table(execution))
        assert await asyncio.to_thread(linking.wait, DEADLINE_S)
        assert await h.executor.cancel(execution.query_id)
        linked.set()
        with pytest.raises(QueryCancelledError):
            await task
        session.sandbox.session_dir = None
        check = h.executor.execute(
            "SELECT count(*) AS n FROM duckdb_tables()", session_id=session.session_id
        )
        assert (await collect_table(check)).to_pylist() == [{"n": 0}]

    scenario(body)


def test_a_session_sandbox_gets_a_session_directory_that_goes_with_it(tmp_path: Path) -> None:
    """Created before the container (the runner is told its sandbox path), removed after it;
    per-query sandboxes get none."""
    policy = SESSION

    async def body(h: Harness) -> None:
        session = await h.sessions.open(policy)
        session_dir = session.sandbox.session_dir
        assert session_dir is not None and session_dir.host.is_dir()
        assert session_dir.host.parent == tmp_path / ".sessions" / "inst"
        spec = h.backend.containers[session.sandbox.handle.container_id].spec
        runner = json.loads(spec.environment["DUCKCELL_RUNNER_CONFIG"])
        assert runner["session_dir"] == f"/cache/.sessions/inst/{session.sandbox.slot}"
        h.sessions.close(session.session_id)
        for _ in range(100):
            if not session_dir.host.exists():
                break
            await asyncio.sleep(0.02)
        assert not session_dir.host.exists()
        per_query = await h.pool_for(QUERY).acquire()
        assert per_query.session_dir is None

    scenario(body, cache_dir=str(tmp_path))
