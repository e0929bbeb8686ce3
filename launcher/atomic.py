"""Replacing a file so that a reader, or a crash, sees the old file or the whole new one.

``write_atomically`` is the one way duckcell replaces a small file it owns: private keys and
certificates (``link.pki``, ``controlplane.ca``), the secret store (``data.secrets``), the
control plane's catalog and policies (``controlplane.catalogs``, ``controlplane.policies``).
``fsync_directory`` makes a rename durable for code that renames on its own (a worker's
identity directory, a cache entry).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data``, file mode ``mode``; the directory must exist.

    A temp file in the same directory (created 0600 and exclusively, so never through a
    symlink) takes ``data`` and ``mode``, is fsynced and renamed over ``path``; then the
    directory is fsynced so that the rename survives a crash too. A symlink at ``path`` is
    replaced, never followed: the file it named is left as it was. On any error the temp file
    is removed and ``path`` is unchanged.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the renames and links done in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
