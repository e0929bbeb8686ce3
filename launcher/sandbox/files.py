"""A sandbox's own window into the cache: the files its queries may read, and no others.

No sandbox sees the cache. Each one (per-query or session) gets a directory of its own,
``<cache root>/.sandboxes/<instance>/<slot>/``, created empty before its container and bound
read-only at ``/cache/files``: the only cache path the container has (``/cache`` itself is an
empty directory of the image, kept so the runner's path rules stay as they were). Before each
query the launcher hard-links that query's leased cache entries into it and binds the tables
to the links, so a compromised runner, whatever DuckDB lets it do, can open only the files of
the query (or session) it serves: the kernel's mount namespace refuses the rest, not DuckDB.
DuckDB's own file locks stay on top (a per-query runner allows exactly its first query's
files, a session's runner its directory). ``tests/integration/test_containment.py`` probes
this from inside a sandbox.

Why hard links: the entries are on the same filesystem, a link costs no copy and cannot be
redirected the way a symlink could, and a bind mount of the whole cache (read-only or not)
would show every tenant's files. The cost: a linked entry the cache evicts keeps its blocks
until the sandbox's directory goes (with the sandbox), so the cache may exceed its budget by
the files live sandboxes hold (``ObjectCache`` counts and evicts only ``objects/``).

The directory is the launcher's (root's) with group ``nogroup`` and mode 0750 when the launcher
runs as root, so the sandbox user may list and read it but nobody else on the host may; the
cache's own directories are 0700. Directories are scoped by launcher instance, so a launcher
removes at start only the leftovers of instances that are no longer running
(``remove_stale``), never a live sibling's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CacheError
from ..model.catalog import Binding
from ..model.mounts import SANDBOX_CACHE, SANDBOX_GID
from .backend.base import SANDBOX_FILES

log = logging.getLogger(__name__)

SANDBOXES = ".sandboxes"
_LEGACY = ".sessions"  # where sessions' directories lived before every sandbox had one
_PARENT_MODE = 0o700  # only the launcher passes through; the engine mounts as root
_DIR_MODE_ROOT = 0o750  # root:nogroup: the sandbox user lists and reads, others nothing
_DIR_MODE_USER = 0o755  # a launcher that is not root cannot give the directory to nogroup
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class SandboxFiles:
    """One sandbox's directory on the host (``host``); the sandbox sees it at ``sandbox``."""

    cache_root: Path
    host: Path
    sandbox: str = SANDBOX_FILES

    @classmethod
    def for_slot(cls, cache_root: Path, instance_id: str, slot: str) -> SandboxFiles:
        if not (_NAME.fullmatch(instance_id) and _NAME.fullmatch(slot)):
            raise ValueError(f"bad sandbox directory name {instance_id}/{slot}")
        return cls(cache_root, cache_root / SANDBOXES / instance_id / slot)

    def create(self) -> None:
        """Make the directory (empty); raises CacheError if the cache root is unusable."""
        try:
            for parent in (self.host.parent.parent, self.host.parent):
                parent.mkdir(exist_ok=True)
                os.chmod(parent, _PARENT_MODE)
            shutil.rmtree(self.host, ignore_errors=True)
            self.host.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(self.host, 0, SANDBOX_GID)
                os.chmod(self.host, _DIR_MODE_ROOT)
            else:
                os.chmod(self.host, _DIR_MODE_USER)
        except OSError as error:
            raise CacheError(
                f"cannot create the sandbox directory {self.host} ({error.strerror}); the "
                "launcher must be able to write under its cache directory"
            ) from None

    def link(self, bindings: Sequence[Binding]) -> tuple[Binding, ...]:
        """Hard-link every bound cache entry into this directory; the bindings, re-pointed.

        The entries must be leased (so they exist) while this runs. An entry is linked under its
        own name (which names the object and its ETag): a name already here is reused when it
        is the same file, else replaced atomically (the cache fetched that entry again).
        Raises CacheError when a link cannot be made.
        """
        return tuple(
            Binding(b.name, b.format, tuple(self._link_one(path) for path in b.paths))
            for b in bindings
        )

    def _link_one(self, cache_path: str) -> str:
        prefix = SANDBOX_CACHE + "/"
        relative = cache_path.removeprefix(prefix)
        if relative == cache_path or not relative.startswith("objects/") or ".." in relative:
            raise CacheError(f"table file {cache_path} is not a cache entry; cannot link it")
        source = self.cache_root / relative
        name = source.name
        target = self.host / name
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.path.samefile(source, target):
                    return f"{self.sandbox}/{name}"
            pending = self.host / f".link-{uuid.uuid4().hex}-{name}"
            os.link(source, pending, follow_symlinks=False)
            os.replace(pending, target)
        except OSError as error:
            raise CacheError(
                f"cannot link cache entry {relative} into the sandbox directory {self.host} "
                f"({error.strerror}); the sandbox directory must be on the cache's filesystem"
            ) from None
        return f"{self.sandbox}/{name}"

    def remove(self) -> None:
        """Remove the directory and its links (the sandbox is gone)."""
        shutil.rmtree(self.host, ignore_errors=True)


def remove_stale(cache_root: Path, alive: Callable[[str], bool]) -> list[str]:
    """Remove the sandbox directories of launcher instances ``alive`` says are gone."""
    removed: list[str] = []
    shutil.rmtree(cache_root / _LEGACY, ignore_errors=True)  # nothing mounts it any more
    try:
        instances = list(os.scandir(cache_root / SANDBOXES))
    except FileNotFoundError:
        return removed
    for entry in instances:
        if alive(entry.name):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if os.path.lexists(entry.path):
            log.warning("could not remove stale sandbox directory %s", entry.path)
            continue
        removed.append(entry.name)
    return removed
