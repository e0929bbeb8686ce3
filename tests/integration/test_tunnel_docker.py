"""The whole path with the real engine: client -> control plane -> mTLS tunnel -> worker ->
warm pool -> hardened sandbox -> Arrow back. The unit tier covers the same path over
in-process runners; this proves it with real containers, including that a query a client
abandons frees its sandbox.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

from launcher.config import LauncherConfig
from launcher.controlplane.datadir import ControlPlaneData
from launcher.errors import SqlError
from launcher.local import LocalLauncher
from launcher.remote import ControlPlaneClient
from launcher.tunnel import TunnelClient
from launcher.tunnel_queries import ExecutorQueryRunner
from tests.unit.test_tunnel import DEADLINE_S, FAST, ControlPlane

from .conftest import containers_of

pytestmark = pytest.mark.docker


def test_queries_through_the_tunnel_run_in_real_sandboxes(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        async with LocalLauncher(config, warm_override=1) as launcher:
            runner = ExecutorQueryRunner(launcher.executor, launcher.policies)
            tunnel = TunnelClient(identity, backoff=FAST, runner=runner)
            running = asyncio.create_task(tunnel.run())
            await asyncio.wait_for(tunnel.connected.wait(), DEADLINE_S)
            assert control_plane.server is not None
            client = ControlPlaneClient(
                control_plane.server.address,
                control_plane.data.api_keys().create("analyst"),
                control_plane.data.ca().cert_pem(),
            )
            try:
                table = await client.table("SELECT 42 AS answer, count(*) AS n FROM range(1000)")
                assert table.to_pylist() == [{"answer": 42, "n": 1000}]
                with pytest.raises(SqlError, match="Permission Error"):
                    await client.table("SELECT * FROM read_text('/etc/passwd')")
                results = await asyncio.gather(
                    *(client.table(f"SELECT {i} AS i") for i in range(8))
                )
                assert sorted(t.column("i")[0].as_py() for t in results) == list(range(8))
            finally:
                await client.close()
                tunnel.stop()
                await asyncio.wait_for(running, DEADLINE_S)
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        control_plane.close()
