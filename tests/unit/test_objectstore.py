"""LocalStore on real files, the S3 URL and credential checks, and the chunk writer's cleanup.

S3Store against a real S3 API server is in ``tests/integration/test_s3_cache.py``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.data.objectstore import (
    LocalStore,
    ObjectRef,
    S3Store,
    parse_s3_url,
    run_stoppable,
    write_chunks,
)
from launcher.errors import ObjectStoreError


@pytest.fixture
def table(tmp_path: Path) -> Path:
    root = tmp_path / "trips"
    (root / "year=2024").mkdir(parents=True)
    (root / "b.parquet").write_bytes(b"b" * 10)
    (root / "year=2024" / "a.parquet").write_bytes(b"a" * 20)
    (root / ".hidden.parquet").write_bytes(b"skipped")
    (root / "link.parquet").symlink_to(root / "b.parquet")
    return root


def test_local_list_is_sorted_recursive_and_skips_hidden_files_and_symlinks(table: Path) -> None:
    refs = asyncio.run(LocalStore().list(str(table)))
    assert [(Path(r.key).relative_to(table).as_posix(), r.size) for r in refs] == [
        ("b.parquet", 10),
        ("year=2024/a.parquet", 20),
    ]
    info = (table / "b.parquet").stat()
    assert refs[0] == ObjectRef("local", "", str(table / "b.parquet"), f"10-{info.st_mtime_ns}", 10)


def test_local_list_of_one_file(table: Path) -> None:
    refs = asyncio.run(LocalStore().list(str(table / "b.parquet")))
    assert [r.key for r in refs] == [str(table / "b.parquet")]


@pytest.mark.parametrize(
    ("path", "message"),
    [("relative/dir", "is not absolute"), ("/no/such/dir", "is not a file or directory")],
)
def test_local_list_refuses_bad_paths(path: str, message: str) -> None:
    with pytest.raises(ObjectStoreError, match=message):
        asyncio.run(LocalStore().list(path))


def test_local_download_copies_exactly_and_refuses_a_changed_file(
    table: Path, tmp_path: Path
) -> None:
    store = LocalStore()
    ref = asyncio.run(store.list(str(table / "b.parquet")))[0]
    asyncio.run(store.download(ref, tmp_path / "copy"))
    assert (tmp_path / "copy").read_bytes() == b"b" * 10
    (table / "b.parquet").write_bytes(b"changed!!!")
    with pytest.raises(ObjectStoreError, match="changed since it was listed"):
        asyncio.run(store.download(ref, tmp_path / "copy2"))
    assert not (tmp_path / "copy2").exists()
    os.remove(table / "b.parquet")
    with pytest.raises(ObjectStoreError, match="cannot read local file"):
        asyncio.run(store.download(ref, tmp_path / "copy3"))


def test_write_chunks_removes_the_file_on_short_data_or_stop(tmp_path: Path) -> None:
    with pytest.raises(ObjectStoreError, match="received 3 bytes, the listing said 5"):
        write_chunks([b"abc"], tmp_path / "short", 5, threading.Event())
    assert not (tmp_path / "short").exists()
    stop = threading.Event()
    stop.set()
    with pytest.raises(ObjectStoreError, match="cancelled"):
        write_chunks([b"abc"], tmp_path / "stopped", 3, stop)
    assert not (tmp_path / "stopped").exists()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/trips/", ("bucket", "trips/")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/a/b.parquet", ("bucket", "a/b.parquet")),
    ],
)
def test_parse_s3_url(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize("url", ["http://bucket/x", "s3:///prefix", "/local/path"])
def test_parse_s3_url_refuses_other_forms(url: str) -> None:
    with pytest.raises(ObjectStoreError, match=r"s3://bucket/prefix/"):
        parse_s3_url(url)


def test_s3_store_needs_both_halves_of_a_key_and_names_its_source() -> None:
    with pytest.raises(ObjectStoreError, match="both an access key id and a secret"):
        S3Store(
            endpoint_url="http://127.0.0.1:9",
            region=None,
            path_style=True,
            access_key_id="AKIA",
            secret_access_key=None,
        )
    store = S3Store(
        endpoint_url="http://127.0.0.1:9",
        region="eu-west-1",
        path_style=True,
        access_key_id=None,
        secret_access_key=None,
    )
    assert store.source == "s3:http://127.0.0.1:9"


def test_s3_store_reports_an_unreachable_endpoint_clearly() -> None:
    store = S3Store(
        endpoint_url="http://127.0.0.1:9",  # discard port: nothing listens
        region=None,
        path_style=True,
        access_key_id="key",
        secret_access_key="secret",
    )
    with pytest.raises(ObjectStoreError, match=r"127\.0\.0\.1:9.*cannot connect.*endpoint URL"):
        asyncio.run(store.list("s3://bucket/"))


def test_a_cancelled_download_waits_for_its_thread_and_leaves_no_file(tmp_path: Path) -> None:
    """The stream blocks like a slow connection; cancelling must not return before the thread
    has stopped and removed its file, or the caller's cleanup would race with it."""
    dest = tmp_path / "dest"
    more_data = threading.Event()

    def slow_stream() -> Iterator[bytes]:
        yield b"x" * 10
        more_data.wait(5)
        yield b"y" * 10

    async def scenario() -> None:
        task = asyncio.ensure_future(
            run_stoppable(lambda stop: write_chunks(slow_stream(), dest, 20, stop))
        )
        while not dest.exists():
            await asyncio.sleep(0.01)
        task.cancel()
        asyncio.get_running_loop().call_later(0.2, more_data.set)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert more_data.is_set() and not dest.exists()

    asyncio.run(scenario())
