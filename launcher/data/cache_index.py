"""The cache's index: entry names, the on-disk layout, and the SQLite index of entries.

The file-level pieces (entry locks, pins, ownership, checksums) are in ``cache_files``.

Layout under the cache root::

    objects/ab/<sha256>.parquet   entries, 0640 root:nogroup (0644 for a launcher that is not
                                  root) in 0700 dirs: no sandbox mounts them, it reads links
    objects/ab/.partial-<uuid>-<sha256>.parquet   a download in progress (hidden from globs)
    locks/ab/<sha256>.lock        held (LOCK_EX) by whoever downloads or removes that entry
    locks/ab/<sha256>.pin         held (LOCK_SH) by every lease of that entry (``pin``)
    index.db                      SQLite in WAL mode: one row per entry, plus counters
    .sandboxes/<instance>/<slot>/ hard links to entries, one directory per sandbox, its only
                                  /cache (``launcher.sandbox.files``); never indexed or evicted

Why SQLite rather than a sidecar file per entry: eviction needs the least recently used entries
and the total size, which one indexed query answers while sidecars would need a directory walk;
``last_used`` is updated on every hit, which is one small transaction rather than a file rewrite;
and WAL mode lets several launcher processes on the host read while one writes, with SQLite's own
locking instead of ours. The index and the lock directory are private (0600/0700): the sandbox
only needs the entries.

The index is advisory about what is on disk, never trusted alone: a lease checks the file's size
against it on every use and its sha256 on the first use in a process (``FirstUseChecks``), and
``verify`` checks sha256. Rows and files that disagree are repaired by fetching again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import CacheError
from .cache_files import FileKey
from .objectstore import ObjectRef

PARTIAL_PREFIX = ".partial-"
_EXTENSION_RE = re.compile(r"^\.[A-Za-z0-9]{1,10}$")
_COMPRESSIONS = {".gz", ".zst", ".bz2", ".xz", ".lz4", ".snappy"}
COUNTERS = ("hits", "misses", "downloads", "evictions", "verified", "refetched_damaged")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL, bucket TEXT NOT NULL, key TEXT NOT NULL, etag TEXT NOT NULL,
    size INTEGER NOT NULL, sha256 TEXT NOT NULL, created REAL NOT NULL, last_used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def entry_name(ref: ObjectRef) -> str:
    """``<sha256 of source, bucket, key, etag>.<ext>``: a new ETag is a new entry.

    The extension (with a compression suffix, ``.csv.gz``) is kept so DuckDB infers the format.
    """
    identity = "\0".join((ref.source, ref.bucket, ref.key, ref.etag))
    digest = hashlib.sha256(identity.encode()).hexdigest()
    suffixes = [s.lower() for s in PurePosixPath(ref.key).suffixes[-2:]]
    if suffixes and suffixes[-1] not in _COMPRESSIONS:
        suffixes = suffixes[-1:]
    if not all(_EXTENSION_RE.match(s) for s in suffixes):
        suffixes = suffixes[-1:] if suffixes and _EXTENSION_RE.match(suffixes[-1]) else []
    return digest + "".join(suffixes)


def relative_path(name: str) -> str:
    """Where entry ``name`` lives, relative to the cache root (the sandbox's /cache)."""
    return f"objects/{name[:2]}/{name}"


def partial_entry(filename: str) -> str | None:
    """The entry a ``.partial-<uuid>-<name>`` file was downloading, or None for other files."""
    if not filename.startswith(PARTIAL_PREFIX):
        return None
    _, _, name = filename[len(PARTIAL_PREFIX) :].partition("-")
    return name or None


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    bytes: int
    budget_bytes: int
    hits: int  # persisted across restarts, summed over every process using the root
    misses: int
    downloads: int
    evictions: int
    in_use: int  # entries pinned by a lease right now (any process)
    over_budget: bool  # true while pinned entries keep the cache above its budget
    verified: int  # entries whose sha256 a lease checked on their first use in a process
    refetched_damaged: int  # entries found damaged at use (or by ``suspect``), dropped, fetched


@dataclass(frozen=True, slots=True)
class EvictReport:
    removed: int
    freed_bytes: int
    skipped_in_use: int
    bytes_after: int
    target_bytes: int


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    path: str  # relative to the cache root
    reason: str
    removed: bool


@dataclass(frozen=True, slots=True)
class VerifyReport:
    checked: int
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class IndexRow:
    name: str
    size: int
    sha256: str
    created: float
    last_used: float


def _switch_to_wal(db: sqlite3.Connection, attempts: int = 100) -> None:
    """``PRAGMA journal_mode=WAL``, retried: SQLite can answer "database is locked" at once,
    without its busy timeout, while another process opens a new index at the same moment
    (seen with three launchers starting on one fresh cache)."""
    for attempt in range(attempts):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.02 * (1 + attempt % 5))


class FirstUseChecks:
    """The entries this process has hashed, each with the ``file_key`` it had then; thread-safe.

    ``turn(name)`` lets one thread at a time check an entry, so twenty leases starting together
    after a restart hash a file once, not twenty times; different entries hash in parallel.
    """

    def __init__(self) -> None:
        self._checked: dict[str, FileKey] = {}
        self._turns: dict[str, tuple[threading.Lock, int]] = {}
        self._lock = threading.Lock()

    def knows(self, name: str, key: FileKey) -> bool:
        with self._lock:
            return self._checked.get(name) == key

    def remember(self, name: str, key: FileKey) -> None:
        with self._lock:
            self._checked[name] = key

    def forget(self, name: str) -> None:
        with self._lock:
            self._checked.pop(name, None)

    @contextlib.contextmanager
    def turn(self, name: str) -> Iterator[None]:
        with self._lock:
            lock, waiting = self._turns.get(name, (threading.Lock(), 0))
            self._turns[name] = (lock, waiting + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, waiting = self._turns[name]
                if waiting == 1:
                    del self._turns[name]
                else:
                    self._turns[name] = (lock, waiting - 1)


class CacheIndex:
    """The entries table and persisted counters; safe to call from any thread.

    One connection guarded by a lock: calls are short, and SQLite's busy timeout covers the
    other launcher processes on the host.
    """

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(
                path, timeout=30, check_same_thread=False, isolation_level=None
            )
            os.chmod(path, 0o600)
            _switch_to_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as error:
            raise CacheError(
                f"cache index {path} is unusable ({error}); remove it (entries are fetched "
                "again) or choose another cache directory"
            ) from None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as error:
                raise CacheError(
                    f"cache index failed ({error}); check the disk under the cache directory"
                ) from None

    def get(self, name: str) -> IndexRow | None:
        with self._cursor() as db:
            row = db.execute(
                "SELECT name, size, sha256, created, last_used FROM entries WHERE name = ?",
                (name,),
            ).fetchone()
        return IndexRow(*row) if row else None

    def put(self, name: str, ref: ObjectRef, size: int, sha256: str) -> None:
        now = time.time()
        with self._cursor() as db:
            db.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, ref.source, ref.bucket, ref.key, ref.etag, size, sha256, now, now),
            )

    def touch(self, name: str) -> None:
        with self._cursor() as db:
            db.execute("UPDATE entries SET last_used = ? WHERE name = ?", (time.time(), name))

    def delete(self, name: str) -> None:
        with self._cursor() as db:
            db.execute("DELETE FROM entries WHERE name = ?", (name,))

    def rows(self) -> list[IndexRow]:
        """Every entry, least recently used first (the eviction order)."""
        with self._cursor() as db:
            found = db.execute(
                "SELECT name, size, sha256, created, last_used FROM entries "
                "ORDER BY last_used, name"
            ).fetchall()
        return [IndexRow(*row) for row in found]

    def total(self) -> tuple[int, int]:
        """(entries, bytes)."""
        with self._cursor() as db:
            count, size = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM entries"
            ).fetchone()
        return int(count), int(size)

    def count(self, **increments: int) -> None:
        with self._cursor() as db:
            for name, value in increments.items():
                db.execute(
                    "INSERT INTO counters VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (name, value),
                )

    def counters(self) -> dict[str, int]:
        with self._cursor() as db:
            found = dict(db.execute("SELECT name, value FROM counters").fetchall())
        return {name: int(found.get(name, 0)) for name in COUNTERS}

    def close(self) -> None:
        with self._lock:
            self._db.close()
