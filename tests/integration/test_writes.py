"""Writes through real sandboxes to a real S3 API server (moto) on loopback.

``COPY (SELECT ...) TO 's3://...'`` runs in a sandbox that writes /scratch; the runner streams
the file back and the launcher uploads it. The S3 server sits behind a small proxy that counts
requests (so "multipart" is seen on the server's side of a real connection) and can be told to
fail part uploads. What each test proves is in its docstring.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from launcher.config import LauncherConfig
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.data.objectstore import S3Store
from launcher.errors import ObjectStoreError, QueryDeniedError, SqlError
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.model.catalog import Catalog, parse_catalog
from tests.support.parsers import InlineParser

from .conftest import containers_of, make_config, run, with_launcher
from .lake import admin_client, policies_with, writer_policy
from .s3proxy import S3Proxy

pytestmark = pytest.mark.docker
MiB = 1024 * 1024
BUCKET = "lake-writes"
ENV = {"LAKE_KEY": "worker-key", "LAKE_SECRET": "worker-secret"}
WRITER = writer_policy(BUCKET)
Failing = Callable[[str, str], bool]


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Proxy]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = S3Proxy(f"http://{host}:{port}")
    yield proxy
    proxy.stop()
    server.stop()


@pytest.fixture
def admin(s3: S3Proxy) -> Any:
    """A plain boto3 client (through the proxy) that sets the bucket up and inspects it."""
    s3.fail = lambda method, query: False
    return admin_client(s3.url, BUCKET)


@pytest.fixture
def writer_config(image: str, policies_dir: Path, tmp_path: Path) -> LauncherConfig:
    directory = policies_with(policies_dir, tmp_path / "policies", "writer", WRITER)
    (tmp_path / "cache").mkdir()
    return make_config(image, directory, cache_dir=tmp_path / "cache")


def lake_catalog(s3: S3Proxy, table: str, prefix: str) -> Catalog:
    """A catalog of one table over ``s3://BUCKET/PREFIX/`` through the proxy."""
    return parse_catalog(
        f"""\
connections:
  lake: {{kind: s3, endpoint: "{s3.url}", region: us-east-1, path_style: true,
         access_key_id: {{env: LAKE_KEY}}, secret_access_key: {{env: LAKE_SECRET}}}}
tables:
  {table}: {{connection: lake, path: "s3://{BUCKET}/{prefix}/", format: parquet}}
""",
        "catalog.yaml",
    )


@pytest.fixture
def data(s3: S3Proxy, writer_config: LauncherConfig) -> Iterator[DataPath]:
    catalog = lake_catalog(s3, "trips", "trips")
    assert writer_config.cache_dir is not None
    cache = ObjectCache(writer_config.cache_dir, budget_bytes=256 * MiB)
    yield DataPath(catalog, cache, parser=InlineParser(), environ=ENV)
    run(cache.close())


async def write(launcher: LocalLauncher, data: DataPath, sql: str, policy: str) -> pa.Table:
    chosen = launcher.policies.get(policy)
    tables = await data.prepare(sql, chosen)
    return await collect_table(launcher.executor.execute(sql, policy=chosen, tables=tables))


def object_table(admin: Any, key: str) -> tuple[pa.Table, dict[str, Any]]:
    got = admin.get_object(Bucket=BUCKET, Key=key)
    return pq.read_table(pa.BufferReader(got["Body"].read())), got


def keys(admin: Any, prefix: str) -> list[str]:
    return [
        o["Key"] for o in admin.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    ]


def test_a_write_uploads_a_correct_parquet_file(
    writer_config: LauncherConfig, data: DataPath, admin: Any
) -> None:
    """A catalog table read through the cache, filtered and written by a sandbox, arrives in
    S3 as the Parquet DuckDB wrote; the result row says rows, bytes and where."""
    url = f"s3://{BUCKET}/out/even.parquet"
    sql = (
        "CREATE TEMP TABLE src AS SELECT i, i * 2 AS d, 'row ' || i AS s FROM trips;\n"
        f"COPY (SELECT * FROM src WHERE i % 2 = 0 ORDER BY i) TO '{url}' (FORMAT parquet)"
    )
    result = run(
        with_launcher(writer_config, lambda launcher: write(launcher, data, sql, "writer"))
    )
    table, got = object_table(admin, "out/even.parquet")
    expected = [{"i": i, "d": i * 2, "s": f"row {i}"} for i in range(0, 1000, 2)]
    assert table.to_pylist() == expected
    assert result.to_pylist() == [{"Count": 500, "bytes": got["ContentLength"], "destination": url}]


def test_a_failing_query_uploads_nothing(
    writer_config: LauncherConfig, data: DataPath, admin: Any, s3: S3Proxy
) -> None:
    """error() half-way through the SELECT fails the query with DuckDB's message; nothing is
    uploaded: no object, no PUT, no multipart upload started."""
    before_put, before_uploads = s3.count("PUT"), s3.count("POST", "uploads")
    url = f"s3://{BUCKET}/out/failed.parquet"
    sql = f"COPY (SELECT CASE WHEN i > 500 THEN error('boom') ELSE i END FROM trips) TO '{url}'"
    with pytest.raises(SqlError, match="boom"):
        run(with_launcher(writer_config, lambda launcher: write(launcher, data, sql, "writer")))
    assert "out/failed.parquet" not in keys(admin, "out/")
    assert s3.count("PUT") == before_put
    assert s3.count("POST", "uploads") == before_uploads


@pytest.mark.parametrize(
    ("policy", "url", "why"),
    [
        ("writer", f"s3://{BUCKET}/elsewhere/x.parquet", "writes only under"),
        ("writer", f"s3://{BUCKET}/out/../x.parquet", "writes only under"),
        ("default", f"s3://{BUCKET}/out/x.parquet", "writes nothing"),
    ],
)
def test_a_denied_destination_runs_nothing(
    writer_config: LauncherConfig,
    data: DataPath,
    s3: S3Proxy,
    engine: docker.DockerClient,
    policy: str,
    url: str,
    why: str,
) -> None:
    """Refused before any sandbox exists (the launcher keeps none warm here) and before the
    tables are even listed: the S3 server sees no request at all."""
    before = s3.total()

    async def body(launcher: LocalLauncher) -> None:
        with pytest.raises(QueryDeniedError, match=why):
            await write(launcher, data, f"COPY (FROM trips) TO '{url}'", policy)
        assert containers_of(engine, writer_config.launcher_id) == []
        assert data.cache.stats().entries == 0  # trips was never listed nor fetched

    run(with_launcher(writer_config, body))
    assert s3.total() == before


def test_a_large_write_goes_multipart(
    writer_config: LauncherConfig, data: DataPath, admin: Any, s3: S3Proxy
) -> None:
    """Three million rows (> 8 MiB of Parquet) go up as a multipart upload, seen by the
    server (one CreateMultipartUpload, an ETag with a part count) and read back whole."""
    before = s3.count("POST", "uploads")
    url = f"s3://{BUCKET}/out/large.parquet"
    sql = f"COPY (SELECT range AS i, hash(range) AS h FROM range(3000000)) TO '{url}'"
    result = run(
        with_launcher(writer_config, lambda launcher: write(launcher, data, sql, "writer"))
    )
    head = admin.head_object(Bucket=BUCKET, Key="out/large.parquet")
    assert head["ContentLength"] > 8 * MiB
    assert s3.count("POST", "uploads") == before + 1
    assert int(head["ETag"].strip('"').rsplit("-", 1)[1]) >= 2
    body = admin.get_object(Bucket=BUCKET, Key="out/large.parquet")["Body"].read()
    con = duckdb.connect()
    con.register("written", pq.read_table(pa.BufferReader(body)))
    count, total, hashes = con.execute(
        "SELECT count(*), sum(i), sum(h::HUGEINT) = "
        "(SELECT sum(hash(range)::HUGEINT) FROM range(3000000)) FROM written"
    ).fetchone()  # type: ignore[misc]
    assert (count, total, hashes) == (3_000_000, sum(range(3_000_000)), True)
    assert result.to_pylist()[0]["Count"] == 3_000_000


def test_a_failed_multipart_upload_leaves_no_object(
    admin: Any, s3: S3Proxy, tmp_path: Path
) -> None:
    """Every second part fails (500, retried, fails again): the upload raises an
    ObjectStoreError and the multipart upload is aborted, so neither an object nor parts stay."""
    source = tmp_path / "big.bin"
    source.write_bytes(uuid.uuid4().bytes * (20 * MiB // 16))
    s3.fail = lambda method, query: method == "PUT" and "partNumber=2" in query
    store = S3Store(
        endpoint_url=s3.url,
        region="us-east-1",
        path_style=True,
        access_key_id="worker-key",
        secret_access_key="worker-secret",
    )
    with pytest.raises(ObjectStoreError, match="nothing was written"):
        asyncio.run(store.upload(source, f"s3://{BUCKET}/out/broken.bin"))
    s3.fail = lambda method, query: False
    assert "out/broken.bin" not in keys(admin, "out/")
    assert admin.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_a_write_prepared_early_uploads_once_from_fresh_files(
    writer_config: LauncherConfig, admin: Any, s3: S3Proxy
) -> None:
    """A write whose source table changed since its last listing: the early run's output is
    never uploaded; the query runs again on the fresh files and exactly one object, with the
    new rows, reaches S3."""
    prefix = f"grow-{uuid.uuid4().hex[:8]}"
    catalog = lake_catalog(s3, "grow", prefix)
    assert writer_config.cache_dir is not None
    cache = ObjectCache(writer_config.cache_dir, budget_bytes=64 * MiB)
    data = DataPath(catalog, cache, parser=InlineParser(), environ=ENV)

    def put(part: int, rows: range) -> None:
        sink = io.BytesIO()
        pq.write_table(pa.table({"i": pa.array(rows, pa.int64())}), sink)
        admin.put_object(Bucket=BUCKET, Key=f"{prefix}/part-{part}.parquet", Body=sink.getvalue())

    url = f"s3://{BUCKET}/out/{prefix}.parquet"
    sql = f"COPY (SELECT i FROM grow ORDER BY i) TO '{url}'"

    async def body(launcher: LocalLauncher) -> tuple[pa.Table, int]:
        policy = launcher.policies.get("writer")
        put(0, range(100))
        (await data.prepare("SELECT * FROM grow", policy, early=True)).release()  # listed once
        put(1, range(100, 150))
        tables = await data.prepare(sql, policy, early=True)
        assert len(tables.bindings[0].paths) == 1  # bound to the last listing...
        execution = launcher.executor.execute(sql, policy=policy, tables=tables)
        result = await collect_table(execution)
        await data.cache.close()
        return result, execution.record.reruns

    puts_before = s3.count("PUT")
    result, reruns = run(with_launcher(writer_config, body))
    table, _ = object_table(admin, f"out/{prefix}.parquet")
    assert reruns == 1  # ...which the fresh LIST refuted
    assert table.column("i").to_pylist() == list(range(150))
    assert result.to_pylist()[0]["Count"] == 150
    assert s3.count("PUT") == puts_before + 3  # two source parts and one upload, not two
