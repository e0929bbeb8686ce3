"""Replacing policies on a running launcher: pools over FakeBackend (real runners, no Docker).

What ``LocalLauncher.replace_policies`` promises is ``PolicyPools``' behaviour plus an in-place
``PolicySet.replace``: idle sandboxes of a changed policy go, a pool for the new version starts,
work already under way keeps its version, and nothing is left behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from launcher.config import load_config
from launcher.errors import PolicyError
from launcher.executor import Executor, collect_table
from launcher.host import LocalLauncher
from launcher.model.policy import (
    Policy,
    PolicySet,
    check_no_downgrade,
    load_policy_text,
    load_pushed_policies,
    same_settings,
)
from launcher.sandbox.capacity import Capacity
from launcher.sandbox.factory import FactorySettings, SandboxFactory
from launcher.sandbox.pool import SandboxPool
from launcher.sandbox.pools import PolicyPools
from launcher.sandbox.sessions import SessionManager
from launcher.sandbox.spec import SandboxState
from tests.support.fakes import FakeBackend
from tests.support.waiting import eventually

T = TypeVar("T")

QUERY_V1 = """
name: q
isolation: query
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}
duckdb: {threads: 1}
pool: {warm: 2}
"""
QUERY_V2 = QUERY_V1.replace("threads: 1", "threads: 3")
SESSION_V1 = QUERY_V1.replace("name: q", "name: s").replace("query\n", "session\n", 1)
SESSION_V2 = SESSION_V1.replace("threads: 1", "threads: 3")
OTHER = QUERY_V1.replace("name: q", "name: other")


def policy(text: str) -> Policy:
    return load_policy_text(text, "<test>")


class Harness:
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.factory = SandboxFactory(
            backend, FactorySettings("img", "unit", "inst", None, start_timeout_s=5)
        )
        self.capacity = Capacity(16)
        self.pools = PolicyPools(self._new_pool, retire_poll_s=0.02)
        self.sessions = SessionManager(self.pools.pool_for)
        self.executor = Executor(backend, self.pools.pool_for, self.sessions, kill_grace_s=1)

    def _new_pool(self, policy: Policy) -> SandboxPool:
        return SandboxPool(policy, self.factory, self.capacity, queue_timeout_s=5)

    async def close(self) -> None:
        await self.sessions.close_all()
        await self.pools.close()


def scenario(body: Callable[[Harness], Awaitable[T]]) -> T:
    async def main() -> T:
        harness = Harness(FakeBackend())
        try:
            return await asyncio.wait_for(body(harness), 30)
        finally:
            await harness.close()
            assert harness.backend.live() == 0, "pools left containers behind"

    return asyncio.run(main())


async def threads(h: Harness, chosen: Policy) -> int:
    table = await collect_table(
        h.executor.execute("SELECT current_setting('threads') AS t", policy=chosen)
    )
    return int(table.column("t")[0].as_py())


def test_a_changed_policy_gets_a_new_pool_and_its_idle_sandboxes_are_removed() -> None:
    async def body(h: Harness) -> None:
        v1, other = policy(QUERY_V1), policy(OTHER)
        old, untouched = h.pools.pool_for(v1), h.pools.pool_for(other)
        await old.wait_warm(10)
        await untouched.wait_warm(10)
        assert await threads(h, v1) == 1
        await old.wait_warm(10)
        await eventually(lambda: h.backend.live() == 4, "two warm sandboxes per policy")

        replaced = h.pools.replace(PolicySet([policy(QUERY_V2), other]))

        assert replaced == ["q"]
        new = h.pools.pool_for(policy(QUERY_V2))
        assert new is not old and h.pools.current()["other"] is untouched
        assert old.warm == 0 and old.stats()["ready"] == 0
        await eventually(lambda: not h.pools.retired(), "the retired pool is closed")
        await new.wait_warm(10)
        # 2 new-version + 2 untouched: the old ones are gone (removals finish in the background)
        await eventually(lambda: h.backend.live() == 4, "only the warm stock is left")
        assert await threads(h, policy(QUERY_V2)) == 3
        await eventually(lambda: h.capacity.pool_count() == 2, "the closed pool is forgotten")

    scenario(body)


def test_work_under_way_keeps_the_version_it_started_with() -> None:
    async def body(h: Harness) -> None:
        v1, s1 = policy(QUERY_V1), policy(SESSION_V1)
        old = h.pools.pool_for(v1)
        busy = await old.acquire()  # a running query's sandbox
        session = await h.sessions.open(s1)
        h.pools.replace(PolicySet([policy(QUERY_V2), policy(SESSION_V2)]))

        # The running query and the session keep their sandboxes and their version.
        assert busy.state is SandboxState.BUSY and h.pools.retired()
        assert session.pool.policy == s1
        in_session = h.executor.execute(
            "SELECT current_setting('threads') AS t", session_id=session.session_id
        )
        assert (await collect_table(in_session)).column("t")[0].as_py() in ("1", 1)
        # A query that resolved v1 before the update but starts now still gets v1 ...
        assert h.pools.pool_for(v1) is old
        assert await threads(h, v1) == 1
        # ... and new ones get v2.
        assert await threads(h, policy(QUERY_V2)) == 3

        old.release(busy)
        h.sessions.close(session.session_id)
        await eventually(lambda: not h.pools.retired(), "retired pools close once drained")
        for pool in h.pools.current().values():
            await pool.wait_warm(10)
        # The warm stock of the two new versions only (removals finish in the background).
        await eventually(lambda: h.backend.live() == 4, "only the new warm stock is left")

    scenario(body)


def test_a_removed_policy_retires_its_pool_and_close_leaves_nothing() -> None:
    async def body(h: Harness) -> None:
        pool = h.pools.pool_for(policy(QUERY_V1))
        await pool.wait_warm(10)
        busy = await pool.acquire()
        assert h.pools.replace(PolicySet([])) == ["q"]
        assert h.pools.current() == {} and h.pools.retired() == [pool]
        assert busy.state is SandboxState.BUSY
        # close() at shutdown removes the busy sandbox of the retired pool too

    scenario(body)


def test_warm_all_starts_every_policys_pool_before_its_first_query() -> None:
    """What a worker does at start: every pool fills in the background, no query needed."""

    async def body(h: Harness) -> None:
        v1, other = policy(QUERY_V1), policy(OTHER)
        assert h.pools.warm_all([v1, other]) == ["q", "other"]
        pools = h.pools.current()
        await eventually(
            lambda: all(pool.stats()["ready"] == 2 for pool in pools.values()),
            "two warm sandboxes per policy",
        )
        pool = pools["q"]
        assert h.pools.warm_all([v1, other, policy(NEW)]) == ["new"]  # only pools it lacks
        assert h.pools.pool_for(v1) is pool

    scenario(body)


def test_an_unchanged_policy_read_from_elsewhere_keeps_its_pool() -> None:
    async def body(h: Harness) -> None:
        pool = h.pools.pool_for(policy(QUERY_V1))
        pushed = load_pushed_policies([("q", QUERY_V1)])
        assert pushed[0].source != pool.policy.source and same_settings(pushed[0], pool.policy)
        assert h.pools.replace(PolicySet(pushed)) == []
        assert h.pools.pool_for(pushed[0]) is pool

    scenario(body)


def test_pushed_policies_overlay_local_ones_and_replace_in_place() -> None:
    local = PolicySet([policy(QUERY_V1), policy(OTHER)])
    shared = local  # the tunnel's query runner holds the same object
    merged = local.overlaid(load_pushed_policies([("q", QUERY_V2), ("s", SESSION_V1)]))
    assert merged.names() == ["other", "q", "s"]
    assert merged.get("q").duckdb.threads == 3 and merged.get("other") == policy(OTHER)
    shared.replace(merged)
    assert local.names() == ["other", "q", "s"] and local.get("q").duckdb.threads == 3


def test_an_invalid_pushed_policy_names_the_policy_and_the_line() -> None:
    bad = QUERY_V1.replace("memory: 512MiB", "memory: lots")
    with pytest.raises(PolicyError, match=r"^controlplane:q\.yaml:5: limits\.memory"):
        load_pushed_policies([("other", OTHER), ("q", bad)])
    with pytest.raises(PolicyError, match=r"controlplane:x\.yaml:2: name: expected \"x\""):
        load_pushed_policies([("x", QUERY_V1)])


def test_a_pushed_policy_may_not_drop_gvisor_for_a_local_one() -> None:
    """The host's operator chose runsc; the control plane may tighten, never drop it."""
    strict = QUERY_V1.replace("runtime: runc", "runtime: runsc")
    local = PolicySet([policy(strict), policy(OTHER)])
    with pytest.raises(PolicyError, match=r"controlplane:q\.yaml: runtime: runc would drop"):
        check_no_downgrade(local, load_pushed_policies([("q", QUERY_V2)]))
    hardened = OTHER.replace("runtime: runc", "runtime: runsc")
    check_no_downgrade(local, load_pushed_policies([("other", hardened), ("new", NEW)]))


NEW = QUERY_V1.replace("name: q", "name: new")


def test_an_empty_push_restores_the_hosts_own_policies(tmp_path: Path) -> None:
    config = load_config(flags={"state_dir": tmp_path, "image": "unused"})
    own = PolicySet([policy(QUERY_V1), policy(OTHER)])
    launcher = LocalLauncher(config, FakeBackend(), policies=own)
    shared = launcher.policies  # what the tunnel's query runner holds
    launcher.apply_pushed_policies(load_pushed_policies([("q", QUERY_V2), ("new", NEW)]))
    assert shared.names() == ["new", "other", "q"] and shared.get("q").duckdb.threads == 3
    launcher.apply_pushed_policies([])
    assert shared.names() == ["other", "q"] and shared.get("q").duckdb.threads == 1
    strict = QUERY_V1.replace("runtime: runc", "runtime: runsc")
    hardened = LocalLauncher(config, FakeBackend(), policies=PolicySet([policy(strict)]))
    with pytest.raises(PolicyError):
        hardened.apply_pushed_policies(load_pushed_policies([("q", QUERY_V2)]))
    assert hardened.policies.get("q").runtime.value == "runsc"  # nothing taken
