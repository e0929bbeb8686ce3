"""A session sandbox's own window into the cache: the files its queries may read, and no others.

A per-query sandbox is locked to exactly its query's cached files (DuckDB ``allowed_paths``).
A session's sandbox serves many queries, and DuckDB's configuration is locked after the first
one, so it cannot be widened later. Instead each session sandbox is locked to one directory the
launcher alone writes, ``<cache root>/.sessions/<instance>/<slot>/`` (the sandbox sees it,
read-only like the rest of the cache, as ``/cache/.sessions/<instance>/<slot>/``). Before each
of the session's queries the launcher hard-links that query's leased cache entries into it and
binds the tables to the links; DuckDB refuses every other path, ``..`` traversal included
(``tests/integration/test_session_tables.py`` probes this against the real image).

Why hard links: the entries are on the same filesystem, a link costs no copy and cannot be
redirected the way a symlink could, and the sandbox needs no access to ``objects/``. The cost: a
linked entry the cache evicts keeps its blocks until the session's directory goes, so the cache
may exceed its budget by the files open sessions hold (``ObjectCache`` counts and evicts only
``objects/``; it never looks under ``.sessions``).

Directories are scoped by launcher instance, so a launcher removes at start only the leftovers
of instances that are no longer running (``remove_stale``), never a live sibling's.
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

from .catalog import Binding
from .errors import CacheError

log = logging.getLogger(__name__)

SESSIONS = ".sessions"
SANDBOX_CACHE = "/cache"  # where the cache root is mounted (read-only) in every sandbox
# The sandbox (another uid) may pass through the parents but not list them; it lists its own.
_PARENT_MODE = 0o711
_DIR_MODE = 0o755
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class SessionDir:
    """One session sandbox's directory, on the host (``host``) and as the sandbox sees it."""

    cache_root: Path
    host: Path
    sandbox: str

    @classmethod
    def for_slot(cls, cache_root: Path, instance_id: str, slot: str) -> SessionDir:
        if not (_NAME.fullmatch(instance_id) and _NAME.fullmatch(slot)):
            raise ValueError(f"bad session directory name {instance_id}/{slot}")
        return cls(
            cache_root,
            cache_root / SESSIONS / instance_id / slot,
            f"{SANDBOX_CACHE}/{SESSIONS}/{instance_id}/{slot}",
        )

    def create(self) -> None:
        """Make the directory (empty); raises CacheError if the cache root is unusable."""
        try:
            for parent in (self.host.parent.parent, self.host.parent):
                parent.mkdir(exist_ok=True)
                os.chmod(parent, _PARENT_MODE)
            shutil.rmtree(self.host, ignore_errors=True)
            self.host.mkdir(mode=_DIR_MODE)
            os.chmod(self.host, _DIR_MODE)
        except OSError as error:
            raise CacheError(
                f"cannot create the session directory {self.host} ({error.strerror}); the "
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

    def _link_one(self, sandbox_path: str) -> str:
        prefix = SANDBOX_CACHE + "/"
        relative = sandbox_path.removeprefix(prefix)
        if relative == sandbox_path or relative.startswith(SESSIONS + "/"):
            raise CacheError(f"table file {sandbox_path} is not a cache entry; cannot link it")
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
                f"cannot link cache entry {relative} into the session directory {self.host} "
                f"({error.strerror}); the session directory must be on the cache's filesystem"
            ) from None
        return f"{self.sandbox}/{name}"

    def remove(self) -> None:
        """Remove the directory and its links (the session has ended)."""
        shutil.rmtree(self.host, ignore_errors=True)


def remove_stale(cache_root: Path, alive: Callable[[str], bool]) -> list[str]:
    """Remove the session directories of launcher instances ``alive`` says are gone."""
    removed: list[str] = []
    try:
        instances = list(os.scandir(cache_root / SESSIONS))
    except FileNotFoundError:
        return removed
    for entry in instances:
        if alive(entry.name):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if os.path.lexists(entry.path):
            log.warning("could not remove stale session directory %s", entry.path)
            continue
        removed.append(entry.name)
    return removed
