"""An in-memory SandboxBackend whose "containers" are real runners served in-process.

Each fake container is a RunnerService (real DuckDB, real lockdown) on a real unix socket,
so the pool, the executor and the runner protocol are exercised without a Docker engine.
What it cannot show (namespaces, cgroups, the image) the integration tier covers.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from duckcell_runner.lockdown import RunnerConfig, open_locked
from duckcell_runner.service import RunnerService
from launcher.errors import ImageMissingError
from launcher.protocol import runner_pb2_grpc as pb_grpc
from launcher.sandbox.backend.base import (
    ContainerInfo,
    ContainerState,
    RuntimeRegistration,
    SandboxHandle,
    SandboxSpec,
)


@dataclass
class FakeContainer:
    spec: SandboxSpec
    socket: Path
    status: str = "created"
    server: grpc.Server | None = None
    oom_killed: bool = False
    sealed: bool = False


@dataclass
class FakeBackend:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fk")))
    images: set[str] = field(default_factory=lambda: {"img"})
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    created: int = 0
    removed: int = 0
    fail_start: bool = False
    # The engine's runtime registrations (no runsc: the gate refuses runsc policies), how often
    # they were read, and an error to answer the read with instead.
    registered: dict[str, RuntimeRegistration] = field(
        default_factory=lambda: {"runc": {"path": "runc"}}
    )
    runtime_reads: int = 0
    runtimes_error: Exception | None = None

    async def ping(self) -> None:
        return None

    async def image_present(self, image: str) -> bool:
        return image in self.images

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        if spec.image not in self.images:
            raise ImageMissingError(f"sandbox image {spec.image} missing")
        container_id = uuid.uuid4().hex
        directory = self.root / container_id[:8]
        (directory / "cache").mkdir(parents=True)
        (directory / "scratch").mkdir()
        socket = directory / "r.sock"
        self.containers[container_id] = FakeContainer(spec, socket)
        self.created += 1
        return SandboxHandle(container_id, spec.name, f"unix://{socket}")

    async def start(self, handle: SandboxHandle) -> None:
        container = self.containers[handle.container_id]
        if self.fail_start:
            container.status = "exited"
            return
        values = json.loads(container.spec.environment["DUCKCELL_RUNNER_CONFIG"])
        directory = container.socket.parent
        config = RunnerConfig(
            socket_path=str(container.socket),
            cache_dir=str(directory / "cache"),
            scratch_dir=str(directory / "scratch"),
            **values,
        )
        service = RunnerService(
            open_locked(config),
            default_timeout_s=config.statement_timeout_ms / 1000,
            batch_rows=config.batch_rows,
        )
        service.warm_up(time.perf_counter())
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_RunnerServicer_to_server(service, server)
        server.add_insecure_port(f"unix://{container.socket}")
        server.start()
        container.server = server
        container.status = "running"

    async def seal(self, handle: SandboxHandle) -> None:
        self.containers[handle.container_id].sealed = True

    async def kill(self, handle: SandboxHandle) -> None:
        container = self.containers.get(handle.container_id)
        if container and container.server:
            container.server.stop(0)
            container.status = "exited"

    async def remove(self, handle: SandboxHandle) -> None:
        await self.remove_by_id(handle.container_id)

    async def remove_by_id(self, container_id: str) -> None:
        container = self.containers.pop(container_id, None)
        if container is not None:
            if container.server:
                container.server.stop(0)
            self.removed += 1

    async def inspect(self, handle: SandboxHandle) -> ContainerState:
        container = self.containers.get(handle.container_id)
        if container is None:
            return ContainerState("missing", None, False)
        code = 137 if container.oom_killed else (1 if container.status == "exited" else None)
        return ContainerState(container.status, code, container.oom_killed)

    async def logs(self, handle: SandboxHandle, tail: int = 20) -> str:
        return "fake runner failed to start"

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        return [
            ContainerInfo(cid, c.spec.name, dict(c.spec.labels))
            for cid, c in self.containers.items()
            if all(c.spec.labels.get(k) == v for k, v in labels.items())
        ]

    async def runtimes(self) -> dict[str, RuntimeRegistration]:
        self.runtime_reads += 1
        if self.runtimes_error is not None:
            raise self.runtimes_error
        return self.registered

    def close(self) -> None:
        return None

    def live(self) -> int:
        return len(self.containers)
