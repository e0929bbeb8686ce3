"""The Docker implementation of SandboxBackend; the only module that imports ``docker``.

The SDK is blocking, so every call runs in a worker thread under two deadlines: the HTTP
client's own timeout and an ``asyncio.wait_for`` around the thread, because a wedged runtime
can leave the engine holding a request open. Docker exceptions become BackendError here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

import docker
import docker.errors
import requests.exceptions

from ...config import LauncherConfig
from ...errors import BackendError, EngineTimeoutError, EngineUnavailableError, ImageMissingError
from .base import (
    SANDBOX_FILES,
    ContainerInfo,
    ContainerState,
    RuntimeRegistration,
    SandboxHandle,
    SandboxSpec,
)
from .paths import EngineMount, EnginePaths
from .seccomp import profile_json

T = TypeVar("T")

SOCKET_NAME = "runner.sock"
RUNNER_DIR = "/run/duckcell"
SANDBOX_UID = 65534
LOG_OPTIONS = {"max-size": "1m", "max-file": "1"}

_ENGINE_HELP = (
    "start a Docker engine (from a duckcell checkout: sudo scripts/ensure-docker.sh, "
    "or `make engine`) or point DOCKER_HOST at one"
)


def _connect(timeout_s: float) -> docker.DockerClient:
    try:
        return docker.from_env(timeout=int(max(1, timeout_s)))
    except docker.errors.DockerException as error:
        raise EngineUnavailableError(
            f"no Docker engine answers ({error}); {_ENGINE_HELP}"
        ) from None


class DockerBackend:
    """Creates hardened sandbox containers through the Docker engine API."""

    def __init__(
        self,
        run_dir: Path,
        *,
        timeout_s: float = 30.0,
        client: docker.DockerClient | None = None,
        paths: EnginePaths = EnginePaths.SAME,
    ) -> None:
        self._run_dir = run_dir
        self._paths = paths
        self._timeout_s = timeout_s
        # Connected at the first engine call (in a worker thread, under that call's
        # deadline), so building a backend never blocks or fails: its user reports both.
        self._client = client
        self._connecting = threading.Lock()
        self._run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self._run_dir, 0o700)

    @classmethod
    def for_config(cls, config: LauncherConfig) -> Self:
        """The engine backend a launcher's config describes: its run directory, its deadline, and
        where the engine sees its bind sources (a worker in a container)."""
        return cls(
            config.run_dir,
            timeout_s=config.engine_timeout_s,
            paths=EnginePaths(config.engine_paths),
        )

    @property
    def _api(self) -> docker.APIClient:
        if self._client is None:
            with self._connecting:  # engine calls run in several threads at once
                if self._client is None:
                    self._client = _connect(self._timeout_s)
        return self._client.api

    async def _call(self, what: str, fn: Callable[[], T], deadline_s: float | None = None) -> T:
        deadline = deadline_s or self._timeout_s
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), deadline + 1)
        except TimeoutError:
            raise EngineTimeoutError(
                f"Docker engine did not answer {what} within {deadline:.0f} s"
            ) from None
        except docker.errors.ImageNotFound as error:
            raise ImageMissingError(
                f"sandbox image missing ({error.explanation}); run `duckcell image build`"
            ) from None
        except (requests.exceptions.RequestException, docker.errors.DockerException) as error:
            if isinstance(error, docker.errors.APIError):
                raise BackendError(f"Docker engine refused {what}: {error.explanation}") from None
            if isinstance(error, requests.exceptions.ReadTimeout):
                raise EngineTimeoutError(f"Docker engine timed out on {what}") from None
            raise EngineUnavailableError(
                f"lost the Docker engine during {what} ({error}); {_ENGINE_HELP}"
            ) from None

    async def ping(self) -> None:
        await self._call("ping", lambda: self._api.ping())

    async def runtimes(self) -> dict[str, RuntimeRegistration]:
        """The engine's runtime registrations (``docker info``: name -> path, runtimeArgs)."""
        info = await self._call("info", lambda: self._api.info())
        return dict(info.get("Runtimes") or {})

    async def image_present(self, image: str) -> bool:
        try:
            await self._call("image inspect", lambda: self._api.inspect_image(image))
        except ImageMissingError:
            return False
        except BackendError as error:
            if "No such image" in str(error):
                return False
            raise
        return True

    def _socket_dir(self, name: str) -> Path:
        # Short names: a unix socket path must fit in 108 bytes.
        return self._run_dir / name.rsplit("-", 1)[-1]

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        socket_dir = self._socket_dir(spec.name)
        socket_dir.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(socket_dir, SANDBOX_UID, SANDBOX_UID)
        else:
            # The run dir above is 0700 and ours; inside it the runner's uid must write.
            os.chmod(socket_dir, 0o777)
        returned = threading.Event()
        state = threading.Lock()
        began = abandoned = False

        def create() -> str:
            nonlocal began
            with state:
                if abandoned:  # given up before the thread got to it: never call the engine
                    raise BackendError("create abandoned before it reached the engine")
                began = True
            try:
                return self._create(spec, socket_dir)
            finally:
                returned.set()

        try:
            container_id = await self._call("create", create)
        except BaseException:
            # A deadline or a cancel (a pool closing) stops the wait, not the engine call, which
            # may still create the container: let a call that began return first (within the
            # engine deadline), so that the removal by name comes after it, never before.
            with state:
                abandoned = True
                running = began
            if running:
                ended = asyncio.ensure_future(asyncio.to_thread(returned.wait, self._timeout_s))
                with contextlib.suppress(BaseException):
                    await asyncio.shield(ended)
            with contextlib.suppress(Exception):
                await self.remove_by_id(spec.name)
            remove_socket_dir(socket_dir)
            raise
        return SandboxHandle(container_id, spec.name, f"unix://{socket_dir / SOCKET_NAME}")

    def _create(self, spec: SandboxSpec, socket_dir: Path) -> str:
        created = self._api.create_container(
            **container_config(self._api, spec, socket_dir, self._paths)
        )
        return str(created["Id"])

    async def start(self, handle: SandboxHandle) -> None:
        await self._call("start", lambda: self._api.start(handle.container_id))

    async def seal(self, handle: SandboxHandle) -> None:
        await self._call("seal", lambda: seal_socket_dir(self._socket_dir(handle.name)))

    async def kill(self, handle: SandboxHandle) -> None:
        try:
            await self._call("kill", lambda: self._api.kill(handle.container_id))
        except BackendError as error:
            if "is not running" not in str(error) and "No such container" not in str(error):
                raise

    async def remove(self, handle: SandboxHandle) -> None:
        try:
            await self.remove_by_id(handle.container_id)
        finally:
            remove_socket_dir(self._socket_dir(handle.name))

    async def remove_by_id(self, container_id: str) -> None:
        try:
            await self._call(
                "remove",
                lambda: self._api.remove_container(container_id, force=True, v=True),
            )
        except BackendError as error:
            text = str(error)
            if "No such container" not in text and "already in progress" not in text:
                raise

    async def inspect(self, handle: SandboxHandle) -> ContainerState:
        try:
            info = await self._call(
                "inspect", lambda: self._api.inspect_container(handle.container_id)
            )
        except BackendError as error:
            if "No such container" in str(error):
                return ContainerState("missing", None, False)
            raise
        state = info.get("State", {})
        return ContainerState(
            status=str(state.get("Status", "unknown")),
            exit_code=state.get("ExitCode") if state.get("Status") != "running" else None,
            oom_killed=bool(state.get("OOMKilled")),
            error=str(state.get("Error") or ""),
        )

    async def logs(self, handle: SandboxHandle, tail: int = 20) -> str:
        try:
            raw = await self._call(
                "logs",
                lambda: self._api.logs(handle.container_id, tail=tail, stdout=True, stderr=True),
            )
        except BackendError:
            return ""
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        filters = {"label": [f"{key}={value}" for key, value in labels.items()]}
        found = await self._call("list", lambda: self._api.containers(all=True, filters=filters))
        return [
            ContainerInfo(
                container_id=str(item["Id"]),
                name=str(item.get("Names", ["?"])[0]).lstrip("/"),
                labels=dict(item.get("Labels") or {}),
            )
            for item in found
        ]

    async def container_mounts(self, container_id: str) -> list[EngineMount]:
        """The mounts of a container (the launcher's own, when it runs in one)."""
        info = await self._call("inspect", lambda: self._api.inspect_container(container_id))
        return [
            EngineMount(
                kind=str(mount.get("Type", "")),
                source=str(mount.get("Source", "")),
                destination=str(mount.get("Destination", "")),
                name=str(mount.get("Name", "")),
            )
            for mount in info.get("Mounts") or ()
        ]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def seal_socket_dir(directory: Path) -> None:
    """Take the sandbox's write access to its socket directory away, then check what is there.

    The runner creates its socket before any user SQL runs; from then on the sandbox has no
    reason to write there. Sealed (root's, 0555), the directory cannot grow (no files on the
    host's disk, no binaries to run) and the socket cannot be swapped for a link to another
    socket the launcher would dial. The check runs after the seal, so nothing changes under it:
    exactly one entry, the runner's socket, a socket and no link, owned by the sandbox user.
    """
    if os.geteuid() == 0:
        os.chown(directory, 0, 0)
    os.chmod(directory, 0o555)
    entries = sorted(os.listdir(directory))
    if entries != [SOCKET_NAME]:
        raise BackendError(
            f"the runner's socket directory {directory} holds {entries}, not just {SOCKET_NAME}; "
            "the sandbox is not used"
        )
    info = os.lstat(directory / SOCKET_NAME)
    if not stat.S_ISSOCK(info.st_mode) or (os.geteuid() == 0 and info.st_uid != SANDBOX_UID):
        raise BackendError(
            f"{directory / SOCKET_NAME} is not a socket made by the sandbox user (mode "
            f"{stat.filemode(info.st_mode)}, uid {info.st_uid}); the sandbox is not used"
        )


def remove_socket_dir(directory: Path) -> None:
    """Remove a sandbox's socket directory, sealed or not (a sealed one is read-only)."""
    with contextlib.suppress(OSError):
        os.chmod(directory, 0o700)
    shutil.rmtree(directory, ignore_errors=True)


def _ulimits(spec: SandboxSpec) -> list[docker.types.Ulimit]:
    # core 0:0: no core files, and the runner cannot raise the limit (runc hands out
    # [0, unlimited]); a core_pattern pipe helper on the host is handed 0 and stores nothing.
    limits = {"nofile": spec.nofile, "core": 0}
    if spec.nproc:
        limits["nproc"] = spec.nproc
    return [docker.types.Ulimit(name=name, soft=n, hard=n) for name, n in limits.items()]


def container_config(
    api: docker.APIClient,
    spec: SandboxSpec,
    socket_dir: Path,
    paths: EnginePaths = EnginePaths.SAME,
) -> dict[str, Any]:
    """The ``create_container`` arguments of a sandbox: every hardening flag lives here.
    Bind sources are the engine's paths (``paths``: a launcher in a container)."""
    binds = {paths.engine_path(str(socket_dir)): {"bind": RUNNER_DIR, "mode": "rw"}}
    if spec.files_dir:
        binds[paths.engine_path(spec.files_dir)] = {"bind": SANDBOX_FILES, "mode": "ro"}
    host_config = api.create_host_config(
        binds=binds,
        network_mode="none",
        read_only=True,
        tmpfs={
            "/scratch": f"rw,nosuid,nodev,noexec,size={spec.scratch_bytes},mode=1777",
            "/tmp": f"rw,nosuid,nodev,noexec,size={spec.tmp_bytes},mode=1777",
        },
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true", f"seccomp={profile_json()}"],
        pids_limit=spec.pids,
        mem_limit=spec.memory_bytes,
        memswap_limit=spec.memory_bytes,  # no swap: the limit is the limit
        nano_cpus=int(spec.cpus * 1e9),
        ulimits=_ulimits(spec),
        # No ICMP "ping" sockets: Docker opens them to every gid in the container's network
        # namespace ("0 2147483647"); "1 0" is the kernel's default, no group. (runsc ignores it.)
        sysctls={"net.ipv4.ping_group_range": "1 0"},
        runtime=spec.runtime,
        # Whatever the runner prints stays small on the host's disk: 1 MiB, one file.
        log_config=docker.types.LogConfig(type="json-file", config=LOG_OPTIONS),
        ipc_mode="private",
        auto_remove=False,
    )
    return {
        "image": spec.image,
        "name": spec.name,
        "user": spec.user,
        "environment": dict(spec.environment),
        "labels": dict(spec.labels),
        "host_config": host_config,
        "network_disabled": True,
        "detach": True,
    }
