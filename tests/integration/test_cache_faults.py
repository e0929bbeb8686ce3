"""A damaged cache, end to end: a real S3 API server (moto), real sandboxes, real DuckDB.

A catalog table's Parquet files are fetched from moto (through a proxy that counts GETs) into a
cache directory; the test then damages a cached file on disk, as a failing disk or a stray
write would, and runs the query again. Two ways of finding the damage are shown:

- a new launcher process (``duckcell query``, a subprocess each time) checks an entry's sha256
  on its first use, so a footer overwritten or one byte flipped at the same size is fetched
  again before DuckDB sees it (before, the first failed every query with "Footer length error"
  and the second answered a wrong sum);
- within one process, damage after that check that leaves the file's metadata alone is found
  when DuckDB fails to read the file: ``ObjectCache.suspect`` with DuckDB's message drops the
  entry and the query's retry fetches it again, once.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from launcher.config import LauncherConfig
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.model.catalog import parse_catalog
from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX
from tests.support.parsers import InlineParser

from .conftest import make_config, run, with_launcher
from .s3proxy import S3Proxy

pytestmark = pytest.mark.docker
BUCKET = "lake-faults"
ENV = {"LAKE_KEY": "worker-key", "LAKE_SECRET": "worker-secret"}
SQL = "SELECT count(*) AS n, sum(id)::BIGINT AS total FROM trips"
PARTS, ROWS = 2, 1000
RIGHT = {"n": PARTS * ROWS, "total": sum(range(PARTS * ROWS))}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Proxy]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = S3Proxy(f"http://{host}:{port}")
    admin = boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        aws_access_key_id="admin",
        aws_secret_access_key="admin",
    )
    admin.create_bucket(Bucket=BUCKET)
    for part in range(PARTS):
        admin.put_object(Bucket=BUCKET, Key=f"trips/part-{part}.parquet", Body=parquet(part))
    yield proxy
    proxy.stop()
    server.stop()


def parquet(part: int) -> bytes:
    """Plain, uncompressed int64s: a flipped byte changes a value, and DuckDB cannot tell."""
    sink = io.BytesIO()
    ids = pa.array(range(part * ROWS, (part + 1) * ROWS), pa.int64())
    pq.write_table(pa.table({"id": ids}), sink, compression="none", use_dictionary=False)
    return sink.getvalue()


def catalog_text(s3: S3Proxy) -> str:
    return f"""\
connections:
  lake: {{kind: s3, endpoint: "{s3.url}", region: us-east-1, path_style: true,
         access_key_id: {{env: LAKE_KEY}}, secret_access_key: {{env: LAKE_SECRET}}}}
tables:
  trips: {{connection: lake, path: "s3://{BUCKET}/trips/", format: parquet}}
"""


def damage(entry: Path, how: str) -> None:
    """Overwrite in place, same size, and put the mtime back: only the bytes changed."""
    before = entry.stat()
    data = bytearray(entry.read_bytes())
    if how == "footer":
        data[-8:-4] = b"\xff\xff\xff\x7f"  # the footer's length: DuckDB refuses the file
    else:
        data[len(data) // 2] ^= 0x01  # inside the column's values: DuckDB reads a wrong id
    entry.write_bytes(bytes(data))
    os.utime(entry, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert entry.stat().st_size == before.st_size


def first_entry(cache: Path) -> Path:
    return sorted((cache / "objects").glob("*/*.parquet"))[0]


@pytest.mark.parametrize("how", ["footer", "byte"])
def test_the_next_launcher_process_fetches_a_damaged_file_again_and_answers_right(
    s3: S3Proxy, image: str, policies_dir: Path, tmp_path: Path, how: str
) -> None:
    """Query, damage a cached file between two `duckcell query` processes, query again: the
    second process's first-use check finds it, fetches that one file again (one more GET)
    and answers the right rows; `cache stats` counts it."""
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog_text(s3))
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKCELL_")} | ENV
    env |= {
        "DUCKCELL_IMAGE": image,
        "DUCKCELL_POLICIES_DIR": str(policies_dir),
        "DUCKCELL_STATE_DIR": str(tmp_path / "state"),
        "DUCKCELL_LAUNCHER_ID": f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-faults-{how}",
        "DUCKCELL_CACHE_DIR": str(cache),
    }

    def duckcell(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "launcher.cli", "-q", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    query = ("query", "--catalog", str(catalog), "--format", "json", SQL)
    gets_before = s3.get_objects(BUCKET)
    done = duckcell(*query)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [RIGHT]
    victim = first_entry(cache)
    damage(victim, how)

    done = duckcell(*query)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [RIGHT]
    gets = s3.get_objects(BUCKET) - gets_before
    assert sorted(gets.values()) == [1, 2]  # the damaged file once more, the other one not
    stats = duckcell("cache", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    counted = json.loads(stats.stdout)
    assert (counted["verified"], counted["refetched_damaged"], counted["entries"]) == (1, 1, 2)
    assert duckcell("cache", "verify").returncode == 0


def test_a_file_damaged_after_its_check_is_dropped_on_duckdbs_error_and_fetched_once(
    s3: S3Proxy, image: str, policies_dir: Path, tmp_path: Path
) -> None:
    """One launcher: DuckDB fails on a cached file damaged after this process checked it; the
    executor asks the cache (``TableFiles.suspect``), which drops exactly that entry, and runs
    the query again on a fresh copy, once: the query answers right and the file is fetched
    once more."""
    config: LauncherConfig = make_config(image, policies_dir, cache_dir=tmp_path / "cache")
    assert config.cache_dir is not None
    config.cache_dir.mkdir()
    cache = ObjectCache(config.cache_dir, budget_bytes=64 * 2**20)
    catalog = parse_catalog(catalog_text(s3), "catalog.yaml")
    data = DataPath(catalog, cache, parser=InlineParser(), environ=ENV)
    gets_before = s3.get_objects(BUCKET)

    async def body(launcher: LocalLauncher) -> None:
        policy = launcher.policies.get("default")

        async def query() -> tuple[list[dict[str, Any]], int]:
            tables = await data.prepare(SQL, policy)
            execution = launcher.executor.execute(SQL, policy=policy, tables=tables)
            rows = (await collect_table(execution)).to_pylist()
            return rows, execution.record.reruns

        assert await query() == ([RIGHT], 0)
        damage(first_entry(config.cache_dir), "footer")  # checked earlier in this process
        assert await query() == ([RIGHT], 1)  # DuckDB's footer error, the entry dropped, again
        await cache.close()

    run(with_launcher(config, body))
    gets = s3.get_objects(BUCKET) - gets_before
    assert sorted(gets.values()) == [1, 2]  # the damaged file fetched once more, no loop
    stats = ObjectCache(config.cache_dir, budget_bytes=64 * 2**20).stats()
    assert (stats.refetched_damaged, stats.entries) == (1, PARTS)
