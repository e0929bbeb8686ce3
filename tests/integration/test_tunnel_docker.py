"""The whole path with the real engine: client -> control plane -> mTLS tunnel -> worker ->
warm pool -> hardened sandbox -> Arrow back. The unit tier covers the same path over
in-process runners; this proves it with real containers, including that a query a client
abandons frees its sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.controlplane.audit import AuditLog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.errors import (
    MemoryLimitError,
    QueryTimeoutError,
    SqlError,
    WorkerShutdownError,
    WorkerUnavailableError,
)
from launcher.worker.audit import AUDIT_FILE, read_audit
from launcher.worker.daemon import Worker
from tests.support.controlplane import DEADLINE_S, FAST, ControlPlane
from tests.support.waiting import eventually

from .conftest import containers_of, sandboxes_that_started_a_query
from .remote_stack import remote_stack

pytestmark = pytest.mark.docker
# What the sandbox's runner prints to stderr as it begins executing a query.


def test_queries_through_the_tunnel_run_in_real_sandboxes(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        async with remote_stack(control_plane, config, tmp_path, warm=1) as client:
            table = await client.table("SELECT 42 AS answer, count(*) AS n FROM range(1000)")
            assert table.to_pylist() == [{"answer": 42, "n": 1000}]
            with pytest.raises(SqlError, match="Permission Error"):
                await client.table("SELECT * FROM read_text('/etc/passwd')")
            results = await asyncio.gather(*(client.table(f"SELECT {i} AS i") for i in range(8)))
            assert sorted(t.column("i")[0].as_py() for t in results) == list(range(8))
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        control_plane.close()


def test_killing_the_worker_mid_query_fails_the_client_and_leaves_no_sandbox(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    """Issue 3 promise: kill the worker mid-query and the client gets a clear error, not a
    hang, and no sandbox remains. The worker stops abruptly (its tunnel task cancelled, its
    launcher closed) while a real sandbox is running the query."""
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        worker = Worker(identity, config, backoff=FAST, warm_override=1)
        launcher = worker.host
        closed = False
        try:
            # Entered by hand, not with `async with`: this worker ends abruptly (its tunnel task
            # cancelled, its host closed), not through the orderly exit.
            await worker.__aenter__()
            running = worker.start()
            await worker.connected(DEADLINE_S)
            assert control_plane.server is not None
            async with ControlPlaneClient(
                control_plane.server.address,
                control_plane.data.api_keys().create("analyst"),
                control_plane.data.ca().cert_pem(),
            ) as client:
                # The default policy allows 60 s per statement: only the kill can end it early.
                query = asyncio.create_task(client.table("SELECT sleep_ms(30000)", timeout_s=60))
                await _until_query_started(engine, config.launcher_id, query)
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(running, DEADLINE_S)
                closed = True
                await launcher.close()
                with pytest.raises(WorkerUnavailableError, match="disconnected during the query"):
                    await asyncio.wait_for(query, DEADLINE_S)
        finally:
            if not closed:
                await launcher.close()
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        control_plane.close()


def test_the_worker_reconnects_after_a_control_plane_restart_and_serves_the_next_query(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    """Issue 3 promise: kill the control plane and restart it on the same ports; the worker
    reconnects by itself and the next query succeeds in a real sandbox."""
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def one_query(sql: str) -> list[dict[str, object]]:
        assert control_plane.server is not None
        async with ControlPlaneClient(
            control_plane.server.address,
            control_plane.data.api_keys().create("analyst"),
            control_plane.data.ca().cert_pem(),
        ) as client:
            return (await client.table(sql, timeout_s=60)).to_pylist()

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        async with Worker(identity, config, backoff=FAST, warm_override=1) as worker:
            tunnel = worker.tunnel
            worker.start()
            await worker.connected(DEADLINE_S)
            assert await one_query("SELECT 1 AS before") == [{"before": 1}]
            await control_plane.stop()
            await eventually(lambda: not tunnel.connected.is_set(), "the tunnel dropped")
            await control_plane.start()
            await eventually(lambda: tunnel.connections == 2, "the worker reconnected")
            assert control_plane.worker(identity.worker_id).online
            assert await one_query("SELECT 2 AS after") == [{"after": 2}]
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        control_plane.close()


def test_sigterm_drains_the_worker_process_and_leaves_no_sandbox(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    """`duckcell worker` as a real process: on SIGTERM a query that ends within the grace
    completes, one that does not ends with WorkerShutdownError once the grace has passed, the
    worker exits 0 and none of its sandboxes remain."""
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))
    long_sql = "SELECT count(*) FROM range(10_000_000_000) t(i) WHERE i % 7 = 3"

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        worker = _worker_process(config, tmp_path / "worker", tmp_path / "worker.log", grace_s=6)
        try:
            await eventually(lambda: control_plane.worker(identity.worker_id).online, "online", 30)
            assert control_plane.server is not None
            async with ControlPlaneClient(
                control_plane.server.address,
                control_plane.data.api_keys().create("analyst"),
                control_plane.data.ca().cert_pem(),
            ) as client:
                seen: set[str] = set()
                long = asyncio.create_task(client.table(long_sql, timeout_s=60))
                await _until_queries_started(engine, config.launcher_id, seen, 1, long)
                short = asyncio.create_task(
                    client.table("SELECT 7 AS n, sleep_ms(3000) IS NULL AS slept", timeout_s=60)
                )
                await _until_queries_started(engine, config.launcher_id, seen, 2, short)
                assert not short.done()
                worker.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                short_rows = (await asyncio.wait_for(short, 30)).to_pylist()
                assert short_rows == [{"n": 7, "slept": True}]
                with pytest.raises(WorkerShutdownError, match="shut down"):
                    await asyncio.wait_for(long, 30)
                assert time.monotonic() - signalled >= 6  # not before the grace was over
            assert await asyncio.to_thread(worker.wait, 60) == 0
            said = (tmp_path / "worker.log").read_text()
            assert (
                f"endpoints allowed: aws; local directories allowed: {tmp_path.resolve()}" in said
            )
        finally:
            if worker.poll() is None:  # the test failed: do not leave the worker's sandboxes
                worker.kill()
                worker.wait()
                for found in engine.containers.list(
                    all=True, filters={"label": f"duckcell.launcher={config.launcher_id}"}
                ):
                    found.remove(force=True)
        assert containers_of(engine, config.launcher_id) == []
        lines = read_audit(tmp_path / "worker" / AUDIT_FILE)
        assert sorted((line["outcome"], line["reason"]) for line in lines) == [
            ("error", "worker_shutdown"),
            ("ok", ""),
        ]
        records = AuditLog(control_plane.data.database()).recent()
        assert sorted((r.outcome, r.reason, r.worker_id) for r in records) == [
            ("error", "worker_shutdown", identity.worker_id),
            ("ok", "", identity.worker_id),
        ]
        assert {r.query_id for r in records} == {line["query_id"] for line in lines}

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        control_plane.close()


def test_timeout_and_memory_kills_reach_a_remote_client_as_their_errors(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    """Policy tight: 2 s statement timeout, 256 MiB sandbox. The client behind the control
    plane gets the same error classes a local run raises."""
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        async with remote_stack(control_plane, config, tmp_path) as client:
            with pytest.raises(MemoryLimitError, match="memory"):
                await client.table("SELECT length(repeat('x', 1500000000)) AS n", "tight")
            with pytest.raises(QueryTimeoutError):
                await client.table(
                    "SELECT count(*) FROM range(10_000_000_000) t(i) WHERE i % 7 = 3", "tight"
                )
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        control_plane.close()


def _worker_process(
    config: LauncherConfig, state: Path, log: Path, *, grace_s: float
) -> subprocess.Popen[bytes]:
    """`duckcell worker` in its own process, with this test's launcher settings."""
    argv = [sys.executable, "-m", "launcher.cli", "--state-dir", str(config.state_dir)]
    argv += ["--policies-dir", str(config.policies_dir), "--image", config.image]
    argv += ["--launcher-id", config.launcher_id, "-v", "worker", "--state", str(state)]
    argv += ["--drain-grace", str(grace_s), "--allow-endpoint", "aws"]
    argv += ["--allow-local-dir", str(state.parent)]
    with log.open("wb") as output:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)


async def _until_queries_started(
    engine: docker.DockerClient,
    launcher_id: str,
    seen: set[str],
    count: int,
    query: asyncio.Task[object],
) -> None:
    """Wait until ``count`` of this launcher's sandboxes have logged that their runner started
    a query; ``seen`` collects their names across calls (a finished query's sandbox is gone)."""

    def look() -> None:
        seen.update(sandboxes_that_started_a_query(engine, launcher_id))

    async with asyncio.timeout(90):
        while await asyncio.to_thread(look) or len(seen) < count:
            if query.done():
                query.result()
                raise AssertionError("the query ended before its sandbox started it")
            await asyncio.sleep(0.2)


async def _until_query_started(
    engine: docker.DockerClient, launcher_id: str, query: asyncio.Task[object]
) -> None:
    """Wait until one of this launcher's sandboxes logs that its runner started a query."""

    def started() -> bool:
        return bool(sandboxes_that_started_a_query(engine, launcher_id))

    async with asyncio.timeout(60):
        while not await asyncio.to_thread(started):
            if query.done():
                query.result()
                raise AssertionError("the query ended before a sandbox started it")
            await asyncio.sleep(0.2)
