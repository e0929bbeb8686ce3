"""A real restart of the Docker engine the tests use, with the worker idle and busy (issue 17,
item 3): dockerd is stopped (SIGTERM, which stops every container) and started again by
``scripts/ensure-docker.sh``, as CI starts it.

Idle: the warm sandboxes die with the engine; the next query still succeeds (the pool inspects
them and replaces the dead ones) and nothing is left once the launcher closed. Busy: a query
running through the restart fails with a clear ``QueryError``, not a hang; the next one
succeeds; nothing is left.

The engine is restarted once per test (at most ``MAX_RESTARTS`` in the module, checked), every
wait is bounded, and whatever fails, the module ends with ``ensure-docker.sh`` so the tests
after it still have an engine.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from launcher.errors import QueryError
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.sandbox.backend.docker_engine import DockerBackend
from launcher.sandbox.pool import IDLE_CHECK_S
from tests.support.waiting import eventually

from .conftest import REPO, containers_of, make_config, run

pytestmark = pytest.mark.docker

DEADLINE_S = 90.0
STOP_DEADLINE_S = 60.0  # dockerd stops its containers before it exits (10 s each at most)
START_DEADLINE_S = 120.0  # ensure-docker.sh's own bound is 60 s for the engine to answer
MAX_RESTARTS = 2
# One thread counting 3e9 rows: runs far longer than a restart, well inside the policy's 60 s.
LONG = "SELECT count(*) AS n FROM range(3000000000)"


def _engine_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _dockerd_pids() -> list[int]:
    found = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def _wait(condition: Callable[[], bool], what: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {deadline_s:g} s")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def ensure_engine() -> None:
    """Start the engine (a no-op when it answers); returns once it answers."""
    subprocess.run(
        ["bash", str(REPO / "scripts" / "ensure-docker.sh")],
        check=True,
        timeout=START_DEADLINE_S,
        cwd=REPO,
    )


class EngineRestarts:
    """Restarts of the engine in this module: counted, bounded, each one stop then start."""

    def __init__(self) -> None:
        self.count = 0

    def restart(self) -> None:
        assert self.count < MAX_RESTARTS, f"more than {MAX_RESTARTS} engine restarts in a module"
        self.count += 1
        pids = _dockerd_pids()
        assert pids, "no dockerd runs here: this test restarts a local engine (pidof dockerd)"
        try:
            subprocess.run(["kill", "-TERM", *map(str, pids)], check=True, timeout=10)
            _wait(lambda: not any(_alive(pid) for pid in pids), "dockerd's exit", STOP_DEADLINE_S)
            _wait(lambda: not _engine_answers(), "docker info failing", STOP_DEADLINE_S)
        finally:
            ensure_engine()
        assert _engine_answers()


@pytest.fixture(scope="module")
def restarts() -> Iterator[EngineRestarts]:
    """The module's restarts; at its end the engine is started again whatever happened."""
    assert _engine_answers(), "no Docker engine answers before the restarts"
    guard = EngineRestarts()
    try:
        yield guard
    finally:
        ensure_engine()


async def _restart(restarts: EngineRestarts) -> None:
    """Restart the engine off the event loop: the launcher keeps running meanwhile."""
    await asyncio.wait_for(
        asyncio.to_thread(restarts.restart), STOP_DEADLINE_S * 2 + START_DEADLINE_S + 30
    )


async def _answer(launcher: LocalLauncher) -> int:
    execution = launcher.execute("SELECT 42 AS answer", policy="default")
    table = await asyncio.wait_for(collect_table(execution), DEADLINE_S)
    return table.to_pylist()[0]["answer"]


def test_idle_worker_replaces_dead_warm_sandboxes_after_an_engine_restart(
    image: str, policies_dir: Path, engine: docker.DockerClient, restarts: EngineRestarts
) -> None:
    config = make_config(image, policies_dir)

    async def body() -> None:
        async with LocalLauncher(
            config, DockerBackend.for_config(config), warm_override=2
        ) as launcher:
            pool = launcher.pool_for(launcher.policies.get("default"))
            await pool.wait_warm(DEADLINE_S)
            warm = set(containers_of(engine, config.launcher_id))
            assert len(warm) == 2, warm
            restarted_at = time.monotonic()
            await _restart(restarts)
            # The warm ones did not survive the engine (no live-restore): the pool must notice.
            assert not engine.api.containers(
                filters={"label": f"duckcell.launcher={config.launcher_id}"}
            ), "warm sandboxes survived the restart: is live-restore on?"
            await eventually(lambda: time.monotonic() - restarted_at > IDLE_CHECK_S, "idle")
            execution = launcher.execute("SELECT 42 AS answer", policy="default")
            table = await asyncio.wait_for(collect_table(execution), DEADLINE_S)
            assert table.to_pylist() == [{"answer": 42}]
            assert execution.record.sandbox not in warm
            assert await _answer(launcher) == 42  # and the one after it
            await eventually(
                lambda: not set(containers_of(engine, config.launcher_id)) & warm,
                "the dead warm sandboxes removed",
                DEADLINE_S,
            )
        assert containers_of(engine, config.launcher_id) == []

    run(body())


def test_busy_worker_fails_the_running_query_clearly_and_serves_the_next(
    image: str, policies_dir: Path, engine: docker.DockerClient, restarts: EngineRestarts
) -> None:
    config = make_config(image, policies_dir)

    async def body() -> None:
        async with LocalLauncher(
            config, DockerBackend.for_config(config), warm_override=1
        ) as launcher:
            pool = launcher.pool_for(launcher.policies.get("default"))
            await pool.wait_warm(DEADLINE_S)
            execution = launcher.execute(LONG, policy="default")
            running = asyncio.ensure_future(collect_table(execution))
            await eventually(
                lambda: bool(execution.record.sandbox) or running.done(),
                "the long query in its sandbox",
                DEADLINE_S,
            )
            assert not running.done(), running.result()
            await _restart(restarts)
            with pytest.raises(QueryError) as failed:
                await asyncio.wait_for(running, DEADLINE_S)
            print("running query:", failed.value.reason, failed.value)
            assert failed.value.reason in {"sandbox_lost", "cancelled"}, failed.value
            assert str(failed.value)
            assert await _answer(launcher) == 42
            assert await _answer(launcher) == 42
        assert containers_of(engine, config.launcher_id) == []

    run(body())
