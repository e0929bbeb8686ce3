"""The real ADBC Flight SQL driver end to end: ADBC -> Flight SQL server -> control plane ->
mTLS tunnel -> worker -> executor -> in-process sandboxes (real runners, real DuckDB).

The control plane runs on its own loop in a thread (``tests.support.flight``), the worker
and its sandboxes (``FakeBackend``) on the test's loop, and the ADBC driver, which blocks, in
``asyncio.to_thread``, so nothing waits for itself. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import adbc_driver_manager
import flightsql
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest
from flightsql import FlightSQLClient

from launcher.controlplane.datadir import ControlPlaneData
from tests.support.controlplane import DEADLINE_S
from tests.support.flight import FlightControlPlane, adbc_connect, in_thread
from tests.support.querystack import LONG_SQL, Stack, stack
from tests.support.waiting import eventually, run

T = TypeVar("T")
# Streams rows until something stops it (the policy's statement timeout is 2 s).
ENDLESS_SQL = "SELECT i FROM range(1000000000000) t(i)"


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[FlightControlPlane]:
    cp = FlightControlPlane(ControlPlaneData(tmp_path / "cp"))
    try:
        yield cp
    finally:
        cp.close()


def fetch(
    cp: FlightControlPlane, api_key: str | None, sql: str, *args: object, **options: str
) -> pa.Table:
    """Connect, run ``sql`` with ``args`` as its parameters, fetch the whole result as Arrow
    (blocking: call in a thread)."""
    with adbc_connect(cp, api_key, **options) as conn, conn.cursor() as cursor:
        cursor.execute(sql, args or None)
        return cursor.fetch_arrow_table()


def test_select_42_and_get_info_through_the_whole_chain(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            table = await in_thread(fetch, control_plane, s.api_key, "SELECT 42 AS answer")
            assert table.to_pylist() == [{"answer": 42}]

            def info() -> dict[str, object]:
                with adbc_connect(control_plane, s.api_key) as conn:
                    return dict(conn.adbc_get_info())

            found = await in_thread(info)
            assert found["vendor_name"] == "duckcell"
            assert found["vendor_arrow_version"] == pa.__version__
            assert [r.outcome for r in s.records] == ["ok"]

    run(scenario)


TYPES_SQL = """
SELECT
    -7::TINYINT AS i8, 300::SMALLINT AS i16, 70000::INTEGER AS i32, 9000000000::BIGINT AS i64,
    255::UTINYINT AS u8, 18446744073709551615::UBIGINT AS u64,
    12345.678::DECIMAL(18, 3) AS dec, 1.5::DOUBLE AS f64, 0.25::FLOAT AS f32,
    'ünïcødé ✓ 🦆' AS txt, '\\xAA\\x00\\xFF'::BLOB AS bin, true AS flag,
    DATE '2024-02-29' AS d, TIME '13:45:30.123456' AS t,
    TIMESTAMP '2024-01-02 03:04:05.678901' AS ts,
    TIMESTAMPTZ '2024-01-02 03:04:05+00' AS tstz,
    INTERVAL 14 MONTH + INTERVAL 3 DAY + INTERVAL 5 SECOND AS iv,
    '5b6c1c5e-0d56-4a0b-9f4e-6b7c8d9e0f10'::UUID AS id,
    [1, 2, NULL] AS lst, {'a': 1, 'b': 'x'} AS st, MAP {'k': 1, 'l': 2} AS mp,
    NULL::INTEGER AS nul
"""


def test_common_duckdb_types_round_trip_with_their_arrow_types(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            table = await in_thread(fetch, control_plane, s.api_key, TYPES_SQL)
            types = {field.name: field.type for field in table.schema}
            row = table.to_pylist()[0]
            assert types["i8"] == pa.int8() and row["i8"] == -7
            assert types["i16"] == pa.int16() and row["i16"] == 300
            assert types["i32"] == pa.int32() and row["i32"] == 70000
            assert types["i64"] == pa.int64() and row["i64"] == 9_000_000_000
            assert types["u8"] == pa.uint8() and types["u64"] == pa.uint64()
            assert row["u64"] == 2**64 - 1
            assert types["dec"] == pa.decimal128(18, 3)
            assert row["dec"] == decimal.Decimal("12345.678")
            assert types["f64"] == pa.float64() and row["f64"] == 1.5
            assert types["f32"] == pa.float32() and row["f32"] == 0.25
            assert row["txt"] == "ünïcødé ✓ 🦆" and row["bin"] == b"\xaa\x00\xff"
            assert row["flag"] is True and row["d"] == dt.date(2024, 2, 29)
            assert types["t"] == pa.time64("us") and row["t"] == dt.time(13, 45, 30, 123456)
            assert types["ts"] == pa.timestamp("us")
            assert row["ts"] == dt.datetime(2024, 1, 2, 3, 4, 5, 678901)
            assert types["tstz"].tz is not None
            assert row["tstz"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
            assert types["iv"] == pa.month_day_nano_interval()
            assert row["iv"] == pa.MonthDayNano([14, 3, 5_000_000_000])
            assert uuid.UUID(bytes=_uuid_bytes(row["id"])) == uuid.UUID(
                "5b6c1c5e-0d56-4a0b-9f4e-6b7c8d9e0f10"
            )
            assert row["lst"] == [1, 2, None] and row["st"] == {"a": 1, "b": "x"}
            assert types["mp"] == pa.map_(pa.string(), pa.int32())
            assert row["mp"] == [("k", 1), ("l", 2)]
            assert row["nul"] is None

    run(scenario)


def _uuid_bytes(value: object) -> bytes:
    """DuckDB sends UUIDs as 16 bytes (arrow.uuid extension) or as text, by setting."""
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, bytes):
        return value
    return uuid.UUID(str(value)).bytes


def test_a_sql_error_reaches_the_client_with_duckdbs_message(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            with pytest.raises(adbc_driver_manager.Error, match="no_such_table does not exist"):
                await in_thread(fetch, control_plane, s.api_key, "SELECT * FROM no_such_table")
            with pytest.raises(adbc_driver_manager.ProgrammingError) as failed:
                await in_thread(fetch, control_plane, s.api_key, "SELEC 1")
            invalid = adbc_driver_manager.AdbcStatusCode.INVALID_ARGUMENT
            assert failed.value.status_code == invalid
            # DuckDB's message first; pyarrow's traceback after it shows no handler internals.
            message, _, detail = str(failed.value).partition(". Detail:")
            assert "syntax error" in message
            assert "service.py" not in detail

    run(scenario)


def test_a_wrong_or_missing_key_is_unauthenticated(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            key_id = s.api_key.split(".")[1]
            for key in [f"dck1.{key_id}.{'x' * 43}", "nonsense", None]:
                with pytest.raises(adbc_driver_manager.Error, match="UNAUTHENTICATED"):
                    await in_thread(fetch, control_plane, key, "SELECT 1")
            assert s.records == []  # nothing reached the worker

    run(scenario)


def test_basic_auth_with_the_key_as_password(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            key_id = s.api_key.split(".")[1]
            basic = {"username": key_id, "password": s.api_key}
            table = await in_thread(fetch, control_plane, None, "SELECT 1 AS one", **basic)
            assert table.to_pylist() == [{"one": 1}]
            wrong = {"username": key_id, "password": f"dck1.{key_id}.{'y' * 43}"}
            with pytest.raises(adbc_driver_manager.Error, match="UNAUTHENTICATED"):
                await in_thread(fetch, control_plane, None, "SELECT 1", **wrong)

    run(scenario)


def test_tls_is_verified_against_the_control_planes_ca(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            assert control_plane.location.startswith("grpc+tls://")
            other_ca = ControlPlaneData(tmp_path / "other").ca().cert_pem().decode()
            roots = {"adbc.flight.sql.client_option.tls_root_certs": other_ca}
            with pytest.raises(adbc_driver_manager.Error, match=r"certificate|UNAVAILABLE"):
                await in_thread(fetch, control_plane, s.api_key, "SELECT 1", **roots)

    run(scenario)


def test_no_worker_online_is_unavailable(control_plane: FlightControlPlane, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path, worker=False) as s:
            with pytest.raises(adbc_driver_manager.Error, match=r"no worker online.*Unavailable"):
                await in_thread(fetch, control_plane, s.api_key, "SELECT 1")

    run(scenario)


def test_parameters_are_bound_in_the_sandbox(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            sql = "SELECT ? + 1 AS n, ?::VARCHAR AS s"
            table = await in_thread(fetch, control_plane, s.api_key, sql, 41, "x")
            assert table.to_pylist() == [{"n": 42, "s": "x"}]
            assert [r.outcome for r in s.records] == ["ok"]

    run(scenario)


def test_without_a_catalog_metadata_lists_one_empty_schema(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:

            def objects() -> pa.Table:
                with adbc_connect(control_plane, s.api_key) as conn:
                    return conn.adbc_get_objects(depth="all").read_all()

            (catalog,) = (await in_thread(objects)).to_pylist()
            assert catalog["catalog_name"] == "duckcell"
            (schema,) = catalog["catalog_db_schemas"]
            assert schema["db_schema_name"] == "main" and not schema["db_schema_tables"]

    run(scenario)


def test_cancelling_a_running_statement_cancels_the_query_and_frees_the_sandbox(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    """An aggregate sends its schema only when it is done, so ADBC's ``execute`` is still
    waiting in GetFlightInfo when it is cancelled: the server notices and cancels the query."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            with adbc_connect(control_plane, s.api_key) as conn, conn.cursor() as cursor:
                executing = asyncio.create_task(in_thread(cursor.execute, LONG_SQL))
                await s.until_running()
                await in_thread(cursor.adbc_cancel)
                with pytest.raises(adbc_driver_manager.Error, match=r"(?i)cancel"):
                    await asyncio.wait_for(executing, DEADLINE_S)
            await _until_cancelled(s)
            table = await in_thread(fetch, control_plane, s.api_key, "SELECT 42 AS x")
            assert table.to_pylist() == [{"x": 42}]

    run(scenario)


def test_leaving_a_streaming_result_early_cancels_the_query(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    """A client that reads one batch of an endless result and then closes its reader (the
    DoGet stream is cancelled) frees the sandbox long before the statement timeout."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:

            def one_batch_then_leave() -> int:
                with adbc_connect(control_plane, s.api_key) as conn, conn.cursor() as cursor:
                    cursor.execute(ENDLESS_SQL)
                    reader = cursor.fetch_record_batch()
                    rows = reader.read_next_batch().num_rows
                    reader.close()
                    return rows

            assert await in_thread(one_batch_then_leave) > 0
            await _until_cancelled(s)

    run(scenario)


async def _until_cancelled(s: Stack) -> None:
    await eventually(lambda: len(s.records) == 1, "the worker ended its query")
    assert s.records[0].outcome == "cancelled"
    await eventually(lambda: s.host.executor.running() == [], "the sandbox was freed")


def test_a_million_row_result_arrives_complete(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            sql = "SELECT i, i * 2 AS j FROM range(1000000) t(i)"
            table = await in_thread(fetch, control_plane, s.api_key, sql)
            assert table.num_rows == 1_000_000
            assert pc.sum(table.column("i")).as_py() == 999_999 * 1_000_000 // 2
            assert [r.outcome for r in s.records] == ["ok"]

    run(scenario)


def test_flightsql_dbapi_smoke(control_plane: FlightControlPlane, tmp_path: Path) -> None:
    """The other Python Flight SQL client: plain statements, no prepare, bearer token; without
    a token it sends ``Bearer None``, which is refused."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            port = int(control_plane.location.rpartition(":")[2])
            ca_pem = control_plane.data.ca().cert_pem()

            def rows(token: str | None) -> list[tuple[object, ...]]:
                client = FlightSQLClient(
                    host="127.0.0.1", port=port, token=token, tls_root_certs=ca_pem
                )
                with flightsql.connect(client) as conn:
                    cursor = conn.cursor()
                    cursor.execute("SELECT 42 AS answer, 'duck' AS name")
                    return [tuple(row) for row in cursor.fetchall()]

            assert await in_thread(rows, s.api_key) == [(42, "duck")]
            with pytest.raises(flight.FlightUnauthenticatedError, match="malformed"):
                await in_thread(rows, None)

    run(scenario)


def test_plaintext_on_loopback_when_asked_for(tmp_path: Path) -> None:
    cp = FlightControlPlane(ControlPlaneData(tmp_path / "cp"), plaintext=True)

    async def scenario() -> None:
        async with stack(cp, tmp_path) as s:
            assert cp.location.startswith("grpc+tcp://127.0.0.1:")
            table = await in_thread(fetch, cp, s.api_key, "SELECT 'clear' AS x")
            assert table.to_pylist() == [{"x": "clear"}]

    try:
        run(scenario)
    finally:
        cp.close()


def test_concurrent_adbc_clients_each_get_their_own_result(
    control_plane: FlightControlPlane, tmp_path: Path
) -> None:
    """Many handler threads bridging to one control-plane loop at once: no result crosses to
    another client, none stalls."""

    async def scenario() -> None:
        async with stack(control_plane, tmp_path) as s:
            sqls = [
                f"SELECT {n} AS n, count(*) AS c FROM range({n * 1000}) t(i)" for n in range(16)
            ]
            tables = await asyncio.gather(
                *(in_thread(fetch, control_plane, s.api_key, sql) for sql in sqls)
            )
            for n, table in enumerate(tables):
                assert table.to_pylist() == [{"n": n, "c": n * 1000}]
            assert len(s.records) == 16 and {r.outcome for r in s.records} == {"ok"}

    run(scenario)
