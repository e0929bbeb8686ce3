"""A session through the control plane with the real engine: open it, keep a temp table in its
real sandbox across two queries, close it, and its container is gone. The unit tier
(``tests/unit/test_tunnel_sessions.py``) covers isolation, ownership and the ways a session
ends over in-process sandboxes; this proves the path end to end with Docker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

from launcher.config import LauncherConfig
from launcher.controlplane.datadir import ControlPlaneData
from launcher.errors import SessionError, SqlError
from launcher.local import LocalLauncher
from launcher.remote import ControlPlaneClient
from launcher.tunnel import TunnelClient
from launcher.tunnel_queries import ExecutorQueryRunner
from tests.unit.test_tunnel import DEADLINE_S, FAST, ControlPlane

from .conftest import containers_of

pytestmark = pytest.mark.docker
# Removing a container takes the engine a moment after the launcher lets it go.
REMOVAL_DEADLINE_S = 30.0


async def _until_no_container(engine: docker.DockerClient, launcher_id: str) -> None:
    async with asyncio.timeout(REMOVAL_DEADLINE_S):
        while await asyncio.to_thread(containers_of, engine, launcher_id):
            await asyncio.sleep(0.2)


def test_a_session_keeps_its_temp_table_in_one_real_sandbox_until_closed(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        # No warm pool: every container that exists belongs to the session.
        async with LocalLauncher(config, warm_override=0) as launcher:
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
                session_id = await client.open_session("agent-session", timeout_s=60)
                (sandbox,) = containers_of(engine, config.launcher_id)
                create = "CREATE TEMP TABLE notes AS SELECT i, i * i AS sq FROM range(4) t(i)"
                await client.table(create, session_id=session_id, timeout_s=60)
                table = await client.table(
                    "SELECT sum(sq) AS total FROM notes", session_id=session_id, timeout_s=60
                )
                assert table.to_pylist() == [{"total": 14}]
                assert containers_of(engine, config.launcher_id) == [sandbox]
                with pytest.raises(SqlError, match="notes"):
                    await client.table("SELECT * FROM notes", timeout_s=60)  # outside it
                await client.close_session(session_id)
                with pytest.raises(SessionError, match="has ended: it was closed"):
                    await client.table("SELECT * FROM notes", session_id=session_id)
                await _until_no_container(engine, config.launcher_id)
            finally:
                await client.close()
                tunnel.stop()
                await asyncio.wait_for(running, DEADLINE_S)
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        control_plane.close()
