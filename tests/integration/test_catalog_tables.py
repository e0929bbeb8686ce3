"""Catalog tables through real sandboxes: listed, leased in the cache, bound, and fenced off.

The tables are a local-kind connection's Parquet files, so the path is the same as for S3
(list -> cache lease -> bindings -> temp views) without an S3 server. What each test proves is
in its docstring.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from launcher.config import LauncherConfig
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.errors import SqlError
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.model.catalog import load_catalog
from launcher.sandbox.spec import Sandbox
from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX
from tests.support.parsers import InlineParser

from .conftest import run, with_launcher

pytestmark = pytest.mark.docker

CATALOG = """\
connections:
  samples: {kind: local}
tables:
  trips: {connection: samples, path: trips, format: parquet}
  payroll: {connection: samples, path: payroll.parquet, format: parquet}
"""


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "trips").mkdir(parents=True)
    con = duckdb.connect()
    con.execute(f"COPY (FROM range(0, 600) t(i)) TO '{data}/trips/part-0.parquet'")
    con.execute(f"COPY (FROM range(600, 1000) t(i)) TO '{data}/trips/part-1.parquet'")
    (data / "trips" / "_SUCCESS").write_text("")  # not a Parquet file: must not be read
    con.execute(f"COPY (SELECT 'alice' AS who, 250000 AS salary) TO '{data}/payroll.parquet'")
    con.close()
    (data / "catalog.yaml").write_text(CATALOG)
    return data / "catalog.yaml"


def test_a_multi_file_table_is_read_through_the_cache(
    cached_config: LauncherConfig, catalog_file: Path
) -> None:
    """Both Parquet files of the table reach the sandbox via /cache; a second run downloads
    nothing (the cached entries are reused)."""
    assert cached_config.cache_dir is not None
    cache = ObjectCache(cached_config.cache_dir, budget_bytes=64 * 2**20)
    data = DataPath(load_catalog(catalog_file), cache, parser=InlineParser())

    async def body(launcher: LocalLauncher) -> None:
        policy = launcher.policies.get("default")
        sql = "SELECT count(*) AS n, sum(i) AS total FROM Trips"
        for _ in range(2):
            tables = await data.prepare(sql, policy)
            assert [len(b.paths) for b in tables.bindings] == [2]
            assert all(p.startswith("/cache/objects/") for p in tables.bindings[0].paths)
            execution = launcher.executor.execute(sql, policy=policy, tables=tables)
            table = await collect_table(execution)
            assert table.to_pylist() == [{"n": 1000, "total": sum(range(1000))}]
            assert tables.leases == []  # released when the query ended
        assert cache.stats().entries == 2
        await cache.close()

    run(with_launcher(cached_config, body))


def test_a_query_cannot_read_cached_files_of_tables_it_did_not_reference(
    cached_config: LauncherConfig, catalog_file: Path
) -> None:
    """payroll's file sits in the shared cache (an earlier query read it); a query that binds
    only trips can neither read that file by its path nor list the cache to find it."""
    assert cached_config.cache_dir is not None
    cache = ObjectCache(cached_config.cache_dir, budget_bytes=64 * 2**20)
    data = DataPath(load_catalog(catalog_file), cache, parser=InlineParser())

    async def body(launcher: LocalLauncher) -> None:
        policy = launcher.policies.get("default")

        async def query(sql: str, reads: str) -> list[dict[str, object]]:
            tables = await data.prepare(reads, policy)
            execution = launcher.executor.execute(sql, policy=policy, tables=tables)
            return (await collect_table(execution)).to_pylist()

        first = await query("SELECT who FROM payroll", "SELECT who FROM payroll")
        assert first == [{"who": "alice"}]
        async with await data.prepare("FROM payroll", policy) as files:
            payroll = files.bindings[0].paths[0]
        for probe in (
            f"SELECT * FROM read_parquet('{payroll}')",
            f"SELECT * FROM read_parquet(['{payroll}'])",
            "SELECT * FROM glob('/cache/*')",
            "SELECT * FROM glob('/cache/objects/**')",
            "SELECT * FROM read_parquet('/cache/objects/*/*.parquet')",
        ):
            with pytest.raises(SqlError, match="Permission Error"):
                await query(f"SELECT count(*) FROM trips; {probe}", "SELECT * FROM trips")
        await cache.close()

    run(with_launcher(cached_config, body))


def test_duckcell_query_with_a_catalog(
    image: str, policies_dir: Path, catalog_file: Path, tmp_path: Path
) -> None:
    """`duckcell query --catalog FILE --cache-dir DIR` reads catalog tables by name; the cache
    directory is created and filled; a missing secret only fails queries that need it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKCELL_")}
    env.update(
        DUCKCELL_IMAGE=image,
        DUCKCELL_POLICIES_DIR=str(policies_dir),
        DUCKCELL_STATE_DIR=str(tmp_path / "state"),
        DUCKCELL_LAUNCHER_ID=f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-catalog",
    )
    catalog_file.write_text(
        CATALOG.replace(
            "connections:\n",
            "connections:\n  lake: {kind: s3, access_key_id: {env: NOPE_KEY_ID}, "
            "secret_access_key: {env: NOPE_SECRET}}\n",
        )
        + "  remote: {connection: lake, path: 's3://bucket/x/', format: parquet}\n"
    )
    cache = tmp_path / "cli-cache"

    def duckcell(sql: str) -> subprocess.CompletedProcess[str]:
        args = ["query", "--catalog", str(catalog_file), "--cache-dir", str(cache)]
        return subprocess.run(
            [sys.executable, "-m", "launcher.cli", *args, "--format", "csv", sql],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = duckcell("SELECT count(*) AS n FROM trips")
    assert done.returncode == 0, done.stderr
    assert done.stdout == '"n"\n1000\n'
    assert len(list((cache / "objects").glob("*/*.parquet"))) == 2
    done = duckcell("SELECT * FROM remote")
    assert done.returncode == 2
    assert "secret env:NOPE_KEY_ID is not set" in done.stderr


def test_a_query_prepared_early_answers_from_the_tables_files_as_they_are_now(
    cached_config: LauncherConfig, catalog_file: Path
) -> None:
    """A worker prepares queries early: a table listed before is bound to its last listing
    while a fresh LIST runs beside the sandbox. Unchanged, that run stands (no rerun). After a
    third file lands in the table, the early run's result is held back, thrown away with its
    sandbox, and the query runs once more on the fresh files: the client sees only the new
    count, and nothing stays leased."""
    assert cached_config.cache_dir is not None
    cache = ObjectCache(cached_config.cache_dir, budget_bytes=64 * 2**20)
    data = DataPath(load_catalog(catalog_file), cache, parser=InlineParser())
    trips = catalog_file.parent / "trips"
    sql = "SELECT count(*) AS n FROM trips"

    checkouts: list[tuple[float, float]] = []  # each pool.acquire's start and end (monotonic)

    async def body(launcher: LocalLauncher) -> list[tuple[int, int, int]]:
        policy = launcher.policies.get("default")
        pool = launcher.executor._pool_for(policy)
        acquire = pool.acquire

        async def timed_acquire() -> Sandbox:
            asked = time.monotonic()
            sandbox = await acquire()
            checkouts.append((asked, time.monotonic()))
            return sandbox

        pool.acquire = timed_acquire  # type: ignore[method-assign]
        seen = []
        for step in range(3):
            if step == 2:
                con = duckdb.connect()
                con.execute(f"COPY (FROM range(1000, 1250) t(i)) TO '{trips}/part-2.parquet'")
                con.close()
            tables = await data.prepare(sql, policy, early=True)
            execution = launcher.executor.execute(sql, policy=policy, tables=tables)
            table = await collect_table(execution)
            in_use = cache.stats().in_use
            seen.append((table.column("n")[0].as_py(), execution.record.reruns, in_use))
        await cache.close()
        # The rerun's queued time is its two waits for a sandbox, not the run thrown away (and
        # the fresh preparation) between its checkouts: counting from the query's start would
        # give at least the first wait plus the whole span between the two checkouts.
        assert len(checkouts) == 4  # one per run: the rerun's two are the last
        (asked_1, got_1), (asked_2, got_2) = checkouts[-2:]
        assert (got_1 - asked_1) + (got_2 - asked_2) <= execution.record.queued_s
        assert execution.record.queued_s < (got_1 - asked_1) + (got_2 - got_1)
        return seen

    # first: listed before it ran; second: early, confirmed; third: early, refuted, run again
    assert run(with_launcher(cached_config, body)) == [(1000, 0, 0), (1000, 0, 0), (1250, 1, 0)]
