"""The host's object cache: files a query reads, fetched once, shared read-only with sandboxes.

``ObjectCache.lease`` makes sure every object a query needs is present and checked, and pins it
until the lease is released. The launcher is the only writer; sandboxes see the root mounted
read-only links to the entries in a directory of their own (``launcher.sandbox.files``).

How the guarantees are kept (layout and index: ``cache_index``; locks, pins, checksums:
``cache_files``):

- **No partial entry is ever visible.** A download goes to ``.partial-<uuid>-<name>`` in the
  entry's directory; its size is checked, its sha256 computed (one read of the file just
  written, from the page cache, so the store seam stays ``download(ref, dest)``) and recorded,
  it is fsynced, then moved into place with ``os.replace``. A failed or cancelled download
  removes its partial file; a crashed process's leftovers go when the next ``ObjectCache``
  opens the root.
- **One download per object**, even with many concurrent leases: within a process the first
  caller's fetch is an asyncio task the others await; across processes the fetch holds an
  exclusive ``flock`` on the entry's lock file, so a second process waits, then finds the file.
- **Pins work across processes.** A lease holds a shared ``flock`` on each entry's pin file
  (``locks/ab/<name>.pin``, never the entry itself: a sandbox could lock that inode through its
  link and stall every lease of it); eviction removes an entry only under an exclusive
  ``LOCK_NB`` lock on the pin file, so it skips anything a running query (in any launcher
  process on the host) uses. Everything pinned means the cache
  may stay over budget for a while (``stats().over_budget`` says so): a lease that downloaded
  evicts at once, and every lease's release asks the cache's upkeep thread for another pass,
  so the cache is back under budget right after the query that overflowed it lets go.
- **Integrity.** Every lease compares the file's size with the index (cheap, catches truncation,
  which triggers a new fetch). The first time a process leases an entry it also compares the
  file's sha256 with the index (``check_first_use``), and again whenever the file's inode, size
  or mtime changed since: a damaged or same-size-changed file is dropped and fetched again
  before any query sees it. That costs one read of the file (sha256 of 100 MB: ~0.1 s from the
  page cache, ~0.27 s from disk, on one core of the test host) once per entry per process; a
  download is hashed as it is published and never again by its process. ``suspect`` re-hashes
  entries DuckDB failed to read and drops the damaged ones, for damage after that first check.
  ``verify`` re-hashes every entry and reports those whose file is gone, including rows dropped
  when this object opened the root. A new ETag is a new entry name.

Blocking file and SQLite work (hashing, fsync, pinning, eviction, the index) runs in worker
threads; only non-blocking ``flock`` attempts and single-file metadata calls (mkdir, unlink)
run on the loop, and a release only closes descriptors and hands eviction to the upkeep thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from types import TracebackType

from ..atomic import fsync_directory
from ..errors import CacheError, first_domain_error
from .cache_files import (
    OPEN_FLAGS,
    EntryLock,
    FileKey,
    check_entry,
    check_file,
    file_key,
    is_pinned,
    make_dir,
    own_entry,
    pin,
    raise_open_file_limit,
    sha256_of,
    shard_dir,
    unlink_unpinned,
)
from .cache_index import (
    PARTIAL_PREFIX,
    CacheIndex,
    CacheStats,
    EvictReport,
    FirstUseChecks,
    IndexRow,
    VerifyProblem,
    VerifyReport,
    entry_name,
    partial_entry,
    relative_path,
)
from .objectstore import ObjectRef, ObjectStore

__all__ = [
    "CacheLease",
    "CacheStats",
    "EvictReport",
    "ObjectCache",
    "VerifyProblem",
    "VerifyReport",
]

_PIN_ATTEMPTS = 3  # fetch-then-pin rounds before an entry counts as broken
_LOCK_POLL_S = (0.01, 0.2)  # first and longest wait between attempts on a busy entry lock
_MISSING_AT_OPEN = "missing (its index entry was dropped when the cache was opened)"

log = logging.getLogger(__name__)


class CacheLease:
    """Pins entries for one query; ``paths`` are relative to the cache root, in refs order.

    Each pinned entry is an open descriptor of its pin file holding a shared ``flock``. Release
    (or leave the ``async with``) as soon as the query ends; releasing twice is harmless.
    Release never blocks: it only queues an eviction pass on the cache's upkeep thread.
    """

    def __init__(self, paths: list[str], fds: list[int], cache: ObjectCache | None = None) -> None:
        self.paths = paths
        self._fds = fds
        self._cache = cache

    def release(self) -> None:
        if self._close() and self._cache is not None:
            self._cache._released()

    async def suspect(self, error: str) -> list[str]:
        """``ObjectCache.suspect`` for this lease's entries (before or after its release)."""
        return [] if self._cache is None else await self._cache.suspect(self.paths, error)

    def _close(self) -> bool:
        """Let go of the pins; True if there were any."""
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        return bool(fds)

    async def __aenter__(self) -> CacheLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A lost lease must not pin its entries for the life of the process. No eviction pass
        # from here: the garbage collector may run this anywhere, even inside our own locks.
        self._close()


class ObjectCache:
    """The cache directory at ``root``: lease, suspect, stats, evict, verify.

    Raises ``CacheError`` when the directory or an entry is unusable and passes the store's
    ``ObjectStoreError`` through. Several ``ObjectCache`` objects (in one or many processes) may
    share a root. ``check_first_use=False`` skips the sha256 of an entry's first lease in this
    process (see the module docstring for its cost); sizes are checked on every lease anyway.
    """

    def __init__(
        self,
        root: Path,
        *,
        budget_bytes: int,
        max_parallel_downloads: int = 4,
        check_first_use: bool = True,
    ) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.check_first_use = check_first_use
        self._objects = root / "objects"
        self._locks = root / "locks"
        try:
            # Private: no sandbox mounts the cache (each reads links in a directory of its own,
            # launcher.sandbox.files), and no other host user needs it.
            make_dir(root, 0o700)
            make_dir(self._objects, 0o700)
            make_dir(self._locks, 0o700)
        except OSError as error:
            raise CacheError(
                f"cannot use {root} as the cache directory ({error.strerror}); check that it "
                "is a writable directory (--cache-dir / DUCKCELL_CACHE_DIR)"
            ) from None
        self._index = CacheIndex(root / "index.db")
        self._inflight: dict[str, asyncio.Task[bool]] = {}
        self._max_parallel = max_parallel_downloads
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._evicting = threading.Lock()
        self._checked = FirstUseChecks()
        # Eviction after a release runs here, one pass at a time; a release while a pass is
        # queued or running only asks for one more (``_evict_wanted``).
        self._upkeep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-upkeep")
        self._upkeep_state = threading.Lock()
        self._evict_wanted = self._evict_queued = False
        # Index rows whose file was gone when this object opened the root: ``_reconcile``
        # drops them (so leases and stats stay right), ``verify`` reports them once.
        self._missing_at_open: list[str] = []
        raise_open_file_limit()
        try:
            self._reconcile()
        except OSError as error:
            raise CacheError(
                f"cannot tidy the cache directory {root} ({error.strerror}); check its owner "
                "and permissions: the launcher must be able to write everything under it"
            ) from None

    # ---- leasing ---------------------------------------------------------------------------

    async def lease(self, store: ObjectStore, refs: Sequence[ObjectRef]) -> CacheLease:
        """Fetch what is missing or damaged, pin every entry, and return the lease.

        Raises ``ObjectStoreError`` from the store (nothing stays pinned then) or ``CacheError``.
        """
        for ref in refs:
            if ref.source != store.source:
                raise CacheError(
                    f"object {ref.key!r} was listed from {ref.source!r}, not from this store "
                    f"({store.source!r}); list the table through the same connection"
                )
        names = [entry_name(ref) for ref in refs]
        fds = await _owning_fds(lambda: self._pin_all(names, refs))
        tasks: list[asyncio.Task[bool]] = []
        try:
            async with asyncio.TaskGroup() as group:
                for i in (i for i, fd in enumerate(fds) if fd is None):
                    tasks.append(group.create_task(self._fetch_and_pin(store, refs[i], fds, i)))
        except BaseException as error:
            _close_all(fds)
            raise first_domain_error(error) from None
        lease = CacheLease(
            [relative_path(n) for n in names], [fd for fd in fds if fd is not None], self
        )
        if any(task.result() for task in tasks):
            try:
                await asyncio.to_thread(self.evict)  # over budget after downloading?
            except BaseException:
                lease.release()
                raise
        return lease

    def _pin_all(self, names: list[str], refs: Sequence[ObjectRef]) -> list[int | None]:
        """The first, cheap pass: pin every entry already good; None marks a miss.

        On any error the entries pinned so far are let go (a lost pin would keep its entry
        from eviction and repair for as long as this process lives)."""
        fds: list[int | None] = []
        try:
            for name, ref in zip(names, refs, strict=True):
                fds.append(self._try_pin(name, ref))
            misses = fds.count(None)
            self._index.count(hits=len(fds) - misses, misses=misses)
        except BaseException:
            _close_all(fds)
            raise
        return fds

    async def _fetch_and_pin(
        self, store: ObjectStore, ref: ObjectRef, fds: list[int | None], index: int
    ) -> bool:
        """Fetch (single flight), then pin into ``fds[index]``; True if anything was downloaded.

        A few rounds, because another process may evict the fresh entry before we pin it.
        """
        name = entry_name(ref)
        downloaded = False
        for _ in range(_PIN_ATTEMPTS):
            downloaded |= await self._fetch(store, ref, name)
            fds[index] = (await _owning_fds(lambda: [self._try_pin(name, ref)]))[0]
            if fds[index] is not None:
                return downloaded
        raise CacheError(
            f"cache entry {relative_path(name)} for {ref.key!r} failed its size check after "
            f"{_PIN_ATTEMPTS} fetches; check the disk under {self.root}, then run "
            "`duckcell cache verify --repair`"
        )

    def _try_pin(self, name: str, ref: ObjectRef) -> int | None:
        """An fd pinning a good entry (``pin``: a shared lock on its pin file, never on the
        entry, which sandboxes can open through their links), or None when it must be fetched
        (again)."""
        row = self._index.get(name)
        if row is None or row.size != ref.size:
            return None
        path = self._entry_path(name)
        pinned = pin(self._pin_path(name))
        try:
            good = self._good_entry(name, ref, row, path)
        except BaseException:
            os.close(pinned)
            raise
        if not good:
            os.close(pinned)
            return None
        return pinned

    def _good_entry(self, name: str, ref: ObjectRef, row: IndexRow, path: Path) -> bool:
        """Whether the (pinned) entry file is the one the index describes, checked."""
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ELOOP):
                return False
            raise CacheError(f"cannot open cache entry {path} ({error.strerror})") from None
        try:
            info = os.fstat(fd)
            good = info.st_size == row.size
            if good and self.check_first_use:
                good = self._intact(name, ref, row, fd, file_key(info))
        finally:
            os.close(fd)
        if good:
            self._index.touch(name)
        return good

    def _intact(self, name: str, ref: ObjectRef, row: IndexRow, fd: int, key: FileKey) -> bool:
        """The first-use check: sha256 of the pinned file against the index, unless this process
        already hashed this very file (same inode, size and mtime). A damaged entry is dropped
        here, so the caller's fetch downloads it again."""
        with self._checked.turn(name):
            if self._checked.knows(name, key):
                return True
            try:
                problem = "sha256 mismatch" if sha256_of(fd) != row.sha256 else None
            except OSError as error:  # EIO: the disk under it is failing
                problem = f"unreadable ({error.strerror})"
            if problem is None:
                self._checked.remember(name, key)
                self._index.count(verified=1)
                return True
        log.warning(
            "cache entry %s for %r failed its first-use check (%s); fetching it again",
            relative_path(name),
            ref.key,
            problem,
        )
        self._drop_damaged(name, key)
        return False

    async def _fetch(self, store: ObjectStore, ref: ObjectRef, name: str) -> bool:
        """Make entry ``name`` good; True if this call's task downloaded it.

        Concurrent callers in this process share one task; it is shielded so a cancelled
        caller does not cancel the download the others are waiting for.
        """
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.ensure_future(self._fetch_locked(store, ref, name))
            self._inflight[name] = task
            task.add_done_callback(lambda done: self._forget(name, done))
        return await asyncio.shield(task)

    def _forget(self, name: str, task: asyncio.Task[bool]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]
        if not task.cancelled():
            task.exception()  # retrieved here: waiters may all have been cancelled

    async def _fetch_locked(self, store: ObjectStore, ref: ObjectRef, name: str) -> bool:
        """Under the entry's cross-process lock: download unless someone else just did."""
        lock = EntryLock(self._lock_path(name))
        delay = _LOCK_POLL_S[0]
        # Polling with LOCK_NB instead of a blocking flock in a thread: cancellable, and a
        # waiter holds no thread while another process downloads.
        while not lock.try_acquire():
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LOCK_POLL_S[1])
        try:
            if await asyncio.to_thread(self._entry_good, name, ref):
                return False
            async with self._download_slots():
                await self._download(store, ref, name)
            return True
        finally:
            lock.release()

    def _download_slots(self) -> asyncio.Semaphore:
        """Bounds downloads in flight. One per event loop: asyncio primitives bind to the loop
        that first waits on them, and a CLI may run one loop per command."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self._max_parallel))
        return self._slots[1]

    async def _download(self, store: ObjectStore, ref: ObjectRef, name: str) -> None:
        shard = self._entry_path(name).parent
        partial = shard / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            await store.download(ref, partial)
            await asyncio.to_thread(self._publish, partial, name, ref)
        except OSError as error:  # the cache's disk, not the store: full, read-only, gone
            raise CacheError(
                f"cannot write {ref.key!r} into the cache at {self.root} ({error.strerror}); "
                "free space there or lower the cache budget"
            ) from None
        finally:
            partial.unlink(missing_ok=True)

    def _publish(self, partial: Path, name: str, ref: ObjectRef) -> None:
        """Check, hash, fsync and rename a finished download into place, then index it."""
        fd = os.open(partial, OPEN_FLAGS)
        try:
            size = os.fstat(fd).st_size
            if size != ref.size:
                raise CacheError(
                    f"download of {ref.key!r} wrote {size} bytes, the listing said {ref.size}; "
                    "run the query again"
                )
            digest = sha256_of(fd)
            own_entry(fd)  # the sandbox user reads it through a link in its own directory
            os.fsync(fd)
            key = file_key(os.fstat(fd))
        finally:
            os.close(fd)
        os.replace(partial, self._entry_path(name))
        fsync_directory(partial.parent)
        self._index.put(name, ref, size, digest)
        self._checked.remember(name, key)  # just hashed: its first use needs no second read
        self._index.count(downloads=1)

    def _entry_good(self, name: str, ref: ObjectRef) -> bool:
        """The cheap check, without pinning: indexed, regular file, sizes agree."""
        row = self._index.get(name)
        try:
            info = os.stat(self._entry_path(name), follow_symlinks=False)
        except FileNotFoundError:
            return False
        regular = stat.S_ISREG(info.st_mode)
        return row is not None and regular and row.size == ref.size == info.st_size

    # ---- damage found in use ----------------------------------------------------------------

    async def suspect(self, paths: Sequence[str], error: str | None = None) -> list[str]:
        """DuckDB could not read some of a query's entries: check them now, drop damaged ones.

        ``paths`` are the query's ``CacheLease.paths`` (or entry names, or the sandbox's paths
        to its links: only the file name counts). With ``error`` (DuckDB's message), only the
        entries it names are checked; an error naming none (a syntax error, say) checks
        nothing and costs nothing. Each checked entry is re-hashed even if this process checked
        it before; a damaged one is removed (even while leased: running queries read their own
        links to it) so the next lease fetches it again. Returns the paths of the checked
        entries the next lease will fetch again (damaged, or gone already); empty means the
        cached files are intact and the error is not the cache's.
        """
        names = list(dict.fromkeys(PurePosixPath(path).name for path in paths))
        if error is not None:
            names = [name for name in names if name in error]
        if not names:
            return []
        return await asyncio.to_thread(self._suspect_all, names)

    def _suspect_all(self, names: list[str]) -> list[str]:
        refetch: list[str] = []
        for name in names:
            self._checked.forget(name)  # whatever it was, the next lease hashes it again
            row = self._index.get(name)
            if row is None:
                refetch.append(relative_path(name))  # evicted or dropped meanwhile
                continue
            reason, key = check_entry(self._entry_path(name), row.size, row.sha256)
            if reason is None:
                continue
            log.warning(
                "cache entry %s could not be read by DuckDB and is damaged (%s); it is "
                "fetched again by the next query that needs it",
                relative_path(name),
                reason,
            )
            if key is not None:
                self._drop_damaged(name, key)
            refetch.append(relative_path(name))
        return refetch

    def _drop_damaged(self, name: str, key: FileKey) -> bool:
        """Remove a damaged entry, pinned or not, if its path still names the file we hashed
        (``key``); True when it went. Under the entry's lock, so no download races the unlink;
        a busy lock means another process is fetching or removing it already."""
        lock = EntryLock(self._lock_path(name))
        if not lock.try_acquire():
            return False
        path = self._entry_path(name)
        try:
            try:
                if file_key(os.stat(path, follow_symlinks=False)) != key:
                    return False  # replaced since: the new file gets its own first-use check
            except FileNotFoundError:
                return False
            path.unlink()
            self._index.delete(name)
            self._checked.forget(name)
            self._index.count(refetched_damaged=1)
            lock.remove()
            return True
        finally:
            lock.release()

    # ---- paths -----------------------------------------------------------------------------

    def _entry_path(self, name: str) -> Path:
        """The entry's path; its shard directory is created 0700 and must not be a symlink."""
        return shard_dir(self._objects, name[:2], 0o700) / name

    def _lock_path(self, name: str) -> Path:
        return shard_dir(self._locks, name[:2], 0o700) / f"{name.partition('.')[0]}.lock"

    def _pin_path(self, name: str) -> Path:
        return shard_dir(self._locks, name[:2], 0o700) / f"{name.partition('.')[0]}.pin"

    # ---- maintenance -----------------------------------------------------------------------

    def stats(self) -> CacheStats:
        entries, size = self._index.total()
        in_use = sum(1 for row in self._index.rows() if is_pinned(self._pin_path(row.name)))
        return CacheStats(
            entries=entries,
            bytes=size,
            budget_bytes=self.budget_bytes,
            in_use=in_use,
            over_budget=size > self.budget_bytes,
            **self._index.counters(),
        )

    def evict(self, *, all: bool = False, to_bytes: int | None = None) -> EvictReport:
        """Remove least recently used entries until the cache fits; never a pinned one."""
        target = 0 if all else self.budget_bytes if to_bytes is None else to_bytes
        removed = freed = skipped = 0
        with self._evicting:
            _, total = self._index.total()
            # Within budget (the usual pass after a release): one aggregate, no row list.
            rows = self._index.rows() if total > target else []
            for row in rows:
                if total <= target:
                    break
                if self._remove(row.name):
                    total -= row.size
                    removed += 1
                    freed += row.size
                else:
                    skipped += 1
            if removed:
                self._index.count(evictions=removed)
        return EvictReport(removed, freed, skipped, total, target)

    def verify(self, *, repair: bool = False) -> VerifyReport:
        """Check every entry's size and sha256; with ``repair``, remove the bad ones (unless
        pinned) so the next lease fetches them again.

        Index entries whose file was already missing when this cache object opened the root
        were dropped then (the next lease fetches them again); they are reported here, once,
        as missing and removed.
        """
        rows = self._index.rows()
        dropped, self._missing_at_open = self._missing_at_open, []
        problems = [
            VerifyProblem(relative_path(name), _MISSING_AT_OPEN, removed=True) for name in dropped
        ]
        for row in rows:
            reason = check_file(self._entry_path(row.name), row.size, row.sha256)
            if reason is not None:
                problem = self._confirm(row, repair)
                if problem is not None:
                    problems.append(problem)
        return VerifyReport(len(rows) + len(dropped), problems)

    def _confirm(self, row: IndexRow, repair: bool) -> VerifyProblem | None:
        """Check a bad-looking entry again under its lock: another process may have evicted,
        replaced or been fetching it since the rows were read (not a problem of the cache).
        None when it was that; an entry busy now is left to its next check."""
        lock = EntryLock(self._lock_path(row.name))
        if not lock.try_acquire():
            return None
        try:
            now = self._index.get(row.name)
            if now is None or (now.size, now.sha256) != (row.size, row.sha256):
                return None
            reason = check_file(self._entry_path(row.name), row.size, row.sha256)
        finally:
            lock.release()
        if reason is None:
            return None
        return VerifyProblem(relative_path(row.name), reason, repair and self._remove(row.name))

    def _remove(self, name: str) -> bool:
        """Remove an entry unless it is pinned or being fetched; True when it is gone.

        Holding the entry lock means nobody replaces the file meanwhile, so the file we lock
        exclusively is the one we unlink.
        """
        lock = EntryLock(self._lock_path(name))
        if not lock.try_acquire():
            return False
        try:
            if not unlink_unpinned(self._entry_path(name), self._pin_path(name)):
                return False
            self._index.delete(name)
            self._checked.forget(name)
            lock.remove()
            return True
        finally:
            lock.release()

    def _reconcile(self) -> None:
        """At open: drop crashed downloads' partial files, unindexed files, rows without files.

        Each only when the entry's lock is free: another process may be downloading it now.
        """
        indexed = {row.name for row in self._index.rows()}
        on_disk: set[str] = set()
        for shard in os.scandir(self._objects):
            if not shard.is_dir(follow_symlinks=False):
                Path(shard.path).unlink()  # nothing we create here is a file or a symlink
                continue
            for item in os.scandir(shard.path):
                name = partial_entry(item.name) or item.name
                if item.name.startswith(PARTIAL_PREFIX) or name not in indexed:
                    self._drop_if_idle(name, Path(item.path))
                else:
                    on_disk.add(name)
        for name in sorted(indexed - on_disk):
            if self._drop_if_idle(name, None):
                self._missing_at_open.append(name)

    # ---- eviction after a release ----------------------------------------------------------

    def _released(self) -> None:
        """A lease let go of its entries: have the upkeep thread evict down to the budget.

        Called from ``CacheLease.release``, often on the event loop: it takes a lock no one
        holds for long and queues at most one pass, never doing the eviction itself.
        """
        with self._upkeep_state:
            self._evict_wanted = True
            if self._evict_queued:
                return
            self._evict_queued = True
        try:
            self._upkeep.submit(self._evict_while_wanted)
        except RuntimeError:  # closed: nothing is kept any more
            with self._upkeep_state:
                self._evict_queued = False

    def _evict_while_wanted(self) -> None:
        """The upkeep thread's pass: evict, again while releases keep asking for it."""
        while True:
            with self._upkeep_state:
                if not self._evict_wanted:
                    self._evict_queued = False
                    return
                self._evict_wanted = False
            try:
                self.evict()
            except Exception as error:  # a report only: the next release or download tries again
                log.warning("cache eviction after a query failed: %s", error)

    async def settle(self) -> None:
        """Wait until the eviction passes asked for so far have run."""
        with contextlib.suppress(RuntimeError):  # closed: none will run
            await asyncio.wrap_future(self._upkeep.submit(lambda: None))

    async def close(self) -> None:
        """Cancel downloads in flight (their partial files are removed), let an eviction pass
        in progress finish, and close the index."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.to_thread(self._upkeep.shutdown)
        self._index.close()

    def _drop_if_idle(self, name: str, path: Path | None) -> bool:
        """Remove a leftover file (or, with no path, an index row whose file is gone), unless
        the entry's lock shows another process is working on it; True if an index row went."""
        lock = EntryLock(self._lock_path(name))
        if not lock.try_acquire():
            return False
        dropped = False
        try:
            if path is not None and path.name.startswith(PARTIAL_PREFIX):
                path.unlink(missing_ok=True)
            elif path is not None and self._index.get(name) is None:
                path.unlink(missing_ok=True)  # published, but the process died before indexing
            elif path is None and not os.path.lexists(self._entry_path(name)):
                # Another process may have evicted it since the rows were read: then the row
                # is gone too, and nothing was missing.
                dropped = self._index.get(name) is not None
                self._index.delete(name)
            lock.remove()
        finally:
            lock.release()
        return dropped


async def _owning_fds(pin: Callable[[], list[int | None]]) -> list[int | None]:
    """Run ``pin`` in a thread; if we are cancelled meanwhile, close what it opened."""
    task = asyncio.ensure_future(asyncio.to_thread(pin))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # A pin that failed has closed its own fds (``_pin_all``); only a finished one's remain.
        task.add_done_callback(
            lambda done: done.cancelled() or done.exception() or _close_all(done.result())
        )
        raise


def _close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
