"""Writes through the whole remote path: client -> control plane -> tunnel -> worker -> S3.

A ``ControlPlaneClient`` with an API key sends ``COPY (SELECT ...) TO 's3://...'``; the control
plane routes it through the tunnel to a real enrolled worker whose catalog was pushed to it and
whose S3 secrets live only in its own environment; a real sandbox writes /scratch, the worker
uploads to a real S3 API server (moto, behind the counting proxy). What each part proves is in
the scenario's comments: the object reads back as the Parquet that was written, a destination
the policy refuses is refused before anything runs (no sandbox, no S3 request), and a query that
fails half-way leaves no object.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import docker
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.data.grants import CatalogGrants
from launcher.errors import QueryDeniedError, SqlError
from launcher.executor import QueryRecord
from launcher.model.catalog import Catalog, load_catalog
from launcher.worker.daemon import Worker
from tests.support.controlplane import DEADLINE_S, FAST, ControlPlane
from tests.support.parsers import InlineParser
from tests.support.waiting import eventually

from .conftest import containers_of, make_config
from .lake import admin_client, policies_with, writer_policy
from .s3proxy import S3Proxy

pytestmark = pytest.mark.docker
BUCKET = "tunnel-writes"
KEY_ENV, SECRET_ENV = "DUCKCELL_TEST_WRITES_KEY", "DUCKCELL_TEST_WRITES_SECRET"
WRITER = writer_policy(BUCKET)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Proxy]:
    """A fresh server; moto's objects live in the process, though, so each test writes under
    its own keys."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = S3Proxy(f"http://{host}:{port}")
    monkeypatch.setenv(KEY_ENV, "AKIDWORKERKEY")  # the worker's environment, nobody else's
    monkeypatch.setenv(SECRET_ENV, f"worker-secret-{uuid.uuid4().hex}")
    try:
        yield proxy
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture
def admin(s3: S3Proxy) -> Any:
    """A plain boto3 client that sets the bucket up and reads back what the worker wrote."""
    return admin_client(s3.url, BUCKET)


@pytest.fixture
def worker_config(image: str, policies_dir: Path, tmp_path: Path) -> LauncherConfig:
    directory = policies_with(policies_dir, tmp_path / "policies", "writer", WRITER)
    return make_config(image, directory, cache_dir=tmp_path / "cache")


def catalog_file(tmp_path: Path, endpoint: str, listing_ttl: str = "0s", results: str = "") -> Path:
    """The worker's catalog: ``trips``, and ``results`` over ``s3://BUCKET/out/<results>``."""
    path = tmp_path / "catalog.yaml"
    path.write_text(
        f"""\
connections:
  lake: {{kind: s3, endpoint: "{endpoint}", region: us-east-1, path_style: true,
         access_key_id: {{env: {KEY_ENV}}}, secret_access_key: {{env: {SECRET_ENV}}},
         listing_ttl: {listing_ttl}}}
tables:
  trips: {{connection: lake, path: "s3://{BUCKET}/trips/", format: parquet}}
  results: {{connection: lake, path: "s3://{BUCKET}/out/{results}", format: parquet}}
"""
    )
    return path


@asynccontextmanager
async def catalog_stack(
    control_plane: ControlPlane, config: LauncherConfig, catalog: Path, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlaneClient, list[QueryRecord]]]:
    """``remote_stack`` with a data path: the worker takes the control plane's catalog push
    and prepares (and uploads) catalog queries. Yields the client and the worker's records."""
    await control_plane.start()
    assert control_plane.server is not None
    identity = await control_plane.enroll(tmp_path / "worker")
    assert config.cache_dir is not None
    cache = ObjectCache(config.cache_dir, budget_bytes=64 * 2**20)
    # The worker's operator allows the lake's endpoint and the variables holding its keys, as a
    # real worker must be told to.
    endpoints = [c.endpoint for c in load_catalog(catalog).connections.values() if c.endpoint]
    grants = CatalogGrants.of(endpoints, [], [f"env:{KEY_ENV}", f"env:{SECRET_ENV}"])
    data = DataPath(Catalog.EMPTY, cache, parser=InlineParser(), grants=grants)
    records: list[QueryRecord] = []
    try:
        async with Worker(
            identity, config, data=data, backoff=FAST, warm_override=0, on_finished=records.append
        ) as worker:
            tunnel = worker.tunnel
            worker.start()
            await worker.connected(DEADLINE_S)
            version = apply_catalog(control_plane.data.root, catalog)
            await eventually(lambda: tunnel.catalog_revision == version.revision, "catalog push")
            client = ControlPlaneClient(
                control_plane.server.address,
                control_plane.data.api_keys().create("analyst"),
                control_plane.data.ca().cert_pem(),
            )
            try:
                yield client, records
            finally:
                await client.close()
    finally:
        await cache.close()
        await control_plane.stop()


def keys(admin: Any, prefix: str) -> list[str]:
    listed = admin.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


def test_writes_through_the_control_plane_and_tunnel(
    worker_config: LauncherConfig,
    s3: S3Proxy,
    admin: Any,
    engine: docker.DockerClient,
    tmp_path: Path,
) -> None:
    # Heartbeats every second, not the unit tests' 0.1 s: the control plane, the worker, moto
    # and the proxy share this process's GIL and a sandbox shares the two cores, so 0.3 s of
    # silence under a loaded machine ended the tunnel mid-query (seen: "missed 3 heartbeats").
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"), heartbeat_interval_s=1.0)
    name = f"out/{uuid.uuid4().hex}.parquet"
    url = f"s3://{BUCKET}/{name}"

    async def scenario() -> None:
        stack = catalog_stack(
            control_plane, worker_config, catalog_file(tmp_path, s3.url), tmp_path
        )
        async with stack as (client, records):
            # An allowed prefix: the worker reads trips through its cache, the sandbox writes,
            # the worker uploads; the client gets COPY's one row back through the tunnel.
            sql = f"COPY (SELECT i, i * i AS sq FROM trips WHERE i < 100 ORDER BY i) TO '{url}'"
            result = await client.table(sql, "writer")
            got = admin.get_object(Bucket=BUCKET, Key=name)
            written = pq.read_table(pa.BufferReader(got["Body"].read()))
            assert written.to_pylist() == [{"i": i, "sq": i * i} for i in range(100)]
            assert result.to_pylist() == [
                {"Count": 100, "bytes": got["ContentLength"], "destination": url}
            ]
            await eventually(lambda: len(records) == 1, "the write's worker record")

            # A denied prefix: refused on the worker before anything runs. No new sandbox
            # (none is kept warm; the first query's may still be on its way out), no S3
            # request (not even the listing of trips), nothing reached the executor.
            before, sandboxes = s3.total(), set(containers_of(engine, worker_config.launcher_id))
            denied = f"s3://{BUCKET}/elsewhere/x.parquet"
            with pytest.raises(QueryDeniedError, match="writes only under"):
                await client.table(f"COPY (FROM trips) TO '{denied}'", "writer")
            assert s3.total() == before
            assert set(containers_of(engine, worker_config.launcher_id)) <= sandboxes
            assert len(records) == 1
            assert keys(admin, "elsewhere/") == []

            # A query failing half-way (DuckDB has started the file): no object, no upload.
            puts = s3.count("PUT")
            failing = f"s3://{BUCKET}/out/failed.parquet"
            boom = "SELECT CASE WHEN i > 500 THEN error('boom') ELSE i END FROM trips"
            sql = f"COPY ({boom}) TO '{failing}'"
            with pytest.raises(SqlError, match="boom"):
                await client.table(sql, "writer")
            assert keys(admin, "out/failed") == []
            assert s3.count("PUT") == puts

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        control_plane.close()
    assert containers_of(engine, worker_config.launcher_id) == []


def test_a_reused_listing_still_sees_what_this_worker_wrote(
    worker_config: LauncherConfig,
    s3: S3Proxy,
    admin: Any,
    tmp_path: Path,
) -> None:
    """With ``listing_ttl: 1m`` the worker reuses the listing of ``results``, except
    that its own upload there drops it: the next query sees the new object. An object another
    writer puts there is not seen until the listing expires: the documented trade."""
    # Heartbeats every second: see the test above.
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"), heartbeat_interval_s=1.0)
    count = "SELECT count(*) AS n FROM results"

    async def scenario() -> None:
        catalog = catalog_file(tmp_path, s3.url, "1m", "reused/")
        async with catalog_stack(control_plane, worker_config, catalog, tmp_path) as (client, _):
            first = f"s3://{BUCKET}/out/reused/first.parquet"
            await client.table(f"COPY (FROM trips WHERE i < 100) TO '{first}'", "writer")
            assert (await client.table(count, "writer")).to_pylist() == [{"n": 100}]
            lists = s3.count("GET", "list-type")
            assert (await client.table(count, "writer")).to_pylist() == [{"n": 100}]
            assert s3.count("GET", "list-type") == lists  # the listing was reused
            second = f"s3://{BUCKET}/out/reused/second.parquet"
            await client.table(f"COPY (FROM trips WHERE i < 5) TO '{second}'", "writer")
            assert (await client.table(count, "writer")).to_pylist() == [{"n": 105}]
            sink = io.BytesIO()
            pq.write_table(pa.table({"i": pa.array([1, 2], pa.int64())}), sink)
            admin.put_object(Bucket=BUCKET, Key="out/reused/other.parquet", Body=sink.getvalue())
            assert (await client.table(count, "writer")).to_pylist() == [{"n": 105}]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        control_plane.close()
