"""The cache's files on disk: entry locks, pins, ownership, directories and checksums.

Everything here works on one file or directory at a time with plain system calls (``flock``,
``fstat``, ``fchown``, sha256 reads); the index (``cache_index``) says which entries exist and
the cache (``cache``) decides when to call these. Locks and pins live under ``locks/`` (0700),
never on the entries themselves, which sandboxes open through hard links.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import resource
import stat
from pathlib import Path

from ..errors import CacheError
from ..filelock import lock_held
from ..model.mounts import SANDBOX_GID
from .objectstore import CHUNK

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def file_key(info: os.stat_result) -> FileKey:
    """What identifies the bytes of a file we hashed: another file, or a write, changes it.

    Not ``st_ctime``: linking an entry into a sandbox's directory changes that, not the bytes.
    Damage that leaves size and mtime alone (the disk itself) is found at the next process's
    first use, by ``ObjectCache.suspect`` or by ``verify``.
    """
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


class EntryLock:
    """An exclusive ``flock`` on ``locks/ab/<name>.lock``: one downloader or remover per entry.

    Whoever removes an entry also unlinks its lock file while holding it, so a waiter that then
    gets the lock on the unlinked inode sees that the path now names another file and retries.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False if another holder (any process) has it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if same_file(fd, self.path):
                self._fd = fd
                return True
            os.close(fd)  # removed while we waited: lock the new file instead

    def remove(self) -> None:
        """Unlink the lock file (we hold it); the next taker creates a new one."""
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file ``fd`` has open (not replaced, not removed)."""
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def pin(path: Path) -> int:
    """An fd holding a shared ``flock`` on an entry's pin file (``locks/ab/<name>.pin``).

    Pins are never taken on the entry itself: a sandbox opens its entries through hard links
    (the same inode), and a compromised one could ``flock`` it exclusively and so block every
    lease of that file on the host. Only launchers can open the pin file (the locks directory is
    0700), and they hold its exclusive lock only for a non-blocking remove, so this wait is
    short. A remover unlinks the pin file while holding it; a taker that then gets the lock on
    the unlinked inode sees the path names another file and takes the new one.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def unlink_unpinned(path: Path, pin_path: Path) -> bool:
    """Unlink entry ``path`` unless a lease pins it; True when nothing is left there."""
    fd = os.open(pin_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not same_file(fd, pin_path):
            return False  # another remover replaced it meanwhile: leave it to them
        path.unlink(missing_ok=True)  # a symlink is never ours: dropped, unfollowed
        pin_path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def own_entry(fd: int) -> None:
    """Give a finished entry its mode: readable by the sandbox's group, by nobody else.

    A launcher that is not root cannot give a file to another group, so its entries stay
    world-readable (0644); the cache root's 0700 still keeps other host users out.
    """
    if os.geteuid() == 0:
        os.fchown(fd, 0, SANDBOX_GID)
        os.fchmod(fd, 0o640)
    else:
        os.fchmod(fd, 0o644)


def make_dir(path: Path, mode: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise CacheError(f"{path} is not a directory; remove it or choose another cache directory")
    os.chmod(path, mode)  # explicit: the umask may be stricter than the sandbox needs


def shard_dir(parent: Path, prefix: str, mode: int) -> Path:
    """``parent/prefix``, created with ``mode``; a symlink there is refused, never followed."""
    path = parent / prefix
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, mode)
            os.chmod(path, mode)
        info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise CacheError(
            f"{path} is not a directory (a symlink?); remove it: the cache never follows links"
        )
    return path


def raise_open_file_limit() -> None:
    """A lease holds one descriptor per object, and a table can have thousands of files: lift
    the soft limit (often 1024) towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def sha256_of(fd: int) -> str:
    """Hex sha256 of an open file, read from its current offset to the end."""
    digest = hashlib.sha256()
    while chunk := os.read(fd, CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, size: int, sha256: str) -> str | None:
    """What is wrong with an entry file (full check: size, then sha256), or None."""
    return check_entry(path, size, sha256)[0]


def check_entry(path: Path, size: int, sha256: str) -> tuple[str | None, FileKey | None]:
    """``check_file``'s answer, and the ``file_key`` of the file it read (None if none)."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except FileNotFoundError:
        return "missing", None
    except OSError as error:
        return f"unreadable ({error.strerror})", None
    try:
        info = os.fstat(fd)
        if info.st_size != size:
            return f"size {info.st_size}, expected {size}", file_key(info)
        try:
            digest = sha256_of(fd)
        except OSError as error:  # EIO: the disk under it is failing
            return f"unreadable ({error.strerror})", file_key(info)
        return (None if digest == sha256 else "sha256 mismatch"), file_key(info)
    finally:
        os.close(fd)


def is_pinned(pin_path: Path) -> bool:
    """Whether a lease (any process) pins the entry (for ``stats``: a pin file that cannot be
    opened counts as unpinned; removal never relies on this, it takes the lock itself)."""
    try:
        return lock_held(pin_path)
    except OSError:
        return False
