"""A document in the data directory, watched: reloaded when its file changes, the last good
version kept when a new one fails to load.

The catalog (``catalogs.CatalogWatcher``) and the policies (``policies.PolicyWatcher``) are
both applied by admin commands that may run in another process, even on another host sharing
the data directory, so the server polls: one ``stat`` a second is cheap and needs nothing from
the command. A changed file is loaded; a document that fails to load is logged and ignored;
a new revision is handed to ``on_change``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class Revisioned(Protocol):
    @property
    def revision(self) -> str: ...


D = TypeVar("D", bound=Revisioned)


class FileWatcher(Generic[D]):
    """Holds ``current``, the last good document of ``path``; ``run`` polls, ``check`` looks
    once. ``load`` reads the document (raising one of ``errors`` when it is bad); ``what``
    names it in the log."""

    def __init__(
        self,
        path: Path,
        load: Callable[[], D],
        on_change: Callable[[D], object],
        *,
        what: str,
        errors: tuple[type[Exception], ...],
        interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self._path = path
        self._load = load
        self._on_change = on_change
        self._what = what
        self._errors = errors
        self._interval_s = interval_s
        self._seen = self._stamp()
        self.current: D = load()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def check(self) -> bool:
        """Reload if the file changed; True when a new revision took effect."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        try:
            document = self._load()
        except self._errors as error:
            log.error(
                "%s not reloaded, keeping revision %s: %s",
                self._what,
                self.current.revision,
                error,
            )
            return False
        if document.revision == self.current.revision:
            return False
        log.info("%s revision %s -> %s", self._what, self.current.revision, document.revision)
        self.current = document
        self._on_change(document)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.check()
