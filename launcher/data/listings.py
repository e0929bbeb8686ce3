"""Recent object listings of catalog tables, reused for at most their connection's TTL.

Listing a table (one S3 LIST per table and query) is what a warm query pays on the host before
its sandbox runs: 5-25 ms against a loopback S3 server, tens of milliseconds against AWS. A
connection may opt in to reusing a listing for ``listing_ttl`` seconds (catalog key
``connections.NAME.listing_ttl``; the default, 0, lists on every query). What that trades away,
and how little:

- **Freshness, bounded.** For up to the TTL after a listing, a query may read the objects as
  they were listed: an object added, replaced (new ETag) or removed by another writer is seen
  only when the listing expires. Within that window a replaced object's old version is read
  from the cache if it is still there; it is never mixed with the new one inside one table.
- **Read-your-writes through this worker.** A write this worker uploads (``COPY ... TO``, see
  ``launcher.data.writes``) drops every cached listing of its connection whose path overlaps the
  written object, so the next query lists again.
- **A listing proven stale is dropped.** When an object it names cannot be downloaded any more
  (changed or deleted), the caller drops the listing and lists again (``DataPath``).

Every listing is kept, whatever the TTL, as the *last known* listing of its table (``last``):
a query may start early on it while a fresh LIST runs, its results held back until that LIST
proves the listing unchanged (``DataPath.prepare(..., early=True)``). That trades nothing away:
a listing that changed costs a second run, never a stale answer.

Each entry remembers when its LIST *started*, so the TTL is never stretched by a slow LIST, and
a drop that happens while a LIST is in flight wins: that listing is not stored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .objectstore import ObjectRef


@dataclass(frozen=True, slots=True)
class _Listing:
    refs: tuple[ObjectRef, ...]
    listed_at: float  # the clock when the LIST started


class ListingCache:
    """Listings keyed by (connection name, table path); safe to share between queries.

    ``clock`` is monotonic seconds; tests hand in their own.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._listings: dict[tuple[str, str], _Listing] = {}
        self._generation = 0  # bumped by every drop: a LIST started before it is not stored

    def get(self, connection: str, path: str, ttl: float) -> list[ObjectRef] | None:
        """The listing of ``path`` if one was started less than ``ttl`` seconds ago."""
        if ttl <= 0:
            return None
        with self._lock:
            listing = self._listings.get((connection, path))
            if listing is None:
                return None
            if self._clock() - listing.listed_at >= ttl:
                return None  # kept as the last known listing (``last``)
            return list(listing.refs)

    def last(self, connection: str, path: str) -> list[ObjectRef] | None:
        """The last listing of ``path`` stored, however old; only to start early on."""
        with self._lock:
            listing = self._listings.get((connection, path))
            return None if listing is None else list(listing.refs)

    def start(self) -> tuple[float, int]:
        """A token for a LIST about to start; hand it back to ``put`` with its result."""
        with self._lock:
            return self._clock(), self._generation

    def put(
        self, connection: str, path: str, refs: list[ObjectRef], started: tuple[float, int]
    ) -> None:
        """Keep a finished listing, unless a drop happened since its LIST started."""
        listed_at, generation = started
        with self._lock:
            if generation == self._generation:
                self._listings[(connection, path)] = _Listing(tuple(refs), listed_at)

    def drop(self, connection: str, path: str) -> None:
        """Forget the listing of one table path (it named an object that is gone)."""
        with self._lock:
            self._generation += 1
            self._listings.pop((connection, path), None)

    def drop_overlapping(self, connection: str, url: str) -> None:
        """Forget every listing of ``connection`` whose path holds ``url`` or lies under it:
        an object was just written there."""
        with self._lock:
            self._generation += 1
            for key in [k for k in self._listings if k[0] == connection]:
                if url.startswith(key[1]) or key[1].startswith(url):
                    del self._listings[key]

    def clear(self) -> None:
        with self._lock:
            self._generation += 1
            self._listings.clear()
