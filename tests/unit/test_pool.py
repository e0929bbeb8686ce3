"""The pool, sessions and executor over FakeBackend: real runners, no Docker engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from launcher.data.datapath import TableFiles
from launcher.errors import (
    EngineUnavailableError,
    ImageMissingError,
    OverCapacityError,
    QueryCancelledError,
    SandboxLostError,
    SandboxStartError,
    SessionError,
    SqlError,
)
from launcher.executor import QueryExecution, collect_table
from launcher.model.catalog import Binding
from launcher.model.policy import load_policy_text
from launcher.sandbox.backend.base import ContainerState, SandboxHandle
from launcher.sandbox.pool import SandboxPool
from launcher.sandbox.spec import SandboxState
from tests.support.fakes import FakeBackend
from tests.support.harness import Harness
from tests.support.waiting import eventually

T = TypeVar("T")

QUERY_POLICY = """
name: q
isolation: query
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}
pool: {warm: 2}
"""
SESSION_POLICY = QUERY_POLICY.replace("name: q", "name: s").replace("query\n", "session\n", 1)


def scenario(
    body: Callable[[Harness], Awaitable[T]], backend: FakeBackend | None = None, **kwargs: object
) -> T:
    async def main() -> T:
        harness = Harness(backend or FakeBackend(), **kwargs)  # type: ignore[arg-type]
        try:
            return await body(harness)
        finally:
            await harness.close()
            assert harness.backend.live() == 0, "pool left containers behind"

    return asyncio.run(main())


QUERY = load_policy_text(QUERY_POLICY, "<test>")


SESSION = load_policy_text(SESSION_POLICY, "<test>")
DEADLINE_S = 10.0
# Streams rows until stopped: its first chunk shows DuckDB is running it in the sandbox.
ENDLESS = "SELECT range AS n FROM range(100000000000)"


def filler_looked(pool: SandboxPool) -> bool:
    """The pool's filler has looked since it was last woken: each look clears the wake-up and
    starts what is missing before it waits again, so a cleared wake-up is a finished look."""
    return not pool._wake.is_set()


async def until_in_sandbox(execution: QueryExecution) -> None:
    await eventually(lambda: bool(execution.record.sandbox), "the query reached a sandbox")


def run_until_first_chunk(execution: QueryExecution) -> tuple[asyncio.Future[None], asyncio.Event]:
    """Consume a query's result in a task; the event is set once its first chunk arrived."""
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in execution.chunks():
            first.set()

    return asyncio.ensure_future(consume()), first


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
        execution = h.executor.execute(ENDLESS, session_id=sid)
        task, first = run_until_first_chunk(execution)
        await asyncio.wait_for(first.wait(), DEADLINE_S)  # DuckDB is running it
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
        began = time.monotonic()
        pool = h.pool_for(QUERY)
        # Two parallel starts fail at once, then each retry waits 0.4 s, 0.8 s, ...
        await eventually(lambda: h.backend.created >= 4, "two rounds of starts")
        assert time.monotonic() - began >= 0.4, "the second round did not back off"
        with pytest.raises(SandboxStartError, match="exited with code 1"):
            await pool.wait_warm(0.1)

    scenario(body)


def test_missing_image_stops_the_filler_until_asked_again() -> None:
    async def body(h: Harness) -> None:
        h.backend.images.clear()
        pool = h.pool_for(QUERY)
        with pytest.raises(ImageMissingError):
            await pool.acquire()
        await eventually(lambda: pool.stats()["starting"] == 0, "the failed starts ended")
        before = h.backend.created
        h.capacity.wake_all()  # the filler looks again ...
        await eventually(lambda: filler_looked(pool), "the filler looked")  # ... and has run
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
        await eventually(lambda: pool.stats()["waiting"] == 1, "the query is queued")
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
        execution = h.executor.execute(ENDLESS, session_id=sid)
        task, first = run_until_first_chunk(execution)
        await asyncio.wait_for(first.wait(), DEADLINE_S)  # DuckDB is running it
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

        session.sandbox.files = SlowLink()  # type: ignore[assignment]
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
        session.sandbox.files = None
        check = h.executor.execute(
            "SELECT count(*) AS n FROM duckdb_tables()", session_id=session.session_id
        )
        assert (await collect_table(check)).to_pylist() == [{"n": 0}]

    scenario(body)


def test_every_sandbox_gets_a_files_directory_that_goes_with_it(tmp_path: Path) -> None:
    """Created before the container (its only /cache, launcher.sandbox.files), removed after
    it; a session's runner is locked to it, a per-query runner to its first query's files."""

    async def body(h: Harness) -> None:
        session = await h.sessions.open(SESSION)
        files = session.sandbox.files
        assert files is not None and files.host.is_dir()
        assert files.host == tmp_path / ".sandboxes" / "inst" / session.sandbox.slot
        spec = h.backend.containers[session.sandbox.handle.container_id].spec
        assert spec.files_dir == str(files.host)
        runner = json.loads(spec.environment["DUCKCELL_RUNNER_CONFIG"])
        assert runner["session_dir"] == "/cache/files"
        h.sessions.close(session.session_id)
        await eventually(lambda: not files.host.exists())
        per_query = await h.pool_for(QUERY).acquire()
        assert per_query.files is not None and per_query.files.host.is_dir()
        spec = h.backend.containers[per_query.handle.container_id].spec
        assert "session_dir" not in json.loads(spec.environment["DUCKCELL_RUNNER_CONFIG"])
        h.pool_for(QUERY).release(per_query)
        await eventually(lambda: not per_query.files.host.exists())

    scenario(body, cache_dir=str(tmp_path))


# --- faults: the deficit rule, dead warm sandboxes, removals the engine refuses ----------------
WARM_ONE = load_policy_text(
    QUERY_POLICY.replace("name: q", "name: one").replace("warm: 2", "warm: 1"), "<test>"
)


@dataclass
class FlakyBackend(FakeBackend):
    """FakeBackend whose next ``failing_removes`` removals fail as if the engine were down,
    and that counts inspections."""

    failing_removes: int = 0
    inspections: int = 0

    async def remove(self, handle: SandboxHandle) -> None:
        if self.failing_removes > 0:
            self.failing_removes -= 1
            raise EngineUnavailableError("lost the Docker engine during remove (test)")
        await super().remove(handle)

    async def inspect(self, handle: SandboxHandle) -> ContainerState:
        self.inspections += 1
        return await super().inspect(handle)


def kill_behind_the_pools_back(backend: FakeBackend) -> set[str]:
    """Stop every running fake container, as ``docker kill`` or an engine restart would."""
    killed = set()
    for container_id, container in backend.containers.items():
        if container.status == "running" and container.server is not None:
            container.server.stop(0)
            container.status = "exited"
            killed.add(container_id)
    return killed


def test_a_queued_query_starts_a_sandbox_whatever_is_busy() -> None:
    """3 busy + 1 queued on a pool of warm 1: the queued query gets a start at once; it does
    not wait for a busy one (busy sandboxes stand in for the warm stock only)."""

    async def body(h: Harness) -> None:
        pool = h.pool_for(WARM_ONE)
        await pool.wait_warm(DEADLINE_S)
        busy = [await asyncio.wait_for(pool.acquire(), DEADLINE_S) for _ in range(3)]
        # The filler looks: 3 busy cover the warm stock of 1.
        await eventually(lambda: filler_looked(pool), "the filler looked")
        stats = pool.stats()
        assert (stats["busy"], stats["ready"], stats["starting"]) == (3, 0, 0)
        queued = asyncio.ensure_future(pool.acquire())
        await eventually(lambda: pool.stats()["starting"] == 1, "a start for the queued query")
        fourth = await asyncio.wait_for(queued, DEADLINE_S)
        assert all(sandbox.state is SandboxState.BUSY for sandbox in busy)  # still running
        for sandbox in [*busy, fourth]:
            pool.release(sandbox)
        await pool.wait_warm(DEADLINE_S)

    scenario(body)


def test_a_dead_warm_sandbox_is_replaced_before_it_is_handed_out() -> None:
    async def body(h: Harness) -> None:
        pool = h.pool_for(QUERY)
        await pool.wait_warm(DEADLINE_S)
        dead = kill_behind_the_pools_back(h.backend)
        assert len(dead) == 2
        table = await collect_table(h.executor.execute("SELECT 42 AS x", policy=QUERY))
        assert table.to_pylist() == [{"x": 42}]
        await eventually(lambda: not dead & set(h.backend.containers), "the dead ones removed")
        await pool.wait_warm(DEADLINE_S)

    scenario(body, idle_check_s=0)  # every warm sandbox counts as idle: always inspected


def test_a_fresh_warm_sandbox_is_handed_out_without_an_engine_call() -> None:
    async def body(h: Harness) -> None:
        backend = h.backend
        assert isinstance(backend, FlakyBackend)
        pool = h.pool_for(QUERY)
        await pool.wait_warm(DEADLINE_S)
        before = backend.inspections
        pool.release(await pool.acquire())
        assert backend.inspections == before

    scenario(body, backend=FlakyBackend(), idle_check_s=3600)


def test_after_a_failed_engine_call_warm_sandboxes_are_checked_before_use() -> None:
    """However fresh, a warm sandbox ready before the engine failed a call is inspected."""

    async def body(h: Harness) -> None:
        backend = h.backend
        assert isinstance(backend, FlakyBackend)
        pool = h.pool_for(QUERY)
        await pool.wait_warm(DEADLINE_S)
        held = await pool.acquire()
        dead = kill_behind_the_pools_back(backend) - {held.handle.container_id}
        backend.failing_removes = 1
        pool.release(held)  # its removal fails once: the engine is in doubt
        await eventually(lambda: backend.failing_removes == 0, "the failed removal")
        table = await collect_table(h.executor.execute("SELECT 7 AS x", policy=QUERY))
        assert table.to_pylist() == [{"x": 7}]
        await eventually(lambda: not dead & set(backend.containers), "the dead one removed")

    scenario(body, backend=FlakyBackend(), idle_check_s=3600)


def test_a_failed_removal_is_retried_until_it_succeeds() -> None:
    async def body(h: Harness) -> None:
        backend = h.backend
        assert isinstance(backend, FlakyBackend)
        pool = h.pool_for(WARM_ONE)
        sandbox = await pool.acquire()
        backend.failing_removes = 2
        pool.release(sandbox)
        await eventually(lambda: backend.failing_removes == 0, "two failed removals")
        assert sandbox.handle.container_id in backend.containers
        assert pool.stats()["removing"] == 1  # its slot stays taken: the container exists
        await eventually(
            lambda: sandbox.handle.container_id not in backend.containers, "the third attempt"
        )
        await eventually(lambda: pool.stats()["removing"] == 0, "its slot given back")

    scenario(body, backend=FlakyBackend())


def test_close_retries_failed_removals_and_leaves_nothing() -> None:
    async def body(h: Harness) -> None:
        backend = h.backend
        assert isinstance(backend, FlakyBackend)
        await h.pool_for(QUERY).wait_warm(DEADLINE_S)
        backend.failing_removes = 3  # the engine refuses three removals during close

    scenario(body, backend=FlakyBackend())  # scenario's close asserts nothing is left


def test_close_gives_up_on_removals_after_its_deadline(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        backend = FlakyBackend()
        h = Harness(backend, removal_deadline_s=0.3)
        await h.pool_for(WARM_ONE).wait_warm(DEADLINE_S)
        backend.failing_removes = 10**6  # the engine never comes back
        began = time.monotonic()
        await h.close()
        assert time.monotonic() - began < DEADLINE_S
        assert backend.live() == 1 and h.capacity.used == 0
        backend.failing_removes = 0
        for container_id in list(backend.containers):
            await backend.remove_by_id(container_id)

    asyncio.run(main())
    assert "could not remove sandbox(es) duckcell-" in caplog.text
    assert "duckcell sandboxes reap" in caplog.text
