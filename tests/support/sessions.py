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
from launcher.host import LocalLauncher
from launcher.worker.tunnel import TunnelClient

from .controlplane import DEADLINE_S, ControlPlane
from .fakes import FakeBackend
from .fakeworker import fake_worker
from .querystack import POLICY

SESSION_POLICY = """
name: agent-session
isolation: session
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}
session: {idle_ttl: 10m, max_lifetime: 1h}
pool: {warm: 0}
"""
# Ended by the worker's session reaper after one idle second.
BRIEF_POLICY = SESSION_POLICY.replace("agent-session", "brief").replace("10m", "1s")
CREATE = "CREATE TEMP TABLE notes AS SELECT {n} AS n"
READ = "SELECT n FROM notes"


@dataclass
class StackWorker:
    """One worker of the stack: its host (sandboxes over ``FakeBackend``), tunnel, finished
    queries."""

    host: LocalLauncher
    tunnel: TunnelClient
    running: asyncio.Task[None]
    records: list[QueryRecord]

    @property
    def backend(self) -> FakeBackend:
        backend = self.host.backend
        assert isinstance(backend, FakeBackend)
        return backend


@dataclass
class Sessions:
    control_plane: ControlPlane
    workers: list[StackWorker]
    client: ControlPlaneClient

    @property
    def host(self) -> LocalLauncher:
        return self.workers[0].host

    @property
    def backend(self) -> FakeBackend:
        return self.workers[0].backend

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
async def worker(control_plane: ControlPlane, state: Path) -> AsyncIterator[StackWorker]:
    records: list[QueryRecord] = []
    async with fake_worker(
        control_plane,
        state,
        [POLICY, SESSION_POLICY, BRIEF_POLICY],
        warm_override=0,
        on_finished=records.append,
    ) as started:
        assert started.running is not None
        yield StackWorker(started.host, started.tunnel, started.running, records)


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
