"""Bulk ingest into a catalog table through the write path, with the ADBC driver: client ->
control plane (Flight SQL, TLS) -> tunnel -> worker -> sandbox writes /scratch -> the worker
uploads to a real S3 API server (moto) with credentials only it holds.

The role ``loader`` runs under a per-query policy that may write under ``s3://BUCKET/out/``,
where the catalog table ``results`` lives: ``adbc_ingest("results", ..., mode="append")`` adds
one Parquet object there, which then reads back through the table. A table outside the
policy's prefixes is refused by the write path; a mode other than append is refused at once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import adbc_driver_manager
import docker
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from launcher.config import LauncherConfig
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.data.grants import CatalogGrants
from launcher.model.catalog import Catalog
from launcher.worker.daemon import Worker
from tests.support.controlplane import DEADLINE_S, FAST
from tests.support.flight import FlightControlPlane, adbc_connect, in_thread
from tests.support.parsers import InlineParser
from tests.support.waiting import eventually

from .conftest import make_config
from .lake import admin_client, policies_with, writer_policy

pytestmark = pytest.mark.docker
BUCKET = "flight-ingest"
KEY_ENV, SECRET_ENV = "DUCKCELL_TEST_INGEST_KEY", "DUCKCELL_TEST_INGEST_SECRET"


@pytest.fixture
def s3_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv(KEY_ENV, "AKIDWORKERKEY")  # the worker's environment, nobody else's
    monkeypatch.setenv(SECRET_ENV, f"worker-secret-{uuid.uuid4().hex}")
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_ingest_appends_an_object_to_a_writable_catalog_table(
    image: str, policies_dir: Path, s3_url: str, engine: docker.DockerClient, tmp_path: Path
) -> None:
    admin = admin_client(s3_url, BUCKET)
    policies = policies_with(policies_dir, tmp_path / "policies", "writer", writer_policy(BUCKET))
    config: LauncherConfig = make_config(image, policies, cache_dir=tmp_path / "cache")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        f"""\
connections:
  lake: {{kind: s3, endpoint: "{s3_url}", region: us-east-1, path_style: true,
         access_key_id: {{env: {KEY_ENV}}}, secret_access_key: {{env: {SECRET_ENV}}}}}
tables:
  results: {{connection: lake, path: "s3://{BUCKET}/out/", format: parquet}}
  trips: {{connection: lake, path: "s3://{BUCKET}/trips/", format: parquet}}
roles:
  loader: {{policy: writer}}
"""
    )
    control_plane = FlightControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        assert config.cache_dir is not None
        cache = ObjectCache(config.cache_dir, budget_bytes=64 * 2**20)
        grants = CatalogGrants.of([s3_url], [], [f"env:{KEY_ENV}", f"env:{SECRET_ENV}"])
        data = DataPath(Catalog.EMPTY, cache, parser=InlineParser(), grants=grants)
        try:
            async with Worker(identity, config, data=data, backoff=FAST, warm_override=0) as w:
                w.start()
                await w.connected(DEADLINE_S)
                version = apply_catalog(control_plane.data.root, catalog, policies=["writer"])
                await eventually(
                    lambda: w.tunnel.catalog_revision == version.revision, "catalog push"
                )
                key = control_plane.data.api_keys().create("loader")
                rows = pa.table({"id": pa.array([1, 2, 3], pa.int32()), "zone": ["a", None, "c"]})

                def ingest() -> tuple[int, list[tuple[object, ...]]]:
                    with adbc_connect(control_plane, key) as conn, conn.cursor() as cursor:
                        count = cursor.adbc_ingest("results", rows, mode="append")
                        cursor.execute("SELECT id, zone FROM results ORDER BY id")
                        return count, cursor.fetchall()

                count, read_back = await in_thread(ingest)
                assert count == 3 and read_back == [(1, "a"), (2, None), (3, "c")]
                listed = admin.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]
                assert len(listed) == 1 and listed[0]["Key"].startswith("out/ingest-")
                body = admin.get_object(Bucket=BUCKET, Key=listed[0]["Key"])["Body"].read()
                assert pq.read_table(pa.BufferReader(body)).equals(rows)

                def refused(table: str, mode: str) -> str:
                    with adbc_connect(control_plane, key) as conn, conn.cursor() as cursor:
                        try:
                            cursor.adbc_ingest(table, rows, mode=mode)
                        except adbc_driver_manager.Error as error:
                            return str(error)
                    raise AssertionError(f"ingest into {table} ({mode}) was not refused")

                # trips is readable but outside the policy's write prefixes: the write path
                # refuses it before anything runs; replace is never an ingest's to do.
                assert "may not write" in await in_thread(refused, "trips", "append")
                assert "appends a new object" in await in_thread(refused, "results", "replace")
                assert len(admin.list_objects_v2(Bucket=BUCKET, Prefix="out/")["Contents"]) == 1
        finally:
            await cache.close()
            await control_plane.stop()

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        control_plane.close()
