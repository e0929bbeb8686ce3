"""A control plane on its own event loop in a thread, for tests that drive a worker or a client
on theirs: the real server, real TLS and mutual TLS on loopback, stopped, restarted and revoked on
from the test's loop. ``control_plane`` is its fixture (registered in ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.registry import Worker, WorkerRegistry
from launcher.controlplane.server import ControlPlaneServer
from launcher.worker.dialing import Backoff
from launcher.worker.enroll import Identity, enroll

# Heartbeats every 0.3 s: a stream is ended after 3 missed ones (0.9 s). 0.1 s was fast but
# a loaded two-core machine stalled a loop for 0.3 s now and then, ending tunnels mid-test.
INTERVAL_S = 0.3
DEADLINE_S = 5.0
FAST = Backoff(base_s=0.02, cap_s=0.2)


class ControlPlane:
    """A control plane on a thread's event loop that tests can stop, restart and revoke on."""

    def __init__(
        self,
        data: ControlPlaneData,
        observe: Callable[[Message], object] | None = None,
        *,
        heartbeat_interval_s: float = INTERVAL_S,
    ) -> None:
        self.data = data
        self.heartbeat_interval_s = heartbeat_interval_s
        self._observe = observe or (lambda message: None)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: ControlPlaneServer | None = None
        self.listen, self.tunnel_listen = "127.0.0.1:0", "127.0.0.1:0"
        self._enrolled = 0

    async def _on_loop(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    async def start(self) -> None:
        self.server = ControlPlaneServer(
            self.data,
            self.listen,
            tunnel_listen=self.tunnel_listen,
            heartbeat_interval_s=self.heartbeat_interval_s,
            observe=self._observe,
        )
        await self._on_loop(self.server.start())
        # A restart comes back on the same ports.
        self.listen, self.tunnel_listen = self.server.address, self.server.tunnel_address

    async def stop(self) -> None:
        if self.server is not None:
            await self._on_loop(self.server.stop(0))
            self.server = None

    async def revoke(self, worker_id: str) -> Worker:
        assert self.server is not None
        return await self._on_loop(self.server.revoke(worker_id))

    async def enroll(self, state: Path) -> Identity:
        """A new worker, named w1, w2, ... (names are unique per control plane)."""
        assert self.server is not None
        self._enrolled += 1
        name = f"w{self._enrolled}"
        return await enroll(self.server.address, self.data.tokens().create(), state, name)

    def worker(self, worker_id: str) -> Worker:
        worker = WorkerRegistry(self.data.database()).get(worker_id)
        assert worker is not None
        return worker

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.stop(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ControlPlane]:
    cp = ControlPlane(ControlPlaneData(tmp_path / "cp"))
    try:
        yield cp
    finally:
        cp.close()
