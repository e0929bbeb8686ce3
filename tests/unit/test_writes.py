"""Writes: which COPY statements write, whether the policy and catalog let them, the rewrite,
and the hand-over from spooled output to an upload (an in-memory store through constructors),
with the checks of what the sandbox sent before anything is uploaded."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest

from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.data.objectstore import LocalStore, ObjectRef, ObjectStore
from launcher.data.writes import SANDBOX_OUTPUT_DIR, PendingWrite, WritePlan, plan_write, result_ipc
from launcher.errors import (
    ObjectStoreError,
    QueryDeniedError,
    QueryError,
    RunnerInvalidError,
    SqlError,
)
from launcher.model.catalog import Catalog, Connection, parse_catalog
from launcher.model.policy import Policy, load_policy_text
from launcher.model.sql.tables import analyze
from tests.support.parsers import InlineParser

CATALOG = parse_catalog(
    """\
connections:
  lake: {kind: s3, endpoint: "http://127.0.0.1:9"}
  hr: {kind: s3}
  mirror: {kind: s3, endpoint: "http://127.0.0.1:10"}
tables:
  trips: {connection: lake, path: "s3://lake/trips/", format: parquet}
  payroll: {connection: hr, path: "s3://hr-data/payroll/", format: parquet}
  shared_a: {connection: lake, path: "s3://shared/a/", format: parquet}
  shared_b: {connection: mirror, path: "s3://shared/b/", format: parquet}
""",
    "catalog.yaml",
)
BASE = """\
name: t
isolation: query
runtime: runc
limits: {cpus: 1, memory: 1GiB}
"""
WRITER = BASE + (
    "access: {connections: [lake, mirror]}\n"
    'writes: {allowed: true, prefixes: ["s3://lake/out/", "s3://hr-data/out/", "s3://shared/"]}\n'
)


def policy(text: str = WRITER) -> Policy:
    return load_policy_text(text, "t.yaml")


ALLOWED = "COPY (SELECT 1 AS x) TO 's3://lake/out/x.parquet'"


@pytest.mark.parametrize(
    ("sql", "policy_text", "denied"),
    [
        (ALLOWED, WRITER, None),
        ("COPY trips TO 's3://lake/out/a/b.parquet' (FORMAT parquet)", WRITER, None),
        ("COPY trips TO 's3://lake/out/x' WITH (FORMAT 'parquet', COMPRESSION zstd)", WRITER, None),
        ("COPY trips TO 's3://lake/other/x.parquet'", WRITER, "writes only under"),
        ("COPY trips TO 's3://elsewhere/out/x.parquet'", WRITER, "writes only under"),
        ("COPY trips TO 's3://lake/out/../secret/x.parquet'", WRITER, "writes only under"),
        ("COPY trips TO 's3://lake/out/%2e%2e/x.parquet'", WRITER, "writes only under"),
        ("COPY trips TO 's3://lake/outside/x.parquet'", WRITER, "writes only under"),
        ("COPY trips TO 's3://hr-data/out/x.parquet'", WRITER, "may not use connection hr"),
        ("COPY trips TO 's3://shared/x.parquet'", WRITER, "several connections"),
        (ALLOWED, BASE, "writes nothing"),
        (ALLOWED, BASE + "writes: {allowed: false}\n", "writes nothing"),
        (ALLOWED.replace("s3://lake/", "gs://lake/"), WRITER, "only s3://"),
        ("COPY trips TO 's3://lake/out/x.csv'", WRITER, "Parquet"),
        ("COPY trips TO 's3://lake/out/x.parquet' (FORMAT csv)", WRITER, "Parquet"),
        ("COPY trips TO 's3://lake/out/' (FORMAT parquet)", WRITER, "name one object"),
        ("COPY trips TO 's3://lake/out/*.parquet'", WRITER, "name one object"),
        ("COPY trips TO 's3://lake/out/x.parquet' (PARTITION_BY (i))", WRITER, "PARTITION_BY"),
        ("COPY trips TO 's3://lake/out/x.parquet' (PER_THREAD_OUTPUT)", WRITER, "PER_THREAD"),
        ("COPY trips TO E's3://lake/out/x.parquet'", WRITER, "plain single-quoted"),
        ('COPY trips TO "s3://lake/out/x.parquet"', WRITER, "plain single-quoted"),
        (ALLOWED + "; SELECT 1", WRITER, "last statement"),
    ],
)
def test_destination_check(sql: str, policy_text: str, denied: str | None) -> None:
    if denied is None:
        plan = plan_write(analyze(sql), policy(policy_text), CATALOG)
        assert plan is not None and plan.connection == "lake"
        assert plan.destination.startswith("s3://lake/out/")
    else:
        with pytest.raises(QueryDeniedError, match=denied):
            plan_write(analyze(sql), policy(policy_text), CATALOG)


def test_a_bucket_no_connection_holds_is_denied_with_what_to_add() -> None:
    sql = "COPY trips TO 's3://lake/out/x.parquet'"
    with pytest.raises(QueryDeniedError, match="add a table under s3://lake/"):
        plan_write(analyze(sql), policy(), Catalog.EMPTY)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "SELECT 'COPY (SELECT 1) TO ''s3://lake/out/x.parquet'''",
        "COPY trips FROM 's3://lake/out/x.parquet'",
        "COPY (SELECT 1) TO '/scratch/x.parquet'",
        "CREATE TABLE t AS SELECT 1",
    ],
)
def test_statements_that_write_no_object_are_left_alone(sql: str) -> None:
    assert plan_write(analyze(sql), policy(BASE), CATALOG) is None


def test_the_rewrite_replaces_only_the_destination() -> None:
    """A TO inside the query (SIMILAR TO), quotes in the URL, comments and earlier
    statements survive; the destination becomes a fresh /scratch file."""
    sql = (
        "CREATE TEMP TABLE src AS SELECT 1 AS i; -- keep me\n"
        "COPY (SELECT 'a' SIMILAR TO 'a' AS \"to\", 'TO' AS s FROM src) /* c */ "
        "TO 's3://lake/out/it''s.parquet' (FORMAT parquet);"
    )
    plan = plan_write(analyze(sql), policy(), CATALOG)
    assert plan is not None
    assert plan.destination == "s3://lake/out/it's.parquet"
    assert plan.output_path.startswith(SANDBOX_OUTPUT_DIR + "/")
    assert plan.output_path.endswith(".parquet")
    expected = sql.replace("'s3://lake/out/it''s.parquet'", f"'{plan.output_path}'")
    assert plan.sql.split() == expected.split()  # statements are joined by a newline
    statements = duckdb.connect().extract_statements(plan.sql)
    assert [str(s.type).rsplit(".", 1)[-1] for s in statements] == ["CREATE", "COPY"]
    other = plan_write(analyze(sql), policy(), CATALOG)
    assert other is not None and other.output_path != plan.output_path


def test_unparseable_sql_is_a_sql_error() -> None:
    with pytest.raises(SqlError):
        plan_write(analyze("COPY (SELEC 1) TO 's3://lake/out/x.parquet'"), policy(), CATALOG)


@dataclass
class MemoryStore:
    """An ObjectStore keeping uploads in a dict; ``fail`` makes every upload raise."""

    uploads: dict[str, bytes] = field(default_factory=dict)
    source: str = "memory"
    fail: bool = False
    listed: list[str] = field(default_factory=list)

    async def list(self, url: str) -> list[ObjectRef]:
        self.listed.append(url)
        return []

    async def download(self, ref: ObjectRef, dest: Path) -> None:
        raise AssertionError("a write downloads nothing")

    async def upload(self, source: Path, url: str) -> None:
        if self.fail:
            raise ObjectStoreError("S3 upload ... failed (InternalError); nothing was written")
        self.uploads[url] = source.read_bytes()


def count_ipc(rows: int) -> bytes:
    """DuckDB's COPY result as the runner sends it: one row with the row count."""
    table = pa.table({"Count": pa.array([rows], pa.int64())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


PLAN = WritePlan("s3://lake/out/x.parquet", "lake", "COPY ...", "/scratch/duckcell-out/x.parquet")


def test_publish_uploads_the_spooled_output_and_answers_one_row(tmp_path: Path) -> None:
    store = MemoryStore()
    write = PendingWrite(PLAN, store, spool_dir=tmp_path)

    async def body() -> bytes:
        write.accept_result(count_ipc(42))
        for part in (b"PAR1", b"-data-", b"PAR1"):
            await write.accept_output(part)
        return await write.publish()

    result = pa.ipc.open_stream(asyncio.run(body())).read_all()
    assert store.uploads == {PLAN.destination: b"PAR1-data-PAR1"}
    assert result.to_pylist() == [{"Count": 42, "bytes": 14, "destination": PLAN.destination}]
    write.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_upload_says_the_query_ran_but_nothing_was_written(tmp_path: Path) -> None:
    write = PendingWrite(PLAN, MemoryStore(fail=True), spool_dir=tmp_path)

    async def body() -> None:
        write.accept_result(count_ipc(1))
        await write.accept_output(b"PAR1")
        await write.publish()

    with pytest.raises(ObjectStoreError, match="succeeded but its result was not written"):
        asyncio.run(body())
    write.discard()
    assert list(tmp_path.iterdir()) == []


class LandsThenHangs(MemoryStore):
    """The object is written, then the call waits (a PUT whose body went, its answer not)."""

    def __init__(self) -> None:
        super().__init__()
        self.landed = asyncio.Event()

    async def upload(self, source: Path, url: str) -> None:
        await super().upload(source, url)
        self.landed.set()
        await asyncio.Event().wait()


def test_a_write_cancelled_after_its_object_landed_still_drops_stale_listings(
    tmp_path: Path,
) -> None:
    """The cancel comes too late to stop the object: the listings it makes stale must go,
    or this worker would serve a listing without its own write (read-your-writes)."""
    store = LandsThenHangs()
    dropped: list[str] = []
    write = PendingWrite(PLAN, store, spool_dir=tmp_path, uploaded=dropped.append)

    async def body() -> None:
        write.accept_result(count_ipc(1))
        await write.accept_output(b"PAR1")
        publishing = asyncio.create_task(write.publish())
        await store.landed.wait()
        publishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await publishing

    asyncio.run(body())
    assert store.uploads == {PLAN.destination: b"PAR1"} and dropped == [PLAN.destination]
    write.discard()


def test_no_output_from_the_sandbox_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    store = MemoryStore()
    write = PendingWrite(PLAN, store, spool_dir=tmp_path)
    write.accept_result(count_ipc(1))
    with pytest.raises(QueryError, match="duckcell image build"):
        asyncio.run(write.publish())
    assert store.uploads == {}


def test_a_discarded_write_uploads_nothing_and_leaves_no_spool(tmp_path: Path) -> None:
    """What a failed query does: output arrived, then the query failed; release discards."""
    store = MemoryStore()
    write = PendingWrite(PLAN, store, spool_dir=tmp_path)
    asyncio.run(write.accept_output(b"half a file"))
    assert len(list(tmp_path.iterdir())) == 1
    write.discard()
    assert list(tmp_path.iterdir()) == [] and store.uploads == {}


def test_result_ipc_is_one_row() -> None:
    table = pa.ipc.open_stream(result_ipc(3, 99, "s3://b/k")).read_all()
    assert table.schema.names == ["Count", "bytes", "destination"]
    assert table.to_pylist() == [{"Count": 3, "bytes": 99, "destination": "s3://b/k"}]


def test_datapath_refuses_a_write_before_listing_or_building_a_store(tmp_path: Path) -> None:
    made: list[str] = []
    store = MemoryStore()

    def stores(connection: Connection, environ: object) -> ObjectStore:
        made.append(connection.name)
        return store

    cache = ObjectCache(tmp_path, budget_bytes=2**20)
    data = DataPath(CATALOG, cache, parser=InlineParser(), stores=stores)
    with pytest.raises(QueryDeniedError):
        asyncio.run(data.prepare("COPY trips TO 's3://lake/nope/x.parquet'", policy()))
    assert made == [] and store.listed == []
    asyncio.run(data.cache.close())


def test_datapath_hands_the_write_to_the_query(tmp_path: Path) -> None:
    data = DataPath(
        CATALOG,
        ObjectCache(tmp_path, budget_bytes=2**20),
        parser=InlineParser(),
        stores=lambda c, e: MemoryStore(),
    )
    files = asyncio.run(data.prepare("COPY (SELECT 1) TO 's3://lake/out/x.parquet'", policy()))
    assert files.write is not None and files.write.plan.connection == "lake"
    assert files.bindings == ()
    files.release()
    asyncio.run(data.cache.close())


def test_local_store_upload_renames_a_complete_file_into_place(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"x" * 3_000_000)
    dest = tmp_path / "out" / "deep" / "result.parquet"
    asyncio.run(LocalStore().upload(source, str(dest)))
    assert dest.read_bytes() == source.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["result.parquet"]  # no temporary left


def test_local_store_upload_failure_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(b"data")
    dest = tmp_path / "taken"
    (dest / "child").mkdir(parents=True)  # a directory is in the way: the rename fails
    with pytest.raises(ObjectStoreError, match="cannot write local file"):
        asyncio.run(LocalStore().upload(source, str(dest)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin", "taken"]  # no temporary
    assert [p.name for p in dest.iterdir()] == ["child"]


# --- what the sandbox sent, checked before any upload ----------------------------------------


def parquet_file(rows: int) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": list(range(rows))}), sink)
    return sink.getvalue()


def ipc_of(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def spooled(tmp_path: Path, parts: list[bytes], result: bytes, store: MemoryStore) -> PendingWrite:
    write = PendingWrite(PLAN, store, spool_dir=tmp_path)

    async def body() -> None:
        write.accept_result(result)
        for part in parts:
            await write.accept_output(part, max_bytes=1 << 20)

    asyncio.run(body())
    return write


def test_a_checked_write_of_duckdbs_file_and_count_publishes(tmp_path: Path) -> None:
    """The file's first and last bytes are followed across any slicing."""
    data = parquet_file(5)
    for size in (1, 3, 7, len(data)):
        store = MemoryStore()
        parts = [data[i : i + size] for i in range(0, len(data), size)]
        write = spooled(tmp_path, parts, count_ipc(5), store)
        write.check()
        result = pa.ipc.open_stream(asyncio.run(write.publish())).read_all()
        assert result.column("Count").to_pylist() == [5] and store.uploads == {
            PLAN.destination: data
        }
        write.discard()


@pytest.mark.parametrize(
    ("parts", "result", "words"),
    [
        ([b"PAR1 not quite parquet"], count_ipc(1), "not a Parquet file"),
        ([b"PAR1", b"\x00\x00\x01\x00PAR1"], count_ipc(1), "not a Parquet file"),  # footer
        ([b"PAR1PAR1"], count_ipc(1), "not a Parquet file"),  # too short
        ([parquet_file(1)], ipc_of(pa.table({"Count": ["1"]})), "not one row count"),
        ([parquet_file(1)], ipc_of(pa.table({"Count": pa.array([], pa.int64())})), "0 rows"),
        ([parquet_file(1)], ipc_of(pa.table({"Count": [1, 2]})), "2 rows"),
        ([parquet_file(1)], ipc_of(pa.table({"Count": [1], "x": [2]})), "2 columns"),
        ([parquet_file(1)], ipc_of(pa.table({"Count": pa.array([None], pa.int64())})), "count"),
    ],
    ids=["magic", "footer", "short", "string", "no-row", "two-rows", "two-columns", "null"],
)
def test_a_file_or_count_duckdb_does_not_send_is_refused(
    tmp_path: Path, parts: list[bytes], result: bytes, words: str
) -> None:
    store = MemoryStore()
    write = spooled(tmp_path, parts, result, store)
    with pytest.raises(RunnerInvalidError, match=words):
        write.check()
    write.discard()
    assert store.uploads == {}


def test_publish_refuses_a_count_it_cannot_read_before_uploading(tmp_path: Path) -> None:
    """A string Count once raised ValueError after the object was uploaded."""
    store = MemoryStore()
    write = spooled(tmp_path, [parquet_file(1)], ipc_of(pa.table({"Count": ["9"]})), store)
    with pytest.raises(RunnerInvalidError, match="not one row count"):
        asyncio.run(write.publish())
    write.discard()
    assert store.uploads == {}


def test_the_spool_holds_no_more_than_the_sandboxs_scratch(tmp_path: Path) -> None:
    store = MemoryStore()
    write = PendingWrite(PLAN, store, spool_dir=tmp_path)

    async def body() -> None:
        await write.accept_output(b"x" * 600, max_bytes=1000)
        with pytest.raises(RunnerInvalidError, match="more than 1000 bytes, larger than"):
            await write.accept_output(b"x" * 401, max_bytes=1000)

    asyncio.run(body())
    assert write.size == 600  # the excess was never spooled
    write.discard()
    assert list(tmp_path.iterdir()) == []


def test_a_copy_result_larger_than_duckdbs_is_refused(tmp_path: Path) -> None:
    write = PendingWrite(PLAN, MemoryStore(), spool_dir=tmp_path)
    write.accept_result(b"x" * 60_000)
    with pytest.raises(RunnerInvalidError, match="COPY result of more than"):
        write.accept_result(b"x" * 10_000)
