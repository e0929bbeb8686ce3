"""The backend Protocol: create, start, kill, remove and look at sandbox containers.

A backend is handed in through constructors (the pool, the reaper), like an httpx transport;
unit tests pass an in-memory fake, integration tests the real Docker engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypedDict

# Label keys every sandbox carries, so orphans can be found after a crash.
LABEL_LAUNCHER = "duckcell.launcher"
LABEL_INSTANCE = "duckcell.instance"
LABEL_POLICY = "duckcell.policy"
LABEL_QUERY = "duckcell.query"
LABEL_SESSION = "duckcell.session"
LABEL_SANDBOX = "duckcell.sandbox"


# Where a sandbox sees its own files directory (``SandboxSpec.files_dir``), read-only.
SANDBOX_FILES = "/cache/files"


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything needed to create one hardened sandbox container (no secrets, ever)."""

    name: str
    image: str
    runtime: str
    user: str
    cpus: float
    memory_bytes: int
    pids: int
    scratch_bytes: int
    tmp_bytes: int
    nofile: int
    files_dir: str | None  # the sandbox's own files (launcher.sandbox.files), or none
    labels: Mapping[str, str] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    # RLIMIT_NPROC inside the sandbox, for a runtime that counts it per sandbox (gVisor);
    # under runc it would count every process of uid 65534 on the host, all sandboxes'.
    nproc: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxHandle:
    """A created container and where its runner will listen."""

    container_id: str
    name: str
    runner_target: str  # a gRPC target, e.g. "unix:///.../runner.sock"


@dataclass(frozen=True, slots=True)
class ContainerState:
    status: str  # created | running | exited | dead | missing
    exit_code: int | None
    oom_killed: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    container_id: str
    name: str
    labels: Mapping[str, str]


class RuntimeRegistration(TypedDict, total=False):
    """One runtime as the engine registered it (``docker info``'s "Runtimes" values)."""

    path: str
    runtimeArgs: list[str]


class SandboxBackend(Protocol):
    """Runs sandbox containers. Every method has a deadline and raises BackendError."""

    async def ping(self) -> None: ...

    async def image_present(self, image: str) -> bool: ...

    async def create(self, spec: SandboxSpec) -> SandboxHandle: ...

    async def start(self, handle: SandboxHandle) -> None: ...

    async def seal(self, handle: SandboxHandle) -> None:
        """Once the runner is ready: take the sandbox's write access to its socket directory
        away and check the socket is the one the runner made. Raises BackendError if not."""
        ...

    async def kill(self, handle: SandboxHandle) -> None: ...

    async def remove(self, handle: SandboxHandle) -> None:
        """Kill if needed and remove the container and its socket directory."""
        ...

    async def inspect(self, handle: SandboxHandle) -> ContainerState: ...

    async def logs(self, handle: SandboxHandle, tail: int = 20) -> str: ...

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]: ...

    async def remove_by_id(self, container_id: str) -> None: ...

    async def runtimes(self) -> Mapping[str, RuntimeRegistration]:
        """The engine's runtime registrations by name, read anew."""
        ...

    def close(self) -> None:
        """Let go of the engine connection; the host that was given the backend calls it."""
        ...
