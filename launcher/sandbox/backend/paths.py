"""Where the engine finds a directory the launcher names: the same path, unless the launcher
runs in a container of its own.

A sandbox's bind mounts (its runner-socket directory, its files directory) are resolved by the
Docker engine on the engine's host, not in the launcher's filesystem. A launcher on the host
needs nothing (``EnginePaths.SAME``). A launcher in a container that drives *sibling*
containers through the mounted engine socket must translate each path under one of its own
mounts to that mount's source on the host: ``EnginePaths`` holds those (inside, engine) prefix
pairs, and ``engine_path`` refuses a path under none of them, so a sandbox is never created
with a mount the engine would resolve to some unrelated host directory.

``launcher.worker.hostpaths`` builds the pairs (from an explicit setting or by inspecting the
launcher's own container); ``DockerBackend`` applies them when it creates a sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import ClassVar

from ...errors import BackendError


@dataclass(frozen=True, slots=True)
class EngineMount:
    """One mount of a container as the engine reports it (``docker inspect``'s ``Mounts``)."""

    kind: str  # bind | volume | tmpfs | npipe
    source: str  # the engine host's path (a volume's: its _data directory)
    destination: str  # where the container sees it
    name: str = ""  # a volume's name


@dataclass(frozen=True, slots=True)
class EnginePaths:
    """(inside, engine) prefix pairs; empty means the engine sees the launcher's paths."""

    pairs: tuple[tuple[str, str], ...] = ()
    SAME: ClassVar[EnginePaths]

    def engine_path(self, path: str) -> str:
        """``path`` as the engine sees it; raises BackendError when no pair covers it."""
        if not self.pairs:
            return path
        inside = PurePosixPath(path)
        best: tuple[PurePosixPath, str] | None = None
        for prefix, engine in self.pairs:
            root = PurePosixPath(prefix)
            if (inside == root or root in inside.parents) and (
                best is None or len(root.parts) > len(best[0].parts)
            ):
                best = (root, engine)
        if best is None:
            raise BackendError(
                f"cannot place a sandbox mount: {path} is under none of the directories whose "
                f"host path is known ({', '.join(p for p, _ in self.pairs)})"
            )
        root, engine = best
        return str(PurePosixPath(engine) / inside.relative_to(root))

    def describe(self) -> str:
        return ", ".join(f"{inside} -> {engine}" for inside, engine in self.pairs) or "same"


EnginePaths.SAME = EnginePaths()
