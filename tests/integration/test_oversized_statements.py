"""One client's huge statements cannot take a worker offline for the others (issue 17, item 1).

The real control plane (heartbeats every 0.3 s: three missed and the worker is offline) and
`duckcell worker` as a process of its own, with a catalog whose tables make both sides parse
every query: the analyst's role is limited to some tables (the control plane parses), and the
worker parses to find what to fetch. One key sends a 6.9 MB million-item IN list (refused at
once, by size) and a 0.9 MB one (parsed in the parser processes, then run in its sandbox),
while another key's ``SELECT 42`` keeps being answered and the worker stays online. The
worker's own memory stays where it was: the parse ran in its child processes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
import duckdb
import pytest

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.errors import SqlError
from tests.support.controlplane import ControlPlane
from tests.support.waiting import eventually

from .conftest import containers_of

pytestmark = pytest.mark.docker

CATALOG = """
connections:
  files: {{kind: local}}
tables:
  trips: {{connection: files, path: "{path}", format: parquet}}
roles:
  analyst: {{tables: [trips]}}
  admin: {{}}
"""
HUGE = "SELECT count(*) AS n FROM trips WHERE id IN (" + ",".join(map(str, range(10**6))) + ")"
LARGE = "SELECT count(*) AS n FROM trips WHERE id IN (" + ",".join(map(str, range(138_000))) + ")"
# What the worker may add to its resident memory over the whole test: the statements' text
# and messages (a few MB each), not a parse (hundreds of MB to GB).
RSS_MARGIN_BYTES = 80 * 2**20


@dataclass
class Watch:
    """Another key's SELECT 42, again and again, and whether the worker stayed online."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    offline_seen: int = 0
    rss_max: int = 0


def test_huge_statements_from_one_key_leave_the_worker_online_for_the_others(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    assert len(HUGE.encode()) > 6_800_000 and 850_000 < len(LARGE.encode()) < 1_000_000
    trips = tmp_path / "trips.parquet"
    duckdb.execute(f"COPY (SELECT range AS id FROM range(1000)) TO '{trips}'")
    (tmp_path / "catalog.yaml").write_text(CATALOG.format(path=trips))
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        await control_plane.start()
        assert control_plane.server is not None
        identity = await control_plane.enroll(tmp_path / "worker")
        worker = _worker_process(config, tmp_path / "worker", tmp_path / "worker.log")
        try:
            await eventually(lambda: control_plane.worker(identity.worker_id).online, "online", 60)
            apply_catalog(control_plane.data.root, tmp_path / "catalog.yaml")
            keys = control_plane.data.api_keys()
            address, ca = control_plane.server.address, control_plane.data.ca().cert_pem()
            async with (
                ControlPlaneClient(address, keys.create("analyst"), ca) as analyst,
                ControlPlaneClient(address, keys.create("admin"), ca) as admin,
            ):
                await _until_catalog(admin)
                idle = _rss(worker.pid)
                watch, stop = Watch(), asyncio.Event()
                watching = asyncio.create_task(
                    _watch(admin, control_plane, identity.worker_id, worker.pid, watch, stop)
                )
                started = time.monotonic()
                with pytest.raises(SqlError, match=r"6\.9 MB .* the limit is 1 MiB"):
                    await analyst.table(HUGE, timeout_s=60)
                refused_s = time.monotonic() - started
                table = await analyst.table(LARGE, timeout_s=120)
                assert table.to_pylist() == [{"n": 1000}]
                parsers = _parser_children(worker.pid)
                stop.set()
                await watching
            assert refused_s < 3, refused_s
            assert len(parsers) == 2, parsers  # the worker's parse pool
            assert watch.errors == [] and watch.offline_seen == 0
            assert len(watch.latencies) >= 5 and max(watch.latencies) < 10, watch.latencies
            assert watch.rss_max - idle < RSS_MARGIN_BYTES, (idle, watch.rss_max)
            assert control_plane.worker(identity.worker_id).online
        finally:
            worker.terminate()
            try:
                await asyncio.to_thread(worker.wait, 60)
            finally:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
                for found in engine.containers.list(
                    all=True, filters={"label": f"duckcell.launcher={config.launcher_id}"}
                ):
                    found.remove(force=True)
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 300))
    finally:
        control_plane.close()


async def _watch(
    client: ControlPlaneClient,
    control_plane: ControlPlane,
    worker_id: str,
    pid: int,
    watch: Watch,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            table = await client.table("SELECT 42 AS answer", timeout_s=60)
            assert table.to_pylist() == [{"answer": 42}]
            watch.latencies.append(time.monotonic() - started)
        except Exception as error:  # every failure is a finding: collect them all
            watch.errors.append(f"{type(error).__name__}: {error}")
        if not control_plane.worker(worker_id).online:
            watch.offline_seen += 1
        watch.rss_max = max(watch.rss_max, _rss(pid))
        await asyncio.sleep(0.05)


async def _until_catalog(client: ControlPlaneClient) -> None:
    """The worker has the catalog once a query of its table runs there."""
    async with asyncio.timeout(60):
        while True:
            try:
                await client.table("SELECT count(*) FROM trips", timeout_s=60)
                return
            except SqlError:  # not pushed yet: no table trips in the sandbox
                await asyncio.sleep(0.2)


def _worker_process(config: LauncherConfig, state: Path, log: Path) -> subprocess.Popen[bytes]:
    """`duckcell worker` in its own process, with this test's launcher settings."""
    argv = [sys.executable, "-m", "launcher.cli", "--state-dir", str(config.state_dir)]
    argv += ["--policies-dir", str(config.policies_dir), "--image", config.image]
    argv += ["--launcher-id", config.launcher_id, "worker", "--state", str(state)]
    argv += ["--drain-grace", "5", "--allow-local-dir", str(state.parent)]
    with log.open("wb") as output:
        return subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as statm:
        return int(statm.read().split()[1]) * 4096


def _parser_children(pid: int) -> list[int]:
    """The worker's child processes that run ``launcher.model.sql.tables`` (its parsers)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"launcher.model.sql.tables" in cmdline:
                found.append(int(child))
    return found
