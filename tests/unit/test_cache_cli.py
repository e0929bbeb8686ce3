"""``duckcell cache stats|evict|verify`` through ``main`` on a real temporary cache.

The cache is filled through ``ObjectCache.lease`` from a ``LocalStore`` directory, as a query
would fill it; a lease held by the test plays a running query.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from launcher.cli.cache import format_size
from launcher.cli.main import main
from launcher.data.cache import CacheLease, ObjectCache
from launcher.data.objectstore import LocalStore

KiB = 1024


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The CLI reads DUCKCELL_* like any user's shell; keep the developer's out of the test.
    for name in [name for name in os.environ if name.startswith("DUCKCELL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("DUCKCELL_STATE_DIR", str(tmp_path / "state"))


def fill(tmp_path: Path, root: Path, sizes: list[int], *, keep: int | None = None) -> CacheLease:
    """Lease files of ``sizes`` (one lease each, oldest first); returns lease ``keep`` held."""
    source = tmp_path / "source"
    source.mkdir(exist_ok=True)
    cache = ObjectCache(root, budget_bytes=2**30)
    store = LocalStore()
    held = None
    for i, size in enumerate(sizes):
        path = source / f"part-{i}.parquet"
        path.write_bytes(bytes([i % 251]) * size)
        lease = asyncio.run(cache.lease(store, asyncio.run(store.list(str(path)))))
        if i == keep:
            held = lease
        else:
            lease.release()
    asyncio.run(cache.close())
    return held or CacheLease([], [])


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_json_and_table(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = fill(tmp_path, root, [10 * KiB, 30 * KiB], keep=1)
    code, out, _ = cli(capsys, "cache", "stats", "--cache-dir", str(root), "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["root"] == str(root)
    assert (stats["entries"], stats["bytes"], stats["in_use"]) == (2, 40 * KiB, 1)
    assert (stats["misses"], stats["downloads"], stats["budget_bytes"]) == (2, 2, 10 * 2**30)
    code, out, _ = cli(
        capsys, "cache", "stats", "--cache-dir", str(root), "--cache-budget", "80KiB"
    )
    assert code == 0
    assert "entries      2 (1 in use)" in out
    assert "size         40.0 KiB of 80.0 KiB budget (50%)" in out
    held.release()


def test_stats_count_first_use_checks_and_damaged_entries_fetched_again(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, root, [KiB, 2 * KiB])
    damaged = sorted((root / "objects").glob("*/*.parquet"), key=lambda p: p.stat().st_size)[0]
    damaged.write_bytes(b"x" * KiB)  # same size
    store = LocalStore()
    restarted = ObjectCache(root, budget_bytes=2**30)  # a new process's first use of both
    refs = asyncio.run(store.list(str(tmp_path / "source")))
    asyncio.run(restarted.lease(store, refs)).release()
    asyncio.run(restarted.close())
    code, out, _ = cli(capsys, "cache", "stats", "--cache-dir", str(root), "--json")
    stats = json.loads(out)
    assert (code, stats["verified"], stats["refetched_damaged"], stats["downloads"]) == (0, 1, 1, 3)
    code, out, _ = cli(capsys, "cache", "stats", "--cache-dir", str(root))
    assert "verified     1 (sha256 checked on first use in a process)" in out
    assert "damaged      1 (found damaged in use, fetched again)" in out


def test_stats_on_a_missing_cache_says_where_it_looked(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "cache", "stats", "--cache-dir", str(root))
    assert code == 2 and out == ""
    assert f"there is no cache at {root}" in err
    assert not root.exists()


def test_evict_all_keeps_entries_in_use(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    held = fill(tmp_path, root, [KiB, 2 * KiB, 4 * KiB], keep=0)
    code, out, _ = cli(capsys, "cache", "evict", "--all", "--cache-dir", str(root))
    assert code == 0
    assert out.strip() == (
        "removed 2 entries (6.0 KiB); 1 in use kept; the cache holds 1.0 KiB (target 0 B)"
    )
    assert len(list((root / "objects").glob("*/*.parquet"))) == 1
    assert (root / held.paths[0]).is_file()
    held.release()


def test_evict_to_size_and_to_budget_removes_least_recently_used(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, root, [4 * KiB, 4 * KiB, 4 * KiB])
    code, out, _ = cli(capsys, "cache", "evict", "--to", "9KiB", "--json", "--cache-dir", str(root))
    assert code == 0
    assert json.loads(out) | {"target_bytes": 0} == {
        "removed": 1,
        "freed_bytes": 4 * KiB,
        "skipped_in_use": 0,
        "bytes_after": 8 * KiB,
        "target_bytes": 0,
    }
    budget = ["--cache-budget", "4KiB", "--cache-dir", str(root)]
    code, out, _ = cli(capsys, "cache", "evict", "--json", *budget)
    assert (code, json.loads(out)["bytes_after"]) == (0, 4 * KiB)
    newest = (tmp_path / "source" / "part-2.parquet").read_bytes()
    assert [p.read_bytes() for p in (root / "objects").glob("*/*.parquet")] == [newest]


def test_evict_rejects_a_bad_size(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root.mkdir()
    code, _, err = cli(capsys, "cache", "evict", "--to", "half", "--cache-dir", str(root))
    assert code == 2
    assert "--to: expected a size like" in err


def test_verify_finds_repairs_and_then_passes(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, root, [KiB, KiB])
    code, out, _ = cli(capsys, "cache", "verify", "--cache-dir", str(root))
    assert (code, out.strip()) == (0, f"checked 2 entries under {root}: all good")
    damaged = sorted((root / "objects").glob("*/*.parquet"))[0]
    damaged.write_bytes(b"x" * KiB)  # same size: only the checksum can tell
    code, out, _ = cli(capsys, "cache", "verify", "--cache-dir", str(root))
    assert code == 1
    assert damaged.name in out and "duckcell cache verify --repair" in out
    assert damaged.exists()
    code, out, _ = cli(capsys, "cache", "verify", "--repair", "--json", "--cache-dir", str(root))
    report = json.loads(out)
    assert code == 1
    assert (report["checked"], report["ok"]) == (2, False)
    assert [p["removed"] for p in report["problems"]] == [True]
    assert not damaged.exists()
    code, out, _ = cli(capsys, "cache", "verify", "--cache-dir", str(root))
    assert (code, out.strip()) == (0, f"checked 1 entries under {root}: all good")


def test_verify_reports_an_entry_whose_file_is_missing(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(tmp_path, root, [KiB, KiB])
    gone = sorted((root / "objects").glob("*/*.parquet"))[0]
    gone.unlink()
    code, out, _ = cli(capsys, "cache", "verify", "--json", "--cache-dir", str(root))
    report = json.loads(out)
    assert code == 1
    assert (report["checked"], report["ok"]) == (2, False)
    [problem] = report["problems"]
    assert problem["path"].endswith(gone.name) and problem["reason"].startswith("missing")
    code, out, _ = cli(capsys, "cache", "verify", "--cache-dir", str(root))
    assert (code, out.strip()) == (0, f"checked 1 entries under {root}: all good")


def test_cache_dir_from_the_environment(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(tmp_path, root, [KiB])
    monkeypatch.setenv("DUCKCELL_CACHE_DIR", str(root))
    code, out, _ = cli(capsys, "cache", "stats", "--json")
    assert (code, json.loads(out)["entries"]) == (0, 1)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (10 * 2**30, "10.0 GiB")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_budget_from_the_environment_and_a_bad_one(
    tmp_path: Path, root: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(tmp_path, root, [KiB])
    monkeypatch.setenv("DUCKCELL_CACHE_BUDGET", "3MiB")
    code, out, _ = cli(capsys, "cache", "stats", "--json", "--cache-dir", str(root))
    assert (code, json.loads(out)["budget_bytes"]) == (0, 3 * 2**20)
    monkeypatch.setenv("DUCKCELL_CACHE_BUDGET", "plenty")
    code, out, err = cli(capsys, "cache", "stats", "--cache-dir", str(root))
    assert (code, out) == (2, "")
    assert "DUCKCELL_CACHE_BUDGET" in err and "expected a size like" in err
