"""``launcher.atomic``: a file is replaced whole or not at all, with its mode, never through a
symlink, and the rename is made durable by fsyncing the directory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from launcher.atomic import write_atomically


def test_the_target_is_replaced_with_the_new_bytes_and_mode(tmp_path: Path) -> None:
    target = tmp_path / "catalog.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    write_atomically(target, b"new", 0o600)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalog.json"]  # no temp file left


def test_a_new_file_gets_the_mode_asked_for_not_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "ca.pem"
    old_umask = os.umask(0o077)
    try:
        write_atomically(target, b"cert", 0o644)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"not yours")
    target = tmp_path / "key.pem"
    target.symlink_to(elsewhere)
    write_atomically(target, b"key", 0o600)
    assert not target.is_symlink() and target.read_bytes() == b"key"
    assert elsewhere.read_bytes() == b"not yours"


def test_a_failed_write_leaves_the_target_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "secrets.enc"
    target.write_bytes(b"old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomically(target, b"new", 0o600)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secrets.enc"]


def test_the_file_then_its_directory_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[tuple[bool, int]] = []  # (a directory?, inode) in call order
    real_fsync = os.fsync

    def observed(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed)
    target = tmp_path / "policies.json"
    write_atomically(target, b"{}", 0o600)
    assert synced == [(False, target.stat().st_ino), (True, tmp_path.stat().st_ino)]
