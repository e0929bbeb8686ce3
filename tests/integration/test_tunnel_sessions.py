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
from tests.support.controlplane import ControlPlane

from .conftest import containers_of, until_no_container
from .remote_stack import remote_stack

pytestmark = pytest.mark.docker
# Removing a container takes the engine a moment after the launcher lets it go.
REMOVAL_DEADLINE_S = 30.0


def test_a_session_keeps_its_temp_table_in_one_real_sandbox_until_closed(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        # No warm pool: every container that exists belongs to the session.
        async with remote_stack(control_plane, config, tmp_path) as client:
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
            await until_no_container(engine, config.launcher_id, REMOVAL_DEADLINE_S)
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        control_plane.close()
