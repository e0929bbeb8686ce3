"""``DockerBackend.create`` abandoned mid-call (a pool closing, a deadline) leaves no container.

The engine call runs in a thread that a cancel cannot stop: the container may be created after
the caller gave up. The removal by name must come after that call returns, never before it (a
removal first finds nothing, and the container created next is left behind). The engine here is
docker's own API client with the two calls replaced: no daemon is needed to see the order.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import docker

from launcher.sandbox.backend.base import SandboxSpec
from launcher.sandbox.backend.docker_engine import DockerBackend
from tests.support.waiting import eventually, run

# How long the engine below goes on creating once nothing asks it to stop (its "slow create").
ENGINE_CREATE_S = 2.0


class SlowEngine(docker.APIClient):
    """Creates slowly: returns once a removal was attempted (the bug) or after ENGINE_CREATE_S."""

    def __init__(self) -> None:
        super().__init__(base_url="unix:///nonexistent/docker.sock", version="1.41")
        self.calls: list[str] = []
        self._removal = threading.Event()

    def create_container(self, **kwargs: Any) -> dict[str, str]:
        self.calls.append("create started")
        self._removal.wait(ENGINE_CREATE_S)
        self.calls.append("created")
        return {"Id": "c0ffee"}

    def remove_container(self, container: str, force: bool = False, v: bool = False) -> None:
        self.calls.append(f"remove {container}")
        self._removal.set()


class Client:
    def __init__(self) -> None:
        self.api = SlowEngine()

    def close(self) -> None:
        return None


def test_a_cancelled_create_removes_the_container_after_the_engine_made_it(
    tmp_path: Path,
) -> None:
    client = Client()
    backend = DockerBackend(tmp_path / "run", client=client)  # type: ignore[arg-type]
    spec = SandboxSpec(
        name="duckcell-test-1",
        image="duckcell-sandbox:latest",
        runtime="runc",
        user="65534:65534",
        cpus=1,
        memory_bytes=2**30,
        pids=64,
        scratch_bytes=2**20,
        tmp_bytes=2**20,
        nofile=256,
        files_dir=None,
    )

    async def scenario() -> None:
        creating = asyncio.create_task(backend.create(spec))
        await eventually(lambda: "create started" in client.api.calls, "the engine call began")
        creating.cancel()
        await asyncio.gather(creating, return_exceptions=True)

    run(scenario)
    assert client.api.calls == ["create started", "created", "remove duckcell-test-1"]
    assert list((tmp_path / "run").iterdir()) == []  # the socket directory went too
