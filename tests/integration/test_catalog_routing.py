"""The control plane's catalog end to end, with real sandboxes and a real S3 API server.

Two workers enroll and connect; a catalog is applied while they run (no restart) and pushed to
both. A connection pinned to one worker by name always lands there; an unpinned table spreads
over both. The pinned connection's secret lives only in the worker's environment: the test
proves it never reaches the control plane (not its data directory, not its logs, not any
message a worker sent it), while the query that needed it did read S3 with it. The workers
let the catalog reach only what their operator allowed (``launcher.data.grants``): a table the
catalog declares over a worker's TLS key is refused on whichever worker it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import docker
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.controlplane.audit import AuditLog
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.data.grants import CatalogGrants
from launcher.errors import QueryDeniedError
from launcher.model.catalog import Catalog
from launcher.worker.daemon import Worker
from launcher.worker.enroll import enroll
from tests.support.controlplane import DEADLINE_S, FAST, ControlPlane
from tests.support.parsers import InlineParser
from tests.support.waiting import eventually

from .conftest import containers_of, make_config

pytestmark = pytest.mark.docker

KEY_ENV, SECRET_ENV = "DUCKCELL_TEST_LAKE_KEY", "DUCKCELL_TEST_LAKE_SECRET"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    secret = f"sEcReT-{uuid.uuid4().hex}"
    monkeypatch.setenv(KEY_ENV, "AKIDTESTKEY")
    monkeypatch.setenv(SECRET_ENV, secret)
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="AKIDTESTKEY",
        aws_secret_access_key=secret,
    )
    s3.create_bucket(Bucket="lake")
    for part in range(2):
        table = pa.table({"fare": [float(part * 10 + i) for i in range(10)]})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        s3.put_object(
            Bucket="lake", Key=f"trips/part-{part}.parquet", Body=sink.getvalue().to_pybytes()
        )
    try:
        yield endpoint
    finally:
        server.stop()


def _catalog_yaml(endpoint: str, zones: Path, worker_key: Path) -> str:
    return f"""
connections:
  lake:
    kind: s3
    endpoint: "{endpoint}"
    region: us-east-1
    path_style: true
    access_key_id: {{env: {KEY_ENV}}}
    secret_access_key: {{env: {SECRET_ENV}}}
    worker: east
  shared: {{kind: local}}
tables:
  trips: {{connection: lake, path: "s3://lake/trips/", format: parquet}}
  zones: {{connection: shared, path: "{zones}", format: parquet}}
  stolen: {{connection: shared, path: "{worker_key}", format: csv}}
roles:
  analyst: {{tables: [trips, zones, stolen]}}
  guest: {{tables: [zones]}}
"""


def test_pinned_connection_lands_on_its_worker_and_its_secret_never_crosses_the_tunnel(
    image: str,
    policies_dir: Path,
    engine: docker.DockerClient,
    s3: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = os.environ[SECRET_ENV]
    shared = tmp_path / "shared"  # the one directory the workers let the catalog read
    shared.mkdir()
    zones = shared / "zones.parquet"
    pq.write_table(pa.table({"zone": [1, 2, 3]}), zones)
    catalog_file = tmp_path / "catalog.yaml"
    # A catalog that also declares a worker's TLS key a table: the workers refuse it.
    worker_key = tmp_path / "east" / "identity" / "worker.key"
    catalog_file.write_text(_catalog_yaml(s3, zones, worker_key))
    received: list[bytes] = []  # every message a worker sends the control plane, serialized
    control_plane = ControlPlane(
        ControlPlaneData(tmp_path / "cp"), lambda m: received.append(m.SerializeToString())
    )
    configs: list[LauncherConfig] = []
    identities: list[str] = []
    stack = contextlib.AsyncExitStack()  # the workers, stopped in reverse order

    async def start_worker(name: str, grants: CatalogGrants) -> Worker:
        assert control_plane.server is not None
        token = control_plane.data.tokens().create()
        identity = await enroll(control_plane.server.address, token, tmp_path / name, name)
        identities.append(identity.worker_id)
        cache = ObjectCache(tmp_path / f"cache-{name}", budget_bytes=64 * 2**20)
        config = make_config(image, policies_dir, cache_dir=cache.root)
        configs.append(config)
        data = DataPath(Catalog.EMPTY, cache, parser=InlineParser(), grants=grants)
        worker = await stack.enter_async_context(
            Worker(identity, config, data=data, grants=grants, backoff=FAST, warm_override=1)
        )
        worker.start()
        await worker.connected(DEADLINE_S)
        return worker

    async def scenario() -> None:
        await control_plane.start()
        assert control_plane.server is not None
        # Only east may reach the S3 endpoint (the pinned connection's) and use the variables
        # holding its keys; both read `shared`.
        keys = [f"env:{KEY_ENV}", f"env:{SECRET_ENV}"]
        workers = [
            await start_worker("east", CatalogGrants.of([s3], [shared], keys)),
            await start_worker("west", CatalogGrants.of([], [shared])),
        ]
        try:
            # Applied while both run: the watcher pushes it, no restart.
            version = apply_catalog(control_plane.data.root, catalog_file)
            for worker in workers:
                await eventually(
                    lambda t=worker.tunnel: t.catalog_revision == version.revision,
                    "the catalog push",
                )
            east_id = identities[0]
            async with ControlPlaneClient(
                control_plane.server.address,
                control_plane.data.api_keys().create("analyst"),
                control_plane.data.ca().cert_pem(),
            ) as client:
                for _ in range(6):
                    table = await client.table("SELECT count(*) AS n, sum(fare) AS s FROM trips")
                    assert table.to_pylist() == [{"n": 20, "s": float(sum(range(20)))}]
                for _ in range(4):
                    table = await client.table("SELECT count(*) AS n FROM zones")
                    assert table.to_pylist() == [{"n": 3}]
                for _ in range(2):  # whichever worker it lands on refuses it, reading nothing
                    with pytest.raises(QueryDeniedError, match="outside the directories") as no:
                        await client.table("SELECT * FROM stolen")
                    assert "PRIVATE KEY" not in str(no.value)
            async with ControlPlaneClient(
                control_plane.server.address,
                control_plane.data.api_keys().create("guest"),
                control_plane.data.ca().cert_pem(),
            ) as guest:
                with pytest.raises(QueryDeniedError, match="may not read table trips"):
                    await guest.table("SELECT * FROM trips")
        finally:
            await stack.aclose()
            await control_plane.stop()
        records = AuditLog(control_plane.data.database()).recent(50)
        trips = [r for r in records if "trips" in r.sql and r.outcome == "ok"]
        zone_runs = [r for r in records if "zones" in r.sql]
        assert len(trips) == 6 and {r.worker_id for r in trips} == {east_id}
        assert len({r.worker_id for r in zone_runs}) == 2  # unpinned: both workers served

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        control_plane.close()
    for config in configs:
        assert containers_of(engine, config.launcher_id) == []
    # The secret worked (the S3 reads above used it) and stayed on the workers' side.
    needle = secret.encode()
    assert received, "the observer saw no worker message"
    assert not [m for m in received if needle in m]
    for path in (tmp_path / "cp").rglob("*"):
        assert not path.is_file() or needle not in path.read_bytes(), path
    assert secret not in caplog.text
