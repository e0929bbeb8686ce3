"""Bring one sandbox from nothing to ready, or leave nothing behind.

Ready means the container runs, the runner answered a real RPC over the socket, the
warm-up Arrow IPC decoded on our side, and the runner's socket directory is sealed (no longer
writable by the sandbox, its socket checked): the pool never hands out a half-started sandbox.
With a cache, every sandbox also gets its own files directory, created before the container
(it is the container's only ``/cache``) and removed after it (``launcher.sandbox.files``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import DuckcellError, SandboxStartError
from ..model.policy import Isolation, Policy
from .backend.base import SandboxBackend, SandboxHandle, SandboxSpec
from .files import SandboxFiles
from .runner_client import RunnerClient
from .spec import Sandbox, build_spec, new_sandbox_name

_EXIT_POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class FactorySettings:
    """What every sandbox of a host shares: its image, whose it is (labels), where its files
    directories go (``cache_dir``; None: no catalog files), how long a start may take."""

    image: str
    launcher_id: str
    instance_id: str
    cache_dir: str | None
    start_timeout_s: float = 60.0


class SandboxFactory:
    """Starts sandboxes for the pools: ``start(policy)`` returns a ready sandbox or raises
    (``SandboxStartError``, ``EngineUnavailableError``, ...) with nothing left behind."""

    def __init__(self, backend: SandboxBackend, settings: FactorySettings) -> None:
        self.backend = backend
        self.settings = settings

    async def start(self, policy: Policy) -> Sandbox:
        settings = self.settings
        slot = uuid.uuid4().hex[:16]
        files = None
        if settings.cache_dir:
            files = SandboxFiles.for_slot(Path(settings.cache_dir), settings.instance_id, slot)
            await asyncio.to_thread(files.create)
        try:
            handle = await self.backend.create(self._spec(policy, slot, files))
        except BaseException:
            if files is not None:
                await asyncio.shield(asyncio.to_thread(files.remove))
            raise
        client: RunnerClient | None = None
        try:
            await self.backend.start(handle)
            client = RunnerClient(handle.runner_target)
            await self._wait_ready(handle, client)
            await self.backend.seal(handle)
        except BaseException as error:
            await self._discard(handle, client, files, error)
            raise
        return Sandbox(handle=handle, policy=policy, client=client, slot=slot, files=files)

    def _spec(self, policy: Policy, slot: str, files: SandboxFiles | None) -> SandboxSpec:
        settings = self.settings
        return build_spec(
            policy,
            name=new_sandbox_name(),
            slot=slot,
            image=settings.image,
            launcher_id=settings.launcher_id,
            instance_id=settings.instance_id,
            files_dir=str(files.host) if files is not None else None,
            lock_to_dir=files is not None and policy.isolation is Isolation.SESSION,
        )

    async def _wait_ready(self, handle: SandboxHandle, client: RunnerClient) -> None:
        """Wait for Ready, but notice at once if the container exits instead."""
        ready = asyncio.ensure_future(client.wait_ready(self.settings.start_timeout_s))
        try:
            while not ready.done():
                await asyncio.wait({ready}, timeout=_EXIT_POLL_S)
                if ready.done():
                    break
                state = await self.backend.inspect(handle)
                if state.status in ("exited", "dead", "missing"):
                    logs = (await self.backend.logs(handle)).strip().splitlines()
                    tail = logs[-1] if logs else "no output"
                    raise SandboxStartError(
                        f"sandbox {handle.name} exited with code {state.exit_code} before it "
                        f"was ready: {tail}"
                    )
            ready.result()
        finally:
            ready.cancel()

    async def _discard(
        self,
        handle: SandboxHandle,
        client: RunnerClient | None,
        files: SandboxFiles | None,
        error: BaseException,
    ) -> None:
        # Shielded: a cancelled start must still remove what it created.
        async def cleanup() -> None:
            if client is not None:
                await client.close()
            with contextlib.suppress(DuckcellError):
                await self.backend.remove(handle)
            if files is not None:
                await asyncio.to_thread(files.remove)

        await asyncio.shield(cleanup())

    async def destroy(self, sandbox: Sandbox) -> None:
        """Kill and remove; removal is a forced remove, so PID 1 never gets a grace period.

        The files directory goes once the container is gone (nothing reads it then), even
        if the removal failed: its links would only keep evicted cache entries alive.
        """
        try:
            await sandbox.client.close()
        finally:
            try:
                await self.backend.remove(sandbox.handle)
            finally:
                if sandbox.files is not None:
                    await asyncio.to_thread(sandbox.files.remove)
