"""This launcher process's identity on the host, and the removal of orphans left by a crash.

Each running launcher holds an exclusive ``flock`` on ``instances/<id>.lock`` for its whole
life and labels its sandboxes with that id. The kernel drops the lock when the process dies,
however it dies, so on start a launcher can tell a crashed sibling's sandboxes (lock free)
from a live sibling's (lock held) and remove only the former.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import DuckcellError
from ..filelock import lock_held
from .backend.base import LABEL_INSTANCE, LABEL_LAUNCHER, SandboxBackend

log = logging.getLogger(__name__)


class InstanceLock:
    def __init__(self, instances_dir: Path) -> None:
        instances_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.instance_id = uuid.uuid4().hex[:16]
        self.path = instances_dir / f"{self.instance_id}.lock"
        # Lock under a temporary name, then rename: a file with the final name is always
        # already locked, so a sibling's reaper can never take it for a dead launcher's.
        pending = instances_dir / f".{self.instance_id}.pending"
        self._fd = os.open(pending, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._fd, str(os.getpid()).encode())
        os.rename(pending, self.path)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self._fd)


def instance_alive(instances_dir: Path, instance_id: str) -> bool:
    """True while the launcher that owns ``instance_id`` still holds its lock."""
    try:
        return lock_held(instances_dir / f"{instance_id}.lock")
    except OSError as error:  # not ours to read: keep what it owns rather than reap it
        log.warning(
            "cannot tell whether launcher %s is alive (%s); keeping its sandboxes",
            instance_id,
            error.strerror or error,
        )
        return True


@dataclass(frozen=True, slots=True)
class ReapReport:
    removed: tuple[str, ...]
    kept_live: int


async def reap_orphans(
    backend: SandboxBackend,
    *,
    launcher_id: str,
    instances_dir: Path,
    run_dir: Path,
    own_instance: str | None,
) -> ReapReport:
    """Remove this launcher's sandboxes whose owning process is gone, and their sockets."""
    found = await backend.list({LABEL_LAUNCHER: launcher_id})
    removed: list[str] = []
    kept = 0
    for info in found:
        owner = info.labels.get(LABEL_INSTANCE, "")
        if owner == own_instance or (owner and instance_alive(instances_dir, owner)):
            kept += 1
            continue
        try:
            await backend.remove_by_id(info.container_id)
        except DuckcellError as error:
            log.warning("could not remove orphan sandbox %s: %s", info.name, error)
            continue
        removed.append(info.name)
        socket_dir = run_dir / info.name.rsplit("-", 1)[-1]
        with contextlib.suppress(OSError):
            os.chmod(socket_dir, 0o700)  # a sealed one is read-only (backend.docker_engine)
        shutil.rmtree(socket_dir, ignore_errors=True)
    # Locks of launchers that died with no sandbox left are swept too.
    for lock in instances_dir.glob("*.lock"):
        if lock.stem != own_instance and not instance_alive(instances_dir, lock.stem):
            with contextlib.suppress(OSError):
                lock.unlink()
    return ReapReport(tuple(removed), kept)
