"""The whole remote path with real sandboxes, as tests set it up again and again: a control
plane (on its own thread's loop), one enrolled worker running a ``LocalLauncher``'s queries,
and a client with an API key. Leaving the block stops the worker and closes the launcher,
which destroys its sandboxes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.host import LocalLauncher
from launcher.worker.queries import ExecutorQueryRunner
from launcher.worker.tunnel import TunnelClient
from tests.unit.test_tunnel import DEADLINE_S, FAST, ControlPlane


@asynccontextmanager
async def remote_stack(
    control_plane: ControlPlane, config: LauncherConfig, tmp_path: Path, *, warm: int = 0
) -> AsyncIterator[ControlPlaneClient]:
    await control_plane.start()
    identity = await control_plane.enroll(tmp_path / "worker")
    async with LocalLauncher(config, warm_override=warm) as launcher:
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
            yield client
        finally:
            await client.close()
            tunnel.stop()
            await asyncio.wait_for(running, DEADLINE_S)
