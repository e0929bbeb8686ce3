"""ObjectCache over a counting in-memory store and over LocalStore, with real files and locks.

The stores are handed in through ``lease``; nothing of ours is patched but the index, once, to
fail in the middle of a lease. Cross-process behaviour
(single flight, pins) runs real child processes on the same cache root.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

import launcher.data.cache
from launcher.data.cache import CacheLease, ObjectCache
from launcher.data.cache_files import EntryLock
from launcher.data.cache_index import entry_name, relative_path
from launcher.data.objectstore import LocalStore, ObjectRef
from launcher.errors import CacheError, ObjectStoreError
from tests.support.waiting import eventually

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


class MemoryStore:
    """Objects held as bytes; counts downloads, sleeps so concurrent callers overlap.

    ``fail_midway`` makes a download write half the object and then raise, like a dropped
    connection.
    """

    source = "mem"

    def __init__(self, objects: dict[str, bytes], *, delay_s: float = 0.05) -> None:
        self.objects = dict(objects)
        self.versions: Counter[str] = Counter()
        self.downloads: Counter[str] = Counter()
        self.delay_s = delay_s
        self.fail_midway = False

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data
        self.versions[key] += 1

    def ref(self, key: str) -> ObjectRef:
        data = self.objects[key]
        return ObjectRef(self.source, "bucket", key, f"v{self.versions[key]}", len(data))

    async def list(self, url: str) -> list[ObjectRef]:
        return [self.ref(key) for key in sorted(self.objects) if key.startswith(url)]

    async def download(self, ref: ObjectRef, dest: Path) -> None:
        self.downloads[ref.key] += 1
        data = self.objects[ref.key]
        with open(dest, "xb") as out:
            out.write(data[: len(data) // 2])
            await asyncio.sleep(self.delay_s)
            if self.fail_midway:
                raise ObjectStoreError(f"connection reset while fetching {ref.key}")
            out.write(data[len(data) // 2 :])


def make_store(count: int = 4, size: int = 64 * 1024, **kwargs: float) -> MemoryStore:
    return MemoryStore(
        {f"t/part-{i}.parquet": bytes([i]) * size for i in range(count)},
        **kwargs,
    )


def entry_file(root: Path, ref: ObjectRef) -> Path:
    return root / relative_path(entry_name(ref))


def visible_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "objects").rglob("*") if p.is_file())


def test_lease_returns_relative_paths_in_order_with_extensions_and_readable_modes(
    tmp_path: Path,
) -> None:
    store = make_store(3)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = list(reversed(run(store.list("t/"))))

    async def scenario() -> list[str]:
        async with await cache.lease(store, refs) as lease:
            for path, ref in zip(lease.paths, refs, strict=True):
                assert (tmp_path / path).read_bytes() == store.objects[ref.key]
            return lease.paths

    paths = run(scenario())
    assert paths == [relative_path(entry_name(ref)) for ref in refs]
    assert all(p.startswith("objects/") and p.endswith(".parquet") for p in paths)
    entry = tmp_path / paths[0]
    # Not world-readable: the sandbox's group reads it through a link (launcher.sandbox.files).
    as_root = os.geteuid() == 0
    assert stat.S_IMODE(entry.stat().st_mode) == (0o640 if as_root else 0o644)
    assert entry.stat().st_gid == (65534 if as_root else os.getegid())
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "objects").stat().st_mode) == 0o700
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "index.db").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "locks").stat().st_mode) == 0o700


def test_entry_names_keep_extension_and_change_with_etag() -> None:
    ref = ObjectRef("s3:x", "b", "dir/data.csv.gz", "e1", 1)
    assert entry_name(ref).endswith(".csv.gz")
    assert entry_name(ObjectRef("s3:x", "b", "a.v1.parquet", "e1", 1)).endswith(".parquet")
    assert "." not in entry_name(ObjectRef("s3:x", "b", "weird.pa rquet", "e1", 1))
    changed = ObjectRef("s3:x", "b", "dir/data.csv.gz", "e2", 1)
    other_store = ObjectRef("s3:y", "b", "dir/data.csv.gz", "e1", 1)
    assert len({entry_name(ref), entry_name(changed), entry_name(other_store)}) == 3


def test_twenty_concurrent_leases_download_each_object_once(tmp_path: Path) -> None:
    store = make_store(5)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))

    async def scenario() -> list[CacheLease]:
        return await asyncio.gather(*(cache.lease(store, refs) for _ in range(20)))

    leases = run(scenario())
    assert store.downloads == Counter({ref.key: 1 for ref in refs})
    assert all(lease.paths == leases[0].paths for lease in leases)
    for lease in leases:
        lease.release()
    stats = cache.stats()
    assert (stats.entries, stats.downloads, stats.hits + stats.misses) == (5, 5, 100)
    assert stats.in_use == 0


_CHILD = """
import asyncio, sys
from pathlib import Path
from launcher.data.cache import ObjectCache
from launcher.data.objectstore import LocalStore

class SlowCountingStore(LocalStore):
    async def download(self, ref, dest):
        with open(sys.argv[3], "a") as log:
            log.write(ref.key + "\\n")
        await asyncio.sleep(0.5)  # long enough for the other children to find it busy
        await super().download(ref, dest)

async def main():
    store = SlowCountingStore()
    refs = await store.list(sys.argv[2])
    cache = ObjectCache(Path(sys.argv[1]), budget_bytes=1 << 30)
    print("ready", flush=True)
    sys.stdin.readline()  # the parent starts every child's lease at the same moment
    async with await cache.lease(store, refs) as lease:
        print(" ".join(lease.paths), flush=True)
        sys.stdin.readline()  # hold the lease until the parent says so

asyncio.run(main())
"""


def _source_dir(tmp_path: Path, count: int = 3) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for i in range(count):
        (source / f"part-{i}.parquet").write_bytes(os.urandom(128 * 1024))
    return source


def _children(root: Path, source: Path, log: Path, count: int) -> list[subprocess.Popen[str]]:
    """Child launchers on one cache root, all ready (imported, listed) and then told to go."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root), str(source), str(log)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    return children


def test_processes_sharing_a_root_download_each_object_once(tmp_path: Path) -> None:
    source, root, log = _source_dir(tmp_path), tmp_path / "cache", tmp_path / "downloads.log"
    children = _children(root, source, log, 4)
    outputs = [child.communicate("\n", timeout=60)[0] for child in children]
    assert all(child.returncode == 0 for child in children)
    assert len(set(outputs)) == 1
    downloaded = log.read_text().splitlines()
    assert sorted(downloaded) == sorted(str(p) for p in source.iterdir())
    stats = ObjectCache(root, budget_bytes=1 << 30).stats()
    assert (stats.misses, stats.downloads) == (12, 3)  # all four missed, yet one download each


def test_eviction_skips_entries_pinned_by_another_process(tmp_path: Path) -> None:
    source, root, log = _source_dir(tmp_path), tmp_path / "cache", tmp_path / "downloads.log"
    [child] = _children(root, source, log, 1)
    assert child.stdout is not None
    paths = child.stdout.readline().split()
    try:
        cache = ObjectCache(root, budget_bytes=0)
        assert cache.stats().in_use == 3
        report = cache.evict(all=True)
        assert (report.removed, report.skipped_in_use) == (0, 3)
        assert all((root / path).exists() for path in paths)
    finally:
        child.communicate("\n", timeout=30)
    report = cache.evict(all=True)
    assert (report.removed, report.bytes_after) == (3, 0)
    assert not any((root / path).exists() for path in paths)


def test_a_sandbox_locking_its_link_stalls_no_lease_and_no_eviction(tmp_path: Path) -> None:
    """A compromised runner can flock the inode of its linked file (it opens it through its
    hard link): leases pin pin files, never entries, so another tenant's lease of the same file
    does not wait for that lock, and the lock does not make the entry look in use."""
    store = make_store(1)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))
    run(cache.lease(store, refs)).release()
    link = tmp_path / "sandbox-link.parquet"
    os.link(entry_file(tmp_path, refs[0]), link)  # as launcher.sandbox.files links it
    hostile = os.open(link, os.O_RDONLY)
    try:
        fcntl.flock(hostile, fcntl.LOCK_EX | fcntl.LOCK_NB)

        async def lease_of_another_tenant() -> list[str]:
            async with asyncio.timeout(5):  # a blocked pin would wait here forever
                async with await cache.lease(store, refs) as lease:
                    assert cache.stats().in_use == 1
                    return lease.paths

        assert run(lease_of_another_tenant()) == [relative_path(entry_name(refs[0]))]
        run(cache.settle())
        assert cache.stats().in_use == 0  # the sandbox's lock is not a pin
        assert cache.evict(all=True).removed == 1
    finally:
        os.close(hostile)


def kept(root: Path, refs: list[ObjectRef]) -> set[int]:
    return {i for i, ref in enumerate(refs) if entry_file(root, ref).exists()}


def test_eviction_under_small_budget_keeps_leased_files_and_evicts_lru(tmp_path: Path) -> None:
    store = make_store(6, size=100)
    cache = ObjectCache(tmp_path, budget_bytes=250)
    refs = run(store.list("t/"))

    async def scenario() -> None:
        held = await cache.lease(store, refs[0:2])
        async with await cache.lease(store, refs[2:4]) as second:
            # 400 bytes, budget 250: nothing is evictable while both leases run.
            assert all((tmp_path / p).exists() for p in held.paths + second.paths)
            assert cache.stats().over_budget
        await cache.settle()  # the release evicted the least recently used unpinned: 2 and 3
        assert kept(tmp_path, refs) == {0, 1} and not cache.stats().over_budget
        async with await cache.lease(store, refs[4:5]):
            await cache.settle()
            assert kept(tmp_path, refs) == {0, 1, 4}  # over budget, but all of it pinned
        await cache.settle()  # 4 is the only entry not pinned: least recently used or not
        assert kept(tmp_path, refs) == {0, 1}
        held.release()

    run(scenario())
    run(cache.settle())
    stats = cache.stats()
    assert kept(tmp_path, refs) == {0, 1}
    assert (stats.evictions, stats.bytes, stats.over_budget) == (3, 200, False)
    run(cache.close())


def test_the_cache_is_back_under_budget_right_after_the_overflowing_query_ends(
    tmp_path: Path,
) -> None:
    """A query whose files alone exceed the budget keeps them while it runs; when it releases
    them the cache evicts at once, without waiting for the next download."""
    store = make_store(4, size=100)
    cache = ObjectCache(tmp_path, budget_bytes=250)
    refs = run(store.list("t/"))

    async def scenario() -> None:
        lease = await cache.lease(store, refs)
        assert cache.stats().over_budget and kept(tmp_path, refs) == {0, 1, 2, 3}
        lease.release()
        await eventually(lambda: not cache.stats().over_budget, "eviction after the release")

    run(scenario())
    assert len(kept(tmp_path, refs)) == 2
    assert (cache.stats().evictions, cache.stats().bytes) == (2, 200)
    run(cache.close())


def test_a_release_hands_eviction_to_another_thread_and_never_waits_for_it(
    tmp_path: Path,
) -> None:
    """The release runs on the event loop: with the eviction lock taken elsewhere, it still
    returns at once, and the eviction it asked for happens when the lock is free."""
    store = make_store(4, size=100)
    cache = ObjectCache(tmp_path, budget_bytes=250)
    refs = run(store.list("t/"))

    async def scenario() -> None:
        lease = await cache.lease(store, refs)
        with cache._evicting:  # an eviction in progress (a `duckcell cache evict`, say)
            lease.release()  # would deadlock here if it evicted on the caller's thread
            assert cache.stats().over_budget
        await eventually(lambda: not cache.stats().over_budget, "eviction after the release")

    run(scenario())
    run(cache.close())


def test_truncated_entry_is_detected_at_lease_and_fetched_again(tmp_path: Path) -> None:
    store = make_store(2)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))
    run(cache.lease(store, refs)).release()
    victim = entry_file(tmp_path, refs[0])
    os.truncate(victim, 1000)

    lease = run(cache.lease(store, refs))
    assert (tmp_path / lease.paths[0]).read_bytes() == store.objects[refs[0].key]
    assert store.downloads == Counter({refs[0].key: 2, refs[1].key: 1})
    lease.release()


def test_a_new_cache_on_the_same_root_reuses_entries_without_downloading(tmp_path: Path) -> None:
    store = make_store(3)
    refs = run(store.list("t/"))
    run(ObjectCache(tmp_path, budget_bytes=10 * MiB).lease(store, refs)).release()
    restarted = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    lease = run(restarted.lease(store, refs))
    lease.release()
    lease.release()  # idempotent
    assert sum(store.downloads.values()) == 3
    stats = restarted.stats()
    assert (stats.entries, stats.hits, stats.misses, stats.downloads) == (3, 3, 3, 3)


def test_a_download_failing_midway_leaves_no_entry_and_no_partial_file(tmp_path: Path) -> None:
    store = make_store(2)
    store.fail_midway = True
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))
    with pytest.raises(ObjectStoreError, match="connection reset"):
        run(cache.lease(store, refs))
    assert visible_files(tmp_path) == []
    assert cache.stats().entries == 0
    store.fail_midway = False
    run(cache.lease(store, refs)).release()
    assert len(visible_files(tmp_path)) == 2


def test_a_full_disk_is_a_cache_error_that_says_what_to_do(tmp_path: Path) -> None:
    class FullDiskStore(MemoryStore):
        async def download(self, ref: ObjectRef, dest: Path) -> None:
            dest.write_bytes(b"some")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    store = FullDiskStore({"t/a.csv": b"a,b\n"})
    cache = ObjectCache(tmp_path, budget_bytes=MiB)
    with pytest.raises(CacheError, match=r"No space left on device.*free space there"):
        run(cache.lease(store, run(store.list("t/"))))
    assert visible_files(tmp_path) == []


def test_close_cancels_a_download_in_flight_and_leaves_nothing(tmp_path: Path) -> None:
    store = make_store(1, delay_s=5)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))

    async def scenario() -> None:
        task = asyncio.ensure_future(cache.lease(store, refs))
        while not store.downloads:
            await asyncio.sleep(0.01)
        task.cancel()  # the shared download goes on for other waiters...
        await asyncio.sleep(0.05)
        assert any(name.startswith(".partial-") for name in visible_files(tmp_path))
        await cache.close()  # ...until the cache closes

    run(scenario())
    assert visible_files(tmp_path) == []


def test_opening_removes_stale_partials_and_unindexed_files_but_not_busy_ones(
    tmp_path: Path,
) -> None:
    store = make_store(1)
    ref = run(store.list("t/"))[0]
    run(ObjectCache(tmp_path, budget_bytes=MiB).lease(store, [ref])).release()
    shard = entry_file(tmp_path, ref).parent
    stale = shard / f".partial-{'0' * 32}-{entry_name(ref)}"
    stale.write_bytes(b"half")
    orphan = shard / f"{'a' * 64}.parquet"
    orphan.write_bytes(b"from a crash before indexing")
    busy_name = f"{'b' * 64}.parquet"
    busy = shard / f".partial-{'1' * 32}-{busy_name}"
    busy.write_bytes(b"another process is downloading this")
    (tmp_path / "locks" / "bb").mkdir(mode=0o700)
    lock = EntryLock(tmp_path / "locks" / "bb" / f"{'b' * 64}.lock")
    assert lock.try_acquire()
    try:
        ObjectCache(tmp_path, budget_bytes=MiB)
    finally:
        lock.release()
    assert not stale.exists() and not orphan.exists()
    assert busy.exists() and entry_file(tmp_path, ref).exists()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_lease_failing_in_its_first_pass_lets_go_of_what_it_pinned(tmp_path: Path) -> None:
    """A pin lost on an error would keep its entry from eviction and repair for as long as the
    process lives: the index failing on the second hit must leave the first one unpinned."""
    store = make_store(3)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))
    run(cache.lease(store, refs)).release()
    index = cache._index
    touch, touched = index.touch, []

    def failing_touch(name: str) -> None:
        touched.append(name)
        if len(touched) == 2:
            raise CacheError("the cache index is busy")
        touch(name)

    before = open_fds()
    index.touch = failing_touch  # type: ignore[method-assign]
    with pytest.raises(CacheError, match="busy"):
        run(cache.lease(store, refs))
    index.touch = touch  # type: ignore[method-assign]
    assert open_fds() == before
    assert cache.stats().in_use == 0
    assert cache.evict(all=True).skipped_in_use == 0


def test_verify_finds_corruption_and_repair_removes_it_unless_pinned(tmp_path: Path) -> None:
    store = make_store(3)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))
    run(cache.lease(store, refs)).release()
    assert cache.verify().ok
    pinned = run(cache.lease(store, refs[1:2]))  # a query running while the disk goes bad
    for ref in refs[:2]:  # same size, different bytes: only the full check sees it
        with open(entry_file(tmp_path, ref), "r+b") as entry:
            entry.write(b"\xff")
    report = cache.verify(repair=True)
    assert report.checked == 3
    assert {(p.path, p.reason, p.removed) for p in report.problems} == (
        {
            (relative_path(entry_name(refs[0])), "sha256 mismatch", True),
            (relative_path(entry_name(refs[1])), "sha256 mismatch", False),
        }
    )
    assert not entry_file(tmp_path, refs[0]).exists()
    pinned.release()
    lease = run(cache.lease(store, refs))
    assert (tmp_path / lease.paths[0]).read_bytes() == store.objects[refs[0].key]
    assert store.downloads[refs[0].key] == 2
    lease.release()


def damage(path: Path, offset: int, data: bytes, *, keep_mtime: bool = False) -> None:
    """Overwrite bytes in place (same size); ``keep_mtime``: as the disk itself would, unseen
    by the file's metadata."""
    before = path.stat()
    with open(path, "r+b") as entry:
        entry.seek(offset)
        entry.write(data)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("where", ["start", "end"])
def test_an_entry_changed_at_the_same_size_is_fetched_again_on_first_use_after_a_restart(
    tmp_path: Path, where: str
) -> None:
    """Damage (the footer, or one byte) that leaves size and mtime alone, found by the first
    lease of the entry in the next process: dropped, fetched again, never handed out."""
    store = make_store(2)
    refs = run(store.list("t/"))
    first = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    run(first.lease(store, refs)).release()
    assert first.stats().verified == 0  # its own downloads were hashed as they were published
    run(first.close())
    victim = entry_file(tmp_path, refs[0])
    damage(
        victim, 0 if where == "start" else victim.stat().st_size - 8, b"\xff" * 8, keep_mtime=True
    )

    restarted = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    lease = run(restarted.lease(store, refs))
    assert (tmp_path / lease.paths[0]).read_bytes() == store.objects[refs[0].key]
    assert store.downloads == Counter({refs[0].key: 2, refs[1].key: 1})
    stats = restarted.stats()
    assert (stats.verified, stats.refetched_damaged, stats.entries) == (1, 1, 2)
    lease.release()
    run(restarted.lease(store, refs)).release()  # checked once per process, not per lease
    assert restarted.stats().verified == 1 and sum(store.downloads.values()) == 3
    assert restarted.verify().ok
    run(restarted.close())


def test_a_write_into_an_entry_is_seen_by_the_next_lease_of_the_same_process(
    tmp_path: Path,
) -> None:
    store = make_store(1)
    refs = run(store.list("t/"))
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    run(cache.lease(store, refs)).release()
    damage(entry_file(tmp_path, refs[0]), 100, b"\xfe")  # its mtime moves: checked again
    lease = run(cache.lease(store, refs))
    assert (tmp_path / lease.paths[0]).read_bytes() == store.objects[refs[0].key]
    assert store.downloads[refs[0].key] == 2 and cache.stats().refetched_damaged == 1
    lease.release()
    run(cache.close())


def test_twenty_leases_after_a_restart_hash_each_entry_once(tmp_path: Path) -> None:
    store = make_store(5)
    refs = run(store.list("t/"))
    run(ObjectCache(tmp_path, budget_bytes=10 * MiB).lease(store, refs)).release()
    restarted = ObjectCache(tmp_path, budget_bytes=10 * MiB)

    async def twenty() -> list[CacheLease]:
        return await asyncio.gather(*(restarted.lease(store, refs) for _ in range(20)))

    for lease in run(twenty()):
        lease.release()
    stats = restarted.stats()
    assert (stats.verified, stats.refetched_damaged, stats.downloads) == (5, 0, 5)
    run(restarted.close())


def test_the_first_use_check_can_be_turned_off(tmp_path: Path) -> None:
    """The trade: no read of each entry after a restart, and same-size damage is served (a
    truncation is still caught, by size)."""
    store = make_store(1)
    refs = run(store.list("t/"))
    run(ObjectCache(tmp_path, budget_bytes=10 * MiB).lease(store, refs)).release()
    damage(entry_file(tmp_path, refs[0]), 0, b"\xff", keep_mtime=True)
    unchecked = ObjectCache(tmp_path, budget_bytes=10 * MiB, check_first_use=False)
    lease = run(unchecked.lease(store, refs))
    assert (tmp_path / lease.paths[0]).read_bytes()[:1] == b"\xff"
    assert (unchecked.stats().verified, store.downloads[refs[0].key]) == (0, 1)
    lease.release()
    run(unchecked.close())


def test_suspect_drops_an_entry_damaged_after_its_check_so_the_retry_fetches_it_once(
    tmp_path: Path,
) -> None:
    """As the executor uses it: DuckDB failed on a file the lease checked earlier in this
    process (the disk went bad since, leaving the metadata alone). Only entries named in the
    error are checked; a damaged one goes (even while leased), an intact one stays."""
    store = make_store(3)
    refs = run(store.list("t/"))
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    lease = run(cache.lease(store, refs))
    victim = entry_file(tmp_path, refs[0])
    damage(victim, victim.stat().st_size - 8, b"\xfe" * 4, keep_mtime=True)
    in_sandbox = f"/cache/files/{victim.name}"

    assert run(cache.suspect(lease.paths, "Parser Error: syntax error at or near FORM")) == []
    intact = f"Invalid Input Error: bad column in file '/cache/files/{Path(lease.paths[1]).name}'"
    assert run(cache.suspect(lease.paths, intact)) == []
    error = f"Invalid Input Error: Footer length error in file '{in_sandbox}'"
    assert run(lease.suspect(error)) == [lease.paths[0]]  # the lease's own entries
    assert not victim.exists() and cache.stats().refetched_damaged == 1
    lease.release()

    retry = run(cache.lease(store, refs))
    assert (tmp_path / retry.paths[0]).read_bytes() == store.objects[refs[0].key]
    assert store.downloads == Counter({ref.key: 2 if ref == refs[0] else 1 for ref in refs})
    assert run(cache.suspect(retry.paths, error)) == []  # the fresh copy is intact: no loop
    assert store.downloads[refs[0].key] == 2
    retry.release()
    run(cache.close())


def test_verify_reports_index_entries_whose_file_is_missing(tmp_path: Path) -> None:
    store = make_store(3)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    refs = run(store.list("t/"))
    run(cache.lease(store, refs)).release()
    entry_file(tmp_path, refs[0]).unlink()  # gone while this cache object is open
    run(cache.close())
    reopened = ObjectCache(tmp_path, budget_bytes=10 * MiB)  # as `duckcell cache verify` opens it
    entry_file(tmp_path, refs[1]).unlink()  # gone after the open
    report = reopened.verify()
    assert report.checked == 3
    assert [(p.path, p.reason, p.removed) for p in report.problems] == [
        (
            relative_path(entry_name(refs[0])),
            "missing (its index entry was dropped when the cache was opened)",
            True,
        ),
        (relative_path(entry_name(refs[1])), "missing", False),
    ]
    repaired = reopened.verify(repair=True)  # the open-time drop is reported once
    assert [(p.path, p.removed) for p in repaired.problems] == [
        (relative_path(entry_name(refs[1])), True)
    ]
    assert reopened.verify().ok and reopened.stats().entries == 1
    lease = run(reopened.lease(store, refs))  # both are fetched again
    assert store.downloads[refs[0].key] == store.downloads[refs[1].key] == 2
    lease.release()
    run(reopened.close())


def test_verify_beside_another_process_evicting_reports_no_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`duckcell cache verify` reads the rows, then checks each file; a worker evicting in
    between removes healthy entries, which are not missing (README: safe beside queries)."""
    store = make_store(3)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    run(cache.lease(store, run(store.list("t/")))).release()
    worker = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    check, checked = launcher.data.cache.check_file, []

    def check_after_an_eviction(path: Path, size: int, sha256: str) -> str | None:
        if not checked:
            assert worker.evict(to_bytes=0).removed == 3
        checked.append(path)
        return check(path, size, sha256)

    monkeypatch.setattr(launcher.data.cache, "check_file", check_after_an_eviction)
    report = cache.verify(repair=True)
    assert report.checked == 3 and report.problems == [] and len(checked) == 3
    run(worker.close())
    run(cache.close())


def test_a_changed_object_is_a_new_entry_and_the_old_one_is_never_served(tmp_path: Path) -> None:
    store = make_store(1)
    cache = ObjectCache(tmp_path, budget_bytes=10 * MiB)
    old = run(store.list("t/"))[0]
    first = run(cache.lease(store, [old]))
    store.put(old.key, b"new contents")
    new = run(store.list("t/"))[0]
    second = run(cache.lease(store, [new]))
    assert first.paths != second.paths
    assert (tmp_path / second.paths[0]).read_bytes() == b"new contents"
    assert store.downloads[old.key] == 2
    first.release()
    second.release()


def test_symlinks_in_the_cache_are_never_followed(tmp_path: Path) -> None:
    store = make_store(1)
    root = tmp_path / "cache"
    cache = ObjectCache(root, budget_bytes=10 * MiB)
    ref = run(store.list("t/"))[0]
    run(cache.lease(store, [ref])).release()
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"x" * ref.size)  # right size, so only the link itself is wrong
    entry = entry_file(root, ref)
    entry.unlink()
    entry.symlink_to(outside)
    lease = run(cache.lease(store, [ref]))
    assert not entry.is_symlink() and entry.read_bytes() == store.objects[ref.key]
    assert outside.read_bytes() == b"x" * ref.size
    lease.release()
    shard = root / "objects" / "zz"
    shard.symlink_to(tmp_path)
    ObjectCache(root, budget_bytes=MiB)  # reopening drops the linked shard, unfollowed
    assert not shard.exists() and tmp_path.exists()


def test_refs_from_another_store_are_refused(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path / "cache", budget_bytes=MiB)
    source = _source_dir(tmp_path, 1)
    local_refs = run(LocalStore().list(str(source)))
    with pytest.raises(CacheError, match="list the table through the same connection"):
        run(cache.lease(make_store(1), local_refs))


def test_local_store_files_go_through_the_cache(tmp_path: Path) -> None:
    source = _source_dir(tmp_path, 2)
    cache = ObjectCache(tmp_path / "cache", budget_bytes=MiB)
    store = LocalStore()
    refs = run(store.list(str(source)))
    lease = run(cache.lease(store, refs))
    for path, ref in zip(lease.paths, refs, strict=True):
        assert (tmp_path / "cache" / path).read_bytes() == Path(ref.key).read_bytes()
    lease.release()


def test_a_local_source_that_cannot_be_read_is_the_stores_error_not_the_cache_disks(
    tmp_path: Path,
) -> None:
    """Reading the source fails (a directory stands in for a file on a failing disk or share:
    opening it for reading raises EISDIR); the message must not send the operator to free
    cache space."""
    folder = tmp_path / "not-a-file"
    folder.mkdir()
    info = folder.stat()
    etag = f"{info.st_size}-{info.st_mtime_ns}"
    ref = ObjectRef(LocalStore.source, "", str(folder), etag, info.st_size)
    cache = ObjectCache(tmp_path / "cache", budget_bytes=MiB)
    with pytest.raises(ObjectStoreError, match="cannot read local file") as raised:
        run(cache.lease(LocalStore(), [ref]))
    assert "free space" not in str(raised.value)
    assert visible_files(tmp_path / "cache") == []
