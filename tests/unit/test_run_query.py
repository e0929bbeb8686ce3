"""``Executor.run_query``, the one way to run a query on a host: its leased tables are released
on every outcome, over FakeBackend (real runners, no Docker engine)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from launcher.data.cache import CacheLease
from launcher.data.datapath import TableFiles
from launcher.errors import QueryDeniedError, QueryError, SessionError, SqlError
from launcher.executor import QueryExecution, collect_table
from launcher.model.policy import Policy, load_policy_text
from tests.support.fakes import FakeBackend
from tests.support.harness import Harness

QUERY = load_policy_text(
    """
name: q
isolation: query
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}
pool: {warm: 1}
""",
    "<test>",
)
SESSION = load_policy_text(
    """
name: s
isolation: session
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}
""",
    "<test>",
)
# Streams rows until stopped: a consumer that leaves after its first chunk leaves it running.
ENDLESS = "SELECT range AS n FROM range(100000000000)"


class CountedLease(CacheLease):
    """A lease with no files whose releases are counted."""

    def __init__(self) -> None:
        super().__init__([], [])
        self.released = 0

    def release(self) -> None:
        self.released += 1
        super().release()


@dataclass
class FakeDataPath:
    """``TablePreparer``: each prepare hands out one counted lease, or raises ``error``."""

    error: Exception | None = None
    leases: list[CountedLease] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)

    async def prepare(self, sql: str, policy: Policy, *, early: bool = False) -> TableFiles:
        self.policies.append(policy.name)
        if self.error is not None:
            raise self.error
        self.leases.append(CountedLease())
        return TableFiles(leases=[self.leases[-1]])

    def all_released(self) -> bool:
        return all(lease.released for lease in self.leases)


def scenario(body: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        harness = Harness(FakeBackend())
        try:
            await body(harness)
            assert harness.executor.running() == []
        finally:
            await harness.close()
            assert harness.backend.live() == 0, "a sandbox was left behind"

    asyncio.run(main())


async def read_all(execution: QueryExecution) -> None:
    await collect_table(execution)


async def read_one(execution: QueryExecution) -> None:
    async for _ in execution.chunks():
        break  # no aclose: leaving the run_query block ends the stream


async def read_none(execution: QueryExecution) -> None:
    return None


async def read_then_fail(execution: QueryExecution) -> None:
    async for _ in execution.chunks():
        raise RuntimeError("the consumer broke")


# (id, SQL, policy, how the consumer reads, what run_query raises): every one ends with the
# tables released and no query running.
OUTCOMES = [
    ("finished", "SELECT 42 AS answer", QUERY, read_all, None),
    ("execute-raises", "SELECT 1", SESSION, read_all, QueryError),  # a session policy, no session
    ("fails-before-first-chunk", "SELECT * FROM missing", QUERY, read_all, SqlError),
    ("consumer-leaves-after-one-chunk", ENDLESS, QUERY, read_one, None),
    ("consumer-never-reads", ENDLESS, QUERY, read_none, None),
    ("consumer-raises", ENDLESS, QUERY, read_then_fail, RuntimeError),
]


@pytest.mark.parametrize(
    ("sql", "policy", "consume", "raised"),
    [case[1:] for case in OUTCOMES],
    ids=[case[0] for case in OUTCOMES],
)
def test_tables_are_released_on_every_outcome(
    sql: str,
    policy: Policy,
    consume: Callable[[QueryExecution], Awaitable[None]],
    raised: type[Exception] | None,
) -> None:
    async def body(h: Harness) -> None:
        data = FakeDataPath()
        try:
            async with h.executor.run_query(sql, policy=policy, data=data) as execution:
                await consume(execution)
        except Exception as error:
            assert raised is not None and isinstance(error, raised), error
        else:
            assert raised is None
        assert len(data.leases) == 1 and data.all_released()
        # The per-query sandbox went back to its pool (destroyed) when the block was left.
        assert h.pool_for(QUERY).stats()["busy"] == 0

    scenario(body)


def test_a_failed_prepare_runs_nothing() -> None:
    async def body(h: Harness) -> None:
        data = FakeDataPath(error=QueryDeniedError("policy q may not read connection lake"))
        with pytest.raises(QueryDeniedError):
            async with h.executor.run_query("SELECT 1", policy=QUERY, data=data):
                raise AssertionError("the block runs only for a prepared query")
        assert data.leases == [] and h.pools == {}

    scenario(body)


def test_tables_handed_in_are_released_too() -> None:
    async def body(h: Harness) -> None:
        lease = CountedLease()
        tables = TableFiles(leases=[lease])
        async with h.executor.run_query(ENDLESS, policy=QUERY, tables=tables) as execution:
            await read_one(execution)
        assert lease.released
        both = CountedLease()
        with pytest.raises(ValueError, match="not both"):
            async with h.executor.run_query(
                "SELECT 1", policy=QUERY, data=FakeDataPath(), tables=TableFiles(leases=[both])
            ):
                pass
        assert both.released

    scenario(body)


def test_a_session_query_prepares_under_the_sessions_policy() -> None:
    async def body(h: Harness) -> None:
        session = await h.sessions.open(SESSION)
        data = FakeDataPath()
        async with h.executor.run_query(
            "SELECT 1 AS one", policy=QUERY, session_id=session.session_id, data=data
        ) as execution:
            assert (await collect_table(execution)).to_pylist() == [{"one": 1}]
        assert data.policies == ["s"] and data.all_released()
        with pytest.raises(SessionError):
            async with h.executor.run_query("SELECT 1", session_id="gone", data=data):
                pass
        assert data.policies == ["s"]  # an unknown session: nothing prepared

    scenario(body)
