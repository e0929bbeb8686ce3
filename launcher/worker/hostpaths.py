"""Where the engine sees a containerized worker's state and cache (``--host-paths``).

A worker in a container drives *sibling* sandbox containers through the engine socket mounted
into it; the engine resolves the sandboxes' bind mounts (runner sockets under ``STATE/run``,
files directories under the cache) on its own host. ``resolve_host_paths`` finds, for each of
those two directories, the host path the engine knows it by:

- ``none`` (the default): the worker runs on the engine's host; paths are the same.
- ``INSIDE=HOST[,INSIDE=HOST...]``: given by the operator (a bind mount whose source the
  container cannot see, a remote engine).
- ``auto``: the worker inspects its own container (its id is in ``/proc/self/mountinfo``) and
  takes the source of the mount holding each directory: a bind mount's host directory or a
  named volume's ``_data`` directory, both as the engine sees them.

A directory on no mount (it would live in the container's own writable layer, which the
engine cannot bind into a sibling) or on a tmpfs is refused with a one-line error naming it
and the mount to add; the worker then does not start rather than place sandboxes wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from ..errors import DuckcellError
from ..sandbox.backend.docker_engine import DockerBackend
from ..sandbox.backend.paths import EngineMount, EnginePaths

MOUNTINFO = Path("/proc/self/mountinfo")
# Docker bind-mounts these three files of the container's own directory into it; rootless
# engines keep the same layout under the user's data root.
_OWN_ID = re.compile(r"/containers/([0-9a-f]{64})/(?:hostname|hosts|resolv\.conf)\s")
_PLACEABLE = ("bind", "volume")


class HostPathsError(DuckcellError):
    """The worker cannot tell where the engine sees its state or cache: it does not start."""


def parse_host_paths(text: str) -> tuple[tuple[str, str], ...] | None:
    """``none`` -> (), ``auto`` -> None (inspect), else the ``INSIDE=HOST`` pairs."""
    text = text.strip()
    if text in ("", "none"):
        return ()
    if text == "auto":
        return None
    pairs = []
    for item in text.split(","):
        inside, eq, host = item.strip().partition("=")
        if not eq or not inside.startswith("/") or not host.startswith("/"):
            raise HostPathsError(
                f"--host-paths / DUCKCELL_HOST_PATHS: {item.strip()!r} is not INSIDE=HOST with "
                "two absolute paths; use `auto`, `none` or /var/lib/duckcell=/srv/duckcell"
            )
        pairs.append((str(PurePosixPath(inside)), str(PurePosixPath(host))))
    return tuple(pairs)


def own_container_id(mountinfo: str) -> str | None:
    """This process's container id, read from its mount table; None outside a container."""
    match = _OWN_ID.search(mountinfo)
    return match[1] if match else None


def place(needed: Mapping[str, Path], mounts: Iterable[EngineMount]) -> EnginePaths:
    """For each named directory, the mount holding it (the deepest), as an (inside, engine)
    pair; raises HostPathsError naming the first directory no bind or volume holds."""
    mounts = list(mounts)
    pairs: dict[str, str] = {}
    for what, directory in needed.items():
        path = PurePosixPath(directory)
        holding = [
            m
            for m in mounts
            if path == PurePosixPath(m.destination) or PurePosixPath(m.destination) in path.parents
        ]
        if not holding:
            raise HostPathsError(
                f"cannot place sandboxes: the {what} {directory} is on no mount of this "
                f"container, so the engine cannot bind it into a sandbox; mount a named volume "
                f"or a host directory at {directory} (docker-compose.yml does), or set "
                f"DUCKCELL_HOST_PATHS={directory}=HOST_PATH"
            )
        mount = max(holding, key=lambda m: len(PurePosixPath(m.destination).parts))
        if mount.kind not in _PLACEABLE or not mount.source:
            raise HostPathsError(
                f"cannot place sandboxes: the {what} {directory} is on a {mount.kind or '?'} "
                f"mount at {mount.destination}, which the engine cannot bind into a sandbox; "
                "use a named volume or a host directory there"
            )
        pairs[mount.destination] = mount.source
    return EnginePaths(tuple(sorted(pairs.items())))


async def resolve_host_paths(
    setting: str, needed: Mapping[str, Path], backend: DockerBackend, mountinfo: str
) -> EnginePaths:
    """The engine's view of ``needed`` (e.g. {"state directory": ..., "cache": ...})."""
    given = parse_host_paths(setting)
    if given is not None:
        explicit = EnginePaths(given)
        for what, directory in needed.items():  # refused at start, not at the first query
            try:
                explicit.engine_path(str(directory))
            except DuckcellError:
                raise HostPathsError(
                    f"--host-paths: the {what} {directory} is under none of the INSIDE paths "
                    f"given ({explicit.describe()}); add {directory}=HOST_PATH"
                ) from None
        return explicit
    container = own_container_id(mountinfo)
    if container is None:
        raise HostPathsError(
            "--host-paths auto: this process is not in a Docker container (no container id in "
            f"{MOUNTINFO}); use `none` on the engine's host, or INSIDE=HOST pairs"
        )
    try:
        mounts = await backend.container_mounts(container)
    except DuckcellError as error:
        raise HostPathsError(
            f"--host-paths auto: cannot inspect this container ({container[:12]}) through the "
            f"engine: {error}"
        ) from None
    return place(needed, mounts)
