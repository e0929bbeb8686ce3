"""The whole remote path with real sandboxes, as tests set it up again and again: a control
plane (on its own thread's loop), one enrolled ``Worker`` with real sandboxes, and a client
with an API key. Leaving the block stops the worker, which destroys its sandboxes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.worker.daemon import Worker
from tests.support.controlplane import DEADLINE_S, FAST, ControlPlane


@asynccontextmanager
async def remote_stack(
    control_plane: ControlPlane, config: LauncherConfig, tmp_path: Path, *, warm: int = 0
) -> AsyncIterator[ControlPlaneClient]:
    await control_plane.start()
    identity = await control_plane.enroll(tmp_path / "worker")
    async with Worker(identity, config, backoff=FAST, warm_override=warm) as worker:
        worker.start()
        await worker.connected(DEADLINE_S)
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
