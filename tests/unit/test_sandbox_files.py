"""Sandbox directories on the host: creation, links into them, removal, stale sweeping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from launcher.errors import CacheError
from launcher.model.catalog import Binding
from launcher.sandbox.files import SandboxFiles, remove_stale


@pytest.fixture
def root(tmp_path: Path) -> Path:
    entry = tmp_path / "objects" / "ab" / "ab12.parquet"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(b"PAR1")
    return tmp_path


def test_links_point_the_bindings_into_the_session_directory(root: Path) -> None:
    session = SandboxFiles.for_slot(root, "inst1", "slot1")
    session.create()
    assert session.sandbox == "/cache/files"
    assert oct(os.stat(root / ".sandboxes").st_mode & 0o777) == "0o700"
    mode = os.stat(session.host)
    if os.geteuid() == 0:  # the sandbox's group lists and reads it, nobody else
        assert (oct(mode.st_mode & 0o777), mode.st_gid) == ("0o750", 65534)
    bindings = (Binding("t", "parquet", ("/cache/objects/ab/ab12.parquet",)),)
    linked = session.link(bindings)
    assert linked == (Binding("t", "parquet", ("/cache/files/ab12.parquet",)),)
    target = session.host / "ab12.parquet"
    assert os.path.samefile(target, root / "objects" / "ab" / "ab12.parquet")
    assert session.link(bindings) == linked  # the same entry again: reused
    # The cache fetched the entry again (a new file under the same name): the link follows.
    entry = root / "objects" / "ab" / "ab12.parquet"
    entry.unlink()
    entry.write_bytes(b"PAR1 again")
    session.link(bindings)
    assert target.read_bytes() == b"PAR1 again"
    assert sorted(p.name for p in session.host.iterdir()) == ["ab12.parquet"]
    session.remove()
    assert not session.host.exists()


@pytest.mark.parametrize(
    "path",
    [
        "/cache/.sandboxes/other/slot/x.parquet",
        "/elsewhere/x.parquet",
        "/cache/objects/nope",
        "/cache/objects/../index.db",
    ],
)
def test_only_cache_entries_can_be_linked(root: Path, path: str) -> None:
    session = SandboxFiles.for_slot(root, "inst1", "slot1")
    session.create()
    with pytest.raises(CacheError):
        session.link((Binding("t", "parquet", (path,)),))


@pytest.mark.parametrize(("instance", "slot"), [("..", "s"), ("i", "a/b"), ("i", "")])
def test_names_cannot_leave_the_sandboxes_directory(root: Path, instance: str, slot: str) -> None:
    with pytest.raises(ValueError):
        SandboxFiles.for_slot(root, instance, slot)


def test_stale_directories_of_dead_instances_are_removed(root: Path) -> None:
    (root / ".sessions" / "old" / "s").mkdir(parents=True)  # the layout before .sandboxes
    for instance in ("live", "dead"):
        SandboxFiles.for_slot(root, instance, "s").create()
    assert remove_stale(root, lambda instance: instance == "live") == ["dead"]
    assert sorted(p.name for p in (root / ".sandboxes").iterdir()) == ["live"]
    assert not (root / ".sessions").exists()
    assert remove_stale(root / "missing", lambda instance: False) == []
