"""``lock_held``: another open file description's flock, seen from a probe that never waits."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from launcher.filelock import lock_held


def test_held_free_missing_and_planted_links(tmp_path: Path) -> None:
    lock = tmp_path / "a.lock"
    lock.touch()
    assert not lock_held(lock)
    holder = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)
        assert lock_held(lock)
    finally:
        os.close(holder)
    assert not lock_held(lock)  # let go with its holder
    assert not lock_held(tmp_path / "missing.lock")
    planted = tmp_path / "planted.lock"
    planted.symlink_to(lock)
    assert not lock_held(planted)  # never followed


def test_a_lock_file_that_cannot_be_opened_raises(tmp_path: Path) -> None:
    """Not "free": a caller would remove what a live process still uses (a launcher's
    sandboxes, reaped as orphans)."""
    not_a_directory = tmp_path / "file"
    not_a_directory.touch()
    with pytest.raises(NotADirectoryError):
        lock_held(not_a_directory / "x.lock")
