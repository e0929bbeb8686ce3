"""S3Store and ObjectCache against a real S3 API server (moto) on loopback; no Docker needed.

The store under test talks to moto through a small counting reverse proxy, so "one GetObject
per object" is counted on the server side of a real connection, not inside our client.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from launcher.data.cache import CacheLease, ObjectCache
from launcher.data.objectstore import ObjectRef, S3Store
from launcher.errors import ObjectStoreError

from .s3proxy import S3Proxy

T = TypeVar("T")
MiB = 1024 * 1024


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def proxy(moto_server: str) -> Iterator[S3Proxy]:
    counting = S3Proxy(moto_server)
    yield counting
    counting.stop()


@pytest.fixture
def admin(moto_server: str) -> Any:
    """A plain boto3 client straight to moto, for setting up buckets and objects."""
    return boto3.client(
        "s3",
        endpoint_url=moto_server,
        region_name="us-east-1",
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
    )


@pytest.fixture
def bucket(admin: Any) -> str:
    name = f"lake-{uuid.uuid4().hex[:10]}"
    admin.create_bucket(Bucket=name)
    return name


def store_at(
    url: str, key: str = "worker-key", secret: str = "worker-secret", page_size: int = 1000
) -> S3Store:
    return S3Store(
        endpoint_url=url,
        region="us-east-1",
        path_style=True,
        access_key_id=key,
        secret_access_key=secret,
        list_page_size=page_size,
    )


def parquet_bytes(first: int, rows: int) -> bytes:
    sink = io.BytesIO()
    table = pa.table({"id": pa.array(range(first, first + rows), pa.int64())})
    pq.write_table(table, sink)
    return sink.getvalue()


def put_table(admin: Any, bucket: str, parts: int, rows: int = 1000) -> None:
    for i in range(parts):
        body = parquet_bytes(i * rows, rows)
        admin.put_object(Bucket=bucket, Key=f"trips/part-{i:03d}.parquet", Body=body)


def test_list_and_multi_file_parquet_through_the_cache(
    admin: Any, bucket: str, proxy: S3Proxy, tmp_path: Path
) -> None:
    put_table(admin, bucket, parts=3)
    admin.put_object(Bucket=bucket, Key="trips/", Body=b"")  # a console "folder" marker
    admin.put_object(Bucket=bucket, Key="trips2/other.parquet", Body=parquet_bytes(0, 1))
    store = store_at(proxy.url, page_size=2)
    refs = run(store.list(f"s3://{bucket}/trips/"))
    assert [ref.key for ref in refs] == [f"trips/part-{i:03d}.parquet" for i in range(3)]
    pages = sum(n for (_, path, query), n in proxy.requests.items() if path == f"/{bucket}")
    assert pages == 2  # four keys under trips/ (one a folder marker), two per page
    for ref in refs:
        head = admin.head_object(Bucket=bucket, Key=ref.key)
        assert ref == ObjectRef(store.source, bucket, ref.key, head["ETag"].strip('"'), ref.size)
    assert run(store.list(f"s3://{bucket}/trips")) == refs  # "trips" is not "trips2"

    cache = ObjectCache(tmp_path, budget_bytes=64 * MiB)
    lease = run(cache.lease(store, refs))
    files = [str(tmp_path / path) for path in lease.paths]
    query = f"SELECT count(*), sum(id) FROM read_parquet({files})"
    count, total = duckdb.connect().execute(query).fetchone()  # type: ignore[misc]
    assert (count, total) == (3000, sum(range(3000)))
    lease.release()


def test_a_changed_object_is_fetched_again_and_the_old_version_refused(
    admin: Any, bucket: str, proxy: S3Proxy, tmp_path: Path
) -> None:
    put_table(admin, bucket, parts=2)
    store = store_at(proxy.url)
    cache = ObjectCache(tmp_path, budget_bytes=64 * MiB)
    old = run(store.list(f"s3://{bucket}/trips/"))
    run(cache.lease(store, old)).release()
    key = old[0].key
    admin.put_object(Bucket=bucket, Key=key, Body=parquet_bytes(10_000, 5))
    new = run(store.list(f"s3://{bucket}/trips/"))
    assert new[0].etag != old[0].etag and new[1] == old[1]

    lease = run(cache.lease(store, new))
    assert pq.read_table(tmp_path / lease.paths[0]).column("id").to_pylist()[0] == 10_000
    assert proxy.get_objects(bucket) == Counter({key: 2, old[1].key: 1})
    lease.release()
    # Fetching the old version now fails (If-Match) instead of mixing versions.
    with pytest.raises(ObjectStoreError, match="changed since it was listed; run the query"):
        run(ObjectCache(tmp_path / "fresh", budget_bytes=MiB).lease(store, old[:1]))


def test_twenty_concurrent_leases_on_a_cold_table_cause_one_get_per_object(
    admin: Any, bucket: str, proxy: S3Proxy, tmp_path: Path
) -> None:
    put_table(admin, bucket, parts=6, rows=20_000)
    store = store_at(proxy.url)
    refs = run(store.list(f"s3://{bucket}/trips/"))
    cache = ObjectCache(tmp_path, budget_bytes=256 * MiB)

    async def twenty() -> list[CacheLease]:
        return await asyncio.gather(*(cache.lease(store, refs) for _ in range(20)))

    leases = run(twenty())
    assert proxy.get_objects(bucket) == Counter({ref.key: 1 for ref in refs})
    for lease in leases:
        lease.release()
    # A restarted launcher on the same cache directory makes no request for them at all.
    run(ObjectCache(tmp_path, budget_bytes=256 * MiB).lease(store, refs)).release()
    assert sum(proxy.get_objects(bucket).values()) == len(refs)


def test_missing_bucket_and_wrong_credentials_are_clear_errors(
    moto_server: str, bucket: str
) -> None:
    store = store_at(moto_server)
    with pytest.raises(ObjectStoreError, match=r"bucket 'no-such-bucket': no such bucket"):
        run(store.list("s3://no-such-bucket/trips/"))
    _moto_auth(moto_server, enabled=True)
    try:
        with pytest.raises(
            ObjectStoreError,
            match=rf"{moto_server}, bucket '{bucket}': access refused.*check the connection's",
        ):
            run(store_at(moto_server, key="AKIAWRONG", secret="nope").list(f"s3://{bucket}/"))
    finally:
        _moto_auth(moto_server, enabled=False)


def _moto_auth(url: str, *, enabled: bool) -> None:
    """Switch moto's credential checking on (from the next request) or off again."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    conn.request("POST", "/moto-api/reset-auth", b"0" if enabled else b"inf")
    assert conn.getresponse().status == 200
    conn.close()


def test_cold_and_warm_lease_of_twenty_8_mib_objects(
    admin: Any, bucket: str, moto_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Timing for the report (printed, not asserted); direct to moto, no proxy in between."""
    for i in range(20):
        admin.put_object(Bucket=bucket, Key=f"big/part-{i:02d}.parquet", Body=bytes([i]) * 8 * MiB)
    store = store_at(moto_server)
    refs = run(store.list(f"s3://{bucket}/big/"))
    cache = ObjectCache(tmp_path, budget_bytes=1024 * MiB)
    started = time.perf_counter()
    run(cache.lease(store, refs)).release()
    cold = time.perf_counter() - started
    started = time.perf_counter()
    run(cache.lease(store, refs)).release()
    warm = time.perf_counter() - started
    assert cache.stats().downloads == 20
    with capsys.disabled():
        print(f"\nlease 20 x 8 MiB from moto: cold {cold:.2f} s, warm {warm * 1000:.1f} ms")
