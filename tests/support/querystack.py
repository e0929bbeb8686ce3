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
from launcher.config import load_config
from launcher.executor import QueryRecord
from launcher.host import LocalLauncher
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc
from launcher.worker.tunnel import TunnelClient

from .controlplane import ControlPlane
from .fakes import FakeBackend
from .fakeworker import fake_worker
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
    host: LocalLauncher  # the worker's host (over FakeBackend), or a bare one with no worker
    worker: TunnelClient | None
    client: ControlPlaneClient
    api_key: str
    records: list[QueryRecord]
    running: asyncio.Task[None] | None = None  # the worker's TunnelClient.run()

    @property
    def backend(self) -> FakeBackend:
        backend = self.host.backend
        assert isinstance(backend, FakeBackend)
        return backend

    @property
    def address(self) -> str:
        assert self.control_plane.server is not None
        return self.control_plane.server.address

    def ca_pem(self) -> bytes:
        return self.control_plane.data.ca().cert_pem()

    async def until_running(self) -> None:
        await eventually(lambda: bool(self.host.executor.running()), "the query started")


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
    """The whole path; the worker keeps its audit log in ``tmp_path/worker/audit.jsonl``.
    Without ``worker`` nothing is enrolled (queries find no worker)."""
    await control_plane.start()
    assert control_plane.server is not None
    records: list[QueryRecord] = []
    api_key = control_plane.data.api_keys().create("analyst")
    client = ControlPlaneClient(
        control_plane.server.address, api_key, control_plane.data.ca().cert_pem()
    )
    try:
        if worker:
            async with fake_worker(
                control_plane,
                tmp_path / "worker",
                [policy],
                capacity=capacity,
                drain_grace_s=drain_grace_s,
                on_finished=records.append,
            ) as started:
                yield Stack(
                    control_plane,
                    started.host,
                    started.tunnel,
                    client,
                    api_key,
                    records,
                    started.running,
                )
        else:
            yield Stack(control_plane, _idle_host(tmp_path), None, client, api_key, records)
    finally:
        await client.close()


def _idle_host(tmp_path: Path) -> LocalLauncher:
    """A host that is never started: the stack without a worker runs no query."""
    config = load_config(flags={"state_dir": tmp_path / "host", "image": "img"}, env={})
    return LocalLauncher(config, FakeBackend())


async def raw_run(s: Stack, metadata: tuple[tuple[str, str], ...], sql: str) -> aio.AioRpcError:
    """Call Query.Run without the client class; return the status it ends with."""
    credentials = grpc.ssl_channel_credentials(s.ca_pem())
    async with aio.secure_channel(s.address, credentials) as channel:
        call = pb_grpc.QueryStub(channel).Run(pb.QueryRequest(sql=sql), metadata=metadata)
        with pytest.raises(aio.AioRpcError) as failed:
            async for _ in call:
                pass
    return failed.value
