"""A session reads new catalog tables at any query, and still nothing else (real Docker).

A session's sandbox is locked to its own directory, its only view of the cache
(``launcher.sandbox.files``); the launcher links each query's cached files there. These tests
are the hostile probes the design rests on: if DuckDB in the image ever let ``..`` out of an
allowed directory, ``test_a_session_reads_what_it_binds_and_nothing_else`` fails.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import duckdb
import pytest

from launcher.config import LauncherConfig
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.errors import QueryError
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.model.catalog import load_catalog
from launcher.sandbox.sessions import Session
from tests.support.parsers import InlineParser

from .conftest import make_config, run, with_launcher

pytestmark = pytest.mark.docker

CATALOG = """\
connections:
  samples: {kind: local}
tables:
  trips: {connection: samples, path: trips.parquet, format: parquet}
  payroll: {connection: samples, path: payroll.parquet, format: parquet}
  secrets: {connection: samples, path: secrets.parquet, format: parquet}
"""
DENIED = "Permission Error"


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    con = duckdb.connect()
    con.execute(f"COPY (FROM range(0, 1000) t(i)) TO '{data}/trips.parquet'")
    con.execute(f"COPY (SELECT 'alice' AS who, 250000 AS salary) TO '{data}/payroll.parquet'")
    con.execute(f"COPY (SELECT 'hunter2' AS password) TO '{data}/secrets.parquet'")
    con.close()
    (data / "catalog.yaml").write_text(CATALOG)
    return data / "catalog.yaml"


async def _gone(path: Path, timeout_s: float = 20.0) -> bool:
    """Sandboxes are destroyed off the critical path: wait for the directory to go."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while path.exists() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    return not path.exists()


def test_a_session_reads_what_it_binds_and_nothing_else(
    cached_config: LauncherConfig, catalog_file: Path
) -> None:
    """In one session, table A then table B are both readable (the old lock refused B). The
    cache's other files, another session's directory, ``..``/``//``/``./``/URL-encoded and
    ``file:`` tricks, globs over the cache, and writes into the session directory are refused;
    closing the session removes its directory."""
    assert cached_config.cache_dir is not None
    cache_root = cached_config.cache_dir
    # A dead launcher's leftover session directory: removed when a launcher starts.
    stale = cache_root / ".sandboxes" / "0123456789abcdef" / "fedcba9876543210"
    stale.mkdir(parents=True)
    cache = ObjectCache(cache_root, budget_bytes=64 * 2**20)
    data = DataPath(load_catalog(catalog_file), cache, parser=InlineParser())

    async def body(launcher: LocalLauncher) -> None:
        assert not stale.parent.exists()

        async def query(session: Session, sql: str, reads: str = "") -> list[dict[str, object]]:
            tables = await data.prepare(reads or sql, session.policy)
            execution = launcher.executor.execute(sql, session_id=session.session_id, tables=tables)
            return (await collect_table(execution)).to_pylist()

        async def refused(session: Session, sql: str, match: str = DENIED) -> None:
            with pytest.raises(QueryError, match=match):
                await query(session, sql, "SELECT 1")

        first = await launcher.open_session("tight-session")
        other = await launcher.open_session("tight-session")
        try:
            mine = first.sandbox.files
            theirs = other.sandbox.files
            assert mine is not None and theirs is not None and mine.host.is_dir()
            # (1) table A, then table B in a later query, then both.
            assert await query(first, "SELECT count(*) AS n FROM trips") == [{"n": 1000}]
            assert await query(first, "SELECT who FROM payroll") == [{"who": "alice"}]
            both = "SELECT (SELECT count(*) FROM trips) AS n, (SELECT who FROM payroll) AS who"
            assert await query(first, both) == [{"n": 1000, "who": "alice"}]
            # The other session binds `secrets`: its file is now in the cache and in its dir.
            assert await query(other, "SELECT password FROM secrets") == [{"password": "hunter2"}]
            async with await data.prepare("FROM secrets", other.policy) as files:
                secret = files.bindings[0].paths[0]  # /cache/objects/ab/<name>.parquet
            relative = secret.removeprefix("/cache/")
            name = secret.rsplit("/", 1)[-1]
            linked_elsewhere = f"{theirs.sandbox}/{name}"
            assert (theirs.host / name).exists()
            up = mine.sandbox + "/.."  # back to /cache
            # (2) the cache's other files, by path, traversal, glob or URL.
            for probe in (
                f"read_parquet('{secret}')",
                f"read_parquet('{up}/{relative}')",
                f"read_parquet('{mine.sandbox}/./../{relative}')",
                f"read_parquet('{mine.sandbox}//../{relative}')",
                f"read_parquet('{mine.sandbox}/{name}/../../{relative}')",
                f"read_parquet('file://{secret}')",
                f"read_parquet('file:{up}/{relative}')",
                "glob('/cache/**')",
                "glob('/cache/*')",
                "glob('/cache/objects/**')",
                f"glob('{up}/**')",
                "glob('/cache/.sandboxes/**')",
                "read_parquet('/cache/objects/*/*.parquet')",
                f"read_text('{up}/{relative}')",
                f"read_blob('{secret}')",
            ):
                await refused(first, f"SELECT * FROM {probe}")
            await refused(
                first,
                f"SELECT * FROM read_parquet('{mine.sandbox}/%2e%2e/{relative}')",
                match=f"{DENIED}|No files found",
            )
            # (3) another session's files: the same path in this sandbox is not there (each
            # sandbox has its own /cache/files), and no path leads out of our own directory.
            await refused(
                first, f"SELECT * FROM read_parquet('{linked_elsewhere}')", match="No files found"
            )
            await refused(
                first, f"SELECT * FROM read_parquet('{mine.sandbox}/../{theirs.host.name}/{name}')"
            )
            # Our own directory lists only what this session bound (trips, payroll).
            listed = await query(first, f"SELECT file FROM glob('{mine.sandbox}/*')")
            assert len(listed) == 2 and all(name not in row["file"] for row in listed)
            # (4) the session directory is read-only in the sandbox.
            for write in (
                f"COPY (SELECT 1 AS x) TO '{mine.sandbox}/planted.parquet'",
                f"COPY (SELECT 1 AS x) TO '{mine.sandbox}/../planted.parquet'",
            ):
                with pytest.raises(QueryError, match=r"Read-only file system|Permission Error"):
                    await query(first, write, "SELECT 1")
            assert sorted(p.name for p in mine.host.iterdir()) == sorted(
                row["file"].rsplit("/", 1)[-1] for row in listed
            )
            # Earlier views still work after all those failures.
            assert await query(first, both) == [{"n": 1000, "who": "alice"}]
        finally:
            launcher.close_session(first.session_id)
            launcher.close_session(other.session_id)
        # (5) the directories go with the sessions.
        assert await _gone(mine.host) and await _gone(theirs.host)
        await cache.close()

    run(with_launcher(cached_config, body))


def test_a_session_attaches_in_memory_databases_and_names_tables_as_clients_see_them(
    cached_config: LauncherConfig, catalog_file: Path
) -> None:
    """In a real session sandbox: ``ATTACH ':memory:' AS name`` works (and DETACH), a file
    ATTACH in the session's own directory is refused; ``duckcell.main.trips`` (the catalog
    name Flight SQL shows) reads the bound table, per query and in the session."""
    assert cached_config.cache_dir is not None
    cache = ObjectCache(cached_config.cache_dir, budget_bytes=64 * 2**20)
    data = DataPath(load_catalog(catalog_file), cache, parser=InlineParser())

    async def body(launcher: LocalLauncher) -> None:
        async def rows(sql: str, session: Session | None = None) -> list[dict[str, object]]:
            policy = session.policy if session else launcher.policies.get("default")
            tables = await data.prepare(sql, policy)
            execution = launcher.executor.execute(
                sql,
                policy=None if session else policy,
                session_id=session and session.session_id,
                tables=tables,
            )
            return (await collect_table(execution)).to_pylist()

        n = "SELECT count(*) AS n FROM duckcell.main.trips"
        assert await rows(n) == [{"n": 1000}]
        session = await launcher.open_session("tight-session")
        try:
            assert await rows(n, session) == [{"n": 1000}]
            await rows("ATTACH ':memory:' AS pad", session)
            await rows("CREATE TABLE pad.notes AS SELECT 7 AS k", session)
            assert await rows("SELECT k FROM pad.notes", session) == [{"k": 7}]
            await rows("DETACH pad", session)
            files = session.sandbox.files
            assert files is not None
            with pytest.raises(QueryError, match="may only ATTACH ':memory:'"):
                await rows(f"ATTACH '{files.sandbox}/x.db' AS f", session)
        finally:
            launcher.close_session(session.session_id)
        await cache.close()

    run(with_launcher(cached_config, body))


def test_a_session_without_a_cache_keeps_the_first_query_lock(
    image: str, policies_dir: Path
) -> None:
    """No cache directory, no files directory: the runner keeps the exact first-query lock."""
    config = make_config(image, policies_dir)

    async def body(launcher: LocalLauncher) -> None:
        session = await launcher.open_session("tight-session")
        try:
            assert session.sandbox.files is None
            execution = launcher.executor.execute(
                "SELECT * FROM glob('/cache/**')", session_id=session.session_id
            )
            with pytest.raises(QueryError, match=DENIED):
                await collect_table(execution)
        finally:
            launcher.close_session(session.session_id)

    run(with_launcher(config, body))


def test_a_session_query_prepared_early_waits_for_fresh_files(
    cached_config: LauncherConfig, catalog_file: Path
) -> None:
    """A session's sandbox keeps state between queries, so an early-prepared session query
    never runs on a listing the fresh LIST refutes: it is prepared again first and runs once,
    on the new file (a temp table it creates holds the new rows, not the old ones)."""
    assert cached_config.cache_dir is not None
    cache = ObjectCache(cached_config.cache_dir, budget_bytes=64 * 2**20)
    data = DataPath(load_catalog(catalog_file), cache, parser=InlineParser())
    trips = catalog_file.parent / "trips.parquet"

    async def body(launcher: LocalLauncher) -> tuple[list[dict[str, object]], int]:
        session = await launcher.open_session("tight-session")
        try:
            (await data.prepare("FROM trips", session.policy, early=True)).release()
            con = duckdb.connect()
            con.execute(f"COPY (FROM range(0, 5) t(i)) TO '{trips}'")  # replaced: new ETag
            con.close()
            sql = "CREATE TEMP TABLE kept AS FROM trips; SELECT count(*) AS n FROM kept"
            tables = await data.prepare(sql, session.policy, early=True)
            execution = launcher.executor.execute(sql, session_id=session.session_id, tables=tables)
            rows = (await collect_table(execution)).to_pylist()
            return rows, execution.record.reruns
        finally:
            launcher.sessions.close(session.session_id)
            await cache.close()

    assert run(with_launcher(cached_config, body)) == ([{"n": 5}], 1)
