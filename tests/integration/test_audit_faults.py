"""Issue 17, item 5: every query keeps its audit record on both sides when either side is
killed mid-query (SIGKILL, no chance to clean up) and started again.

The control plane (``duckcell controlplane serve``) and the worker (``duckcell worker``) run as
real processes, as deployed; the query is a range aggregation that runs for many seconds in a
real sandbox under the default policy, and each process is killed once its sandbox has started
the query.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.controlplane.audit import AuditLog, AuditRecord
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.registry import WorkerRegistry
from launcher.errors import DuckcellError, WorkerUnavailableError
from launcher.worker.audit import AUDIT_FILE, LOST, read_audit, read_entries
from launcher.worker.enroll import Identity, enroll

from .conftest import containers_of, sandboxes_that_started_a_query

pytestmark = pytest.mark.docker

LONG_SQL = "SELECT count(*) FROM range(10_000_000_000) t(i) WHERE i % 7 = 3"
READY = "control plane listening on"
START_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ControlPlaneProcess:
    """``duckcell controlplane serve`` on fixed loopback ports, so a restart comes back where
    the enrolled worker dials."""

    def __init__(self, data: ControlPlaneData, log: Path) -> None:
        self.data = data
        self.address = f"127.0.0.1:{free_port()}"
        self.tunnel_address = f"127.0.0.1:{free_port()}"
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        argv = [sys.executable, "-m", "launcher.cli", "controlplane", "serve"]
        argv += ["--data", str(self.data.root), "--listen", self.address]
        argv += ["--tunnel-listen", self.tunnel_address]
        offset = self._log.stat().st_size if self._log.exists() else 0
        with self._log.open("ab") as output:
            self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        await until(lambda: READY in self._log.read_text()[offset:], "the control plane is up")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def worker_online(self, worker_id: str) -> bool:
        with contextlib.closing(self.data.database()) as conn:
            worker = WorkerRegistry(conn).get(worker_id)
        return worker is not None and worker.online

    def audit(self) -> list[AuditRecord]:
        with contextlib.closing(self.data.database()) as conn:
            return AuditLog(conn).recent(100)

    def client(self) -> ControlPlaneClient:
        key = self.data.api_keys().create("analyst")
        return ControlPlaneClient(self.address, key, self.data.ca().cert_pem())


def worker_process(config: LauncherConfig, state: Path, log: Path) -> subprocess.Popen[bytes]:
    """`duckcell worker` in its own process, with this test's launcher settings."""
    argv = [sys.executable, "-m", "launcher.cli", "--state-dir", str(config.state_dir)]
    argv += ["--policies-dir", str(config.policies_dir), "--image", config.image]
    argv += ["--launcher-id", config.launcher_id, "-v", "worker", "--state", str(state)]
    argv += ["--drain-grace", "2"]
    with log.open("ab") as output:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = START_S) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not await asyncio.to_thread(condition):
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"waited {timeout_s:g} s in vain: {what}") from None


async def started_in_a_sandbox(
    engine: docker.DockerClient, launcher_id: str, query: asyncio.Task[object]
) -> None:
    """Wait until one of the launcher's sandboxes has started running the query."""

    def started() -> bool:
        if query.done():
            query.result()
            raise AssertionError("the query ended before a sandbox started it")
        return bool(sandboxes_that_started_a_query(engine, launcher_id))

    await until(started, "a sandbox started the query")


async def enrolled(control_plane: ControlPlaneProcess, state: Path) -> Identity:
    token = control_plane.data.tokens().create()
    return await enroll(control_plane.address, token, state, "w1")


def stop_worker(
    worker: subprocess.Popen[bytes], engine: docker.DockerClient, launcher_id: str
) -> int | None:
    """SIGTERM (a drain); a worker that does not exit is killed and its sandboxes removed."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            return worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    for name in containers_of(engine, launcher_id):
        with contextlib.suppress(docker.errors.NotFound):
            engine.containers.get(name).remove(force=True)
    return worker.returncode


def test_a_control_plane_killed_mid_query_records_it_lost_when_it_starts_again(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    control_plane = ControlPlaneProcess(ControlPlaneData(tmp_path / "cp"), tmp_path / "cp.log")
    state = tmp_path / "worker"

    async def scenario() -> None:
        await control_plane.start()
        identity = await enrolled(control_plane, state)
        worker = worker_process(config, state, tmp_path / "worker.log")
        try:
            await until(lambda: control_plane.worker_online(identity.worker_id), "online")
            client = control_plane.client()
            query = asyncio.create_task(client.table(LONG_SQL, timeout_s=120))
            await started_in_a_sandbox(engine, config.launcher_id, query)
            # Its row was opened before the query was sent, and is still open.
            (running,) = control_plane.audit()
            assert (running.outcome, running.worker_id) == ("running", identity.worker_id)
            control_plane.kill()
            with pytest.raises(DuckcellError):
                await asyncio.wait_for(query, 60)
            await client.close()

            await control_plane.start()
            (lost,) = control_plane.audit()
            assert (lost.query_id, lost.outcome) == (running.query_id, LOST)
            assert lost.reason == "control_plane_exited"
            assert (lost.caller, lost.sql, lost.sql_sha256) == (
                running.caller,
                LONG_SQL,
                running.sql_sha256,
            )
            assert (lost.worker_id, lost.started_at) == (identity.worker_id, running.started_at)
            assert lost.caller.endswith("/analyst") and lost.policy == running.policy

            # The worker's side closed it when the tunnel dropped (its sandbox was stopped).
            path = state / AUDIT_FILE
            await until(lambda: bool(read_audit(path)), "the worker closed its record")
            (closed,) = read_audit(path)
            assert (closed["query_id"], closed["outcome"]) == (running.query_id, "error")
            assert closed["reason"] == "cancelled" and closed["sandbox"]

            # It reconnects and serves the next query; the operator sees the lost one.
            await until(lambda: control_plane.worker_online(identity.worker_id), "back online")
            async with control_plane.client() as again:
                table = await again.table("SELECT 42 AS answer", timeout_s=60)
            assert table.to_pylist() == [{"answer": 42}]
        finally:
            assert stop_worker(worker, engine, config.launcher_id) == 0
            control_plane.stop()
        command = [sys.executable, "-m", "launcher.cli", "controlplane", "audit", "--json"]
        listed = subprocess.run(
            [*command, "--data", str(control_plane.data.root)], capture_output=True, check=True
        )
        rows = json.loads(listed.stdout)
        assert [(r["outcome"], r["reason"]) for r in rows] == [
            ("ok", ""),
            (LOST, "control_plane_exited"),
        ]
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        control_plane.stop()


def test_a_worker_killed_mid_query_records_it_lost_when_it_starts_again(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    control_plane = ControlPlaneProcess(ControlPlaneData(tmp_path / "cp"), tmp_path / "cp.log")
    state = tmp_path / "worker"
    path = state / AUDIT_FILE

    async def scenario() -> None:
        await control_plane.start()
        identity = await enrolled(control_plane, state)
        worker = worker_process(config, state, tmp_path / "worker.log")
        try:
            await until(lambda: control_plane.worker_online(identity.worker_id), "online")
            async with control_plane.client() as client:
                query = asyncio.create_task(client.table(LONG_SQL, timeout_s=120))
                await started_in_a_sandbox(engine, config.launcher_id, query)
                opens = [e for e in read_entries(path) if e["event"] == "open"]
                (opening,) = opens  # on disk before the query ran
                worker.kill()
                worker.wait()
                with pytest.raises(WorkerUnavailableError, match="disconnected during the query"):
                    await asyncio.wait_for(query, 60)
            (failed,) = control_plane.audit()
            assert (failed.query_id, failed.outcome) == (opening["query_id"], "error")
            assert (failed.reason, failed.worker_id) == ("worker_lost", identity.worker_id)
            assert read_audit(path) == []  # the worker died before it could close its record

            worker = worker_process(config, state, tmp_path / "worker.log")
            await until(lambda: bool(read_audit(path)), "the restarted worker reconciled")
            (lost,) = read_audit(path)
            assert (lost["query_id"], lost["outcome"]) == (failed.query_id, LOST)
            assert lost["reason"] == "worker_exited" and lost["sql"] == LONG_SQL
            assert lost["sql_sha256"] == failed.sql_sha256 and lost["policy"] == "default"
            assert (lost["run"], lost["worker"]) == (opening["run"], identity.worker_id)
            assert lost["started_at"] == opening["started_at"] and lost["reconciled_by"]
            await until(lambda: control_plane.worker_online(identity.worker_id), "back online")
        finally:
            assert stop_worker(worker, engine, config.launcher_id) == 0
        # The restart removed the dead run's sandbox (still running the query) too.
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        control_plane.stop()
