"""Sessions through the control plane: a worker that knows a query policy and two session
policies, behind the control plane of ``tests.support.controlplane``.

``sessions_stack`` starts the control plane, enrolls ``workers`` workers (real executor over
``FakeBackend``) and hands out a client; a temp table made with ``CREATE`` and read with ``READ``
is the witness of where a query ran.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from launcher.client import ControlPlaneClient
from launcher.controlplane.routing import QueryRouter
from launcher.executor import QueryRecord
from launcher.model.policy import PolicySet, load_policy_text
from launcher.worker.queries import ExecutorQueryRunner
from launcher.worker.tunnel import TunnelClient

from .controlplane import DEADLINE_S, FAST, ControlPlane
from .fakes import FakeBackend
from .harness import Harness
from .querystack import POLICY

SESSION_POLICY = """
name: agent-session
isolation: session
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}
session: {idle_ttl: 10m, max_lifetime: 1h}
pool: {warm: 0}
"""
# Ended by the worker's reaper (every second in the Harness) after one idle second.
BRIEF_POLICY = SESSION_POLICY.replace("agent-session", "brief").replace("10m", "1s")
CREATE = "CREATE TEMP TABLE notes AS SELECT {n} AS n"
READ = "SELECT n FROM notes"


@dataclass
class Worker:
    """One worker of the stack: its sandboxes (``harness``), tunnel and finished queries."""

    harness: Harness
    tunnel: TunnelClient
    running: asyncio.Task[None]
    records: list[QueryRecord]


@dataclass
class Sessions:
    control_plane: ControlPlane
    workers: list[Worker]
    client: ControlPlaneClient

    @property
    def harness(self) -> Harness:
        return self.workers[0].harness

    @property
    def records(self) -> list[QueryRecord]:
        return self.workers[0].records

    @property
    def router(self) -> QueryRouter:
        assert self.control_plane.server is not None and self.control_plane.server.router
        return self.control_plane.server.router

    def other_client(self) -> ControlPlaneClient:
        """A client with another API key of the same role."""
        server = self.control_plane.server
        assert server is not None
        key = self.control_plane.data.api_keys().create("analyst")
        return ControlPlaneClient(server.address, key, self.control_plane.data.ca().cert_pem())

    async def read(self, session_id: str) -> list[int]:
        table = await self.client.table(READ, session_id=session_id, timeout_s=DEADLINE_S)
        return table.column("n").to_pylist()


@asynccontextmanager
async def worker(control_plane: ControlPlane, state: Path) -> AsyncIterator[Worker]:
    harness = Harness(FakeBackend(), capacity=8)
    records: list[QueryRecord] = []
    policies = [load_policy_text(text, "<test>") for text in (POLICY, SESSION_POLICY, BRIEF_POLICY)]
    runner = ExecutorQueryRunner(harness.executor, PolicySet(policies), on_finished=records.append)
    tunnel = TunnelClient(await control_plane.enroll(state), backoff=FAST, runner=runner)
    running = asyncio.create_task(tunnel.run())
    try:
        await asyncio.wait_for(tunnel.connected.wait(), DEADLINE_S)
        yield Worker(harness, tunnel, running, records)
    finally:
        tunnel.stop()
        await asyncio.wait_for(running, DEADLINE_S)
        await harness.close()
        assert harness.backend.live() == 0, "a session's sandbox was left behind"


@asynccontextmanager
async def sessions_stack(
    control_plane: ControlPlane, tmp_path: Path, *, workers: int = 1
) -> AsyncIterator[Sessions]:
    await control_plane.start()
    assert control_plane.server is not None
    key = control_plane.data.api_keys().create("analyst")
    async with contextlib.AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(worker(control_plane, tmp_path / f"worker{n}"))
            for n in range(workers)
        ]
        client = ControlPlaneClient(
            control_plane.server.address, key, control_plane.data.ca().cert_pem()
        )
        stack.push_async_callback(client.close)
        yield Sessions(control_plane, started, client)
