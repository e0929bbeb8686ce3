"""A query's whole path on loopback: client -> control plane -> tunnel -> worker -> executor.

``stack`` starts the control plane (``ControlPlane``, on its thread), enrolls a worker whose
queries run on the real executor over ``FakeBackend`` (real runners, real DuckDB; no Docker),
and hands out a client with an analyst's API key. Worker and client share the test's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc import aio

from launcher.client import ControlPlaneClient
from launcher.executor import QueryRecord
from launcher.model.policy import PolicySet, load_policy_text
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc
from launcher.worker.audit import AUDIT_FILE, WorkerAuditLog
from launcher.worker.queries import ExecutorQueryRunner
from launcher.worker.tunnel import TunnelClient

from .controlplane import DEADLINE_S, FAST, ControlPlane
from .fakes import FakeBackend
from .harness import Harness
from .waiting import eventually

POLICY = """
name: default
isolation: query
runtime: runc
limits: {cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 2s}
pool: {warm: 2}
"""
# Runs until the statement timeout (2 s) unless something stops it first.
LONG_SQL = "SELECT count(*) FROM range(1000000000000) t(i) WHERE i % 7 = 3"


@dataclass
class Stack:
    control_plane: ControlPlane
    harness: Harness
    worker: TunnelClient | None
    client: ControlPlaneClient
    api_key: str
    records: list[QueryRecord]
    running: asyncio.Task[None] | None = None  # the worker's TunnelClient.run()

    @property
    def address(self) -> str:
        assert self.control_plane.server is not None
        return self.control_plane.server.address

    def ca_pem(self) -> bytes:
        return self.control_plane.data.ca().cert_pem()

    async def until_running(self) -> None:
        await eventually(lambda: bool(self.harness.executor.running()), "the query started")


@asynccontextmanager
async def stack(
    control_plane: ControlPlane,
    tmp_path: Path,
    *,
    worker: bool = True,
    capacity: int = 24,
    policy: str = POLICY,
    drain_grace_s: float = 30.0,
) -> AsyncIterator[Stack]:
    """The whole path; the worker keeps its audit log in ``tmp_path/worker/audit.jsonl``."""
    await control_plane.start()
    harness = Harness(FakeBackend(), capacity=capacity)
    records: list[QueryRecord] = []
    runner = ExecutorQueryRunner(
        harness.executor,
        PolicySet([load_policy_text(policy, "<test>")]),
        on_finished=records.append,
    )
    tunnel: TunnelClient | None = None
    running: asyncio.Task[None] | None = None
    if worker:
        identity = await control_plane.enroll(tmp_path / "worker")
        tunnel = TunnelClient(
            identity,
            backoff=FAST,
            runner=runner,
            audit=WorkerAuditLog(tmp_path / "worker" / AUDIT_FILE),
            drain_grace_s=drain_grace_s,
        )
        running = asyncio.create_task(tunnel.run())
        await asyncio.wait_for(tunnel.connected.wait(), DEADLINE_S)
    api_key = control_plane.data.api_keys().create("analyst")
    assert control_plane.server is not None
    ca_pem = control_plane.data.ca().cert_pem()
    client = ControlPlaneClient(control_plane.server.address, api_key, ca_pem)
    try:
        yield Stack(control_plane, harness, tunnel, client, api_key, records, running)
    finally:
        await client.close()
        if tunnel is not None and running is not None:
            tunnel.stop()
            await asyncio.wait_for(running, DEADLINE_S)
        await harness.close()


async def raw_run(s: Stack, metadata: tuple[tuple[str, str], ...], sql: str) -> aio.AioRpcError:
    """Call Query.Run without the client class; return the status it ends with."""
    credentials = grpc.ssl_channel_credentials(s.ca_pem())
    async with aio.secure_channel(s.address, credentials) as channel:
        call = pb_grpc.QueryStub(channel).Run(pb.QueryRequest(sql=sql), metadata=metadata)
        with pytest.raises(aio.AioRpcError) as failed:
            async for _ in call:
                pass
    return failed.value
