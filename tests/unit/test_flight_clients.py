"""What a connection can do, with the real clients from PyPI over TLS, on a session-mode role
(``notebook``) and a per-query one (``analyst``): session options, transactions, bulk ingest,
pandas and polars over ADBC.

The stack is ``tests.support.flightstack``'s (the real ``FlightSqlServer``; an in-process
DuckDB plays the worker, a session is one DuckDB connection kept open).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import adbc_driver_flightsql.dbapi as adbc_flightsql
import adbc_driver_manager
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from adbc_driver_flightsql import DatabaseOptions

from launcher.flight.updates import MAX_PARAMETER_ROWS
from tests.support.altertable import run_client
from tests.support.flightstack import SESSION_ROLE, FlightStack, flight_stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FlightStack]:
    yield from flight_stack(tmp_path)


def connect(stack: FlightStack, role: str, *, autocommit: bool) -> adbc_flightsql.Connection:
    """ADBC with username/password: a handshake, then its token (one connection)."""
    db_kwargs = {
        DatabaseOptions.TLS_ROOT_CERTS.value: stack.ca_pem.decode(),
        "username": "anyone",
        "password": f"dck1.{role}",
    }
    return adbc_flightsql.connect(stack.server.location, db_kwargs=db_kwargs, autocommit=autocommit)


def rows(cursor: adbc_flightsql.Cursor, sql: str) -> list[tuple[object, ...]]:
    cursor.execute(sql)
    return cursor.fetchall()


def test_adbc_without_autocommit_commits_and_rolls_back_in_the_session(
    stack: FlightStack,
) -> None:
    with connect(stack, SESSION_ROLE, autocommit=False) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE kept (n INTEGER)")
        cursor.execute("INSERT INTO kept VALUES (1), (2)")
        assert cursor.rowcount == 2
        conn.commit()
        cursor.execute("INSERT INTO kept VALUES (3)")
        conn.rollback()
        assert rows(cursor, "SELECT sum(n)::INTEGER FROM kept") == [(3,)]
    sent = [call.sql for call in stack.router.calls]
    assert sent.count("BEGIN TRANSACTION") >= 2 and "COMMIT" in sent and "ROLLBACK" in sent


def test_adbc_without_autocommit_on_a_per_query_role_is_refused(stack: FlightStack) -> None:
    """SqlInfo tells the driver this caller has no transactions (nothing outlives a
    statement), so it refuses to turn autocommit off."""
    with (
        pytest.warns(Warning, match="Cannot disable autocommit"),
        connect(stack, "analyst", autocommit=False) as conn,
    ):
        assert conn.adbc_get_info()["vendor_name"] == "duckcell"
        with pytest.raises(adbc_driver_manager.NotSupportedError, match="transaction"):
            conn.adbc_connection.set_autocommit(False)


def test_adbc_ingest_in_every_mode_and_pandas_and_polars(stack: FlightStack) -> None:
    with connect(stack, SESSION_ROLE, autocommit=True) as conn, conn.cursor() as cursor:
        table = pa.table({"id": [1, 2], "zone": ["n", None]})
        assert cursor.adbc_ingest("loaded", table, mode="create") == 2
        with pytest.raises(adbc_driver_manager.ProgrammingError, match="already exists"):
            cursor.adbc_ingest("loaded", table, mode="create")
        assert cursor.adbc_ingest("loaded", table.slice(0, 1), mode="append") == 1
        assert cursor.adbc_ingest("loaded", table, mode="create_append") == 2
        assert rows(cursor, "SELECT count(*)::INTEGER FROM loaded") == [(5,)]
        assert cursor.adbc_ingest("loaded", table.slice(1), mode="replace") == 1
        assert rows(cursor, "SELECT id, zone FROM loaded") == [(2, None)]
        assert cursor.adbc_ingest("scratch", table, mode="create", temporary=True) == 2
        assert rows(cursor, "SELECT count(*)::INTEGER FROM temp.main.scratch") == [(2,)]
        # pandas and polars over the same ADBC connection: their bulk paths are adbc_ingest.
        assert pd.DataFrame({"p": [1, 2, 3]}).to_sql("from_pandas", conn, index=False) == 3
        assert pd.read_sql("SELECT p FROM from_pandas", conn)["p"].tolist() == [1, 2, 3]
        frame = pl.DataFrame({"q": [4, 5]})
        assert frame.write_database("from_polars", conn, engine="adbc") == 2
        assert pl.read_database("SELECT q FROM from_polars", conn)["q"].to_list() == [4, 5]


def test_ingest_on_a_per_query_role_says_why_not(stack: FlightStack) -> None:
    with connect(stack, "analyst", autocommit=True) as conn, conn.cursor() as cursor:
        with pytest.raises(adbc_driver_manager.NotSupportedError, match="needs a session"):
            cursor.adbc_ingest("loaded", pa.table({"id": [1]}), mode="create")
        # pandas reads over ADBC on a per-query role as before.
        assert pd.read_sql("SELECT id FROM trips ORDER BY id", conn)["id"].tolist() == [1, 2, 3]


def test_adbc_session_options_are_the_advertised_catalog_and_schema(stack: FlightStack) -> None:
    for role in (SESSION_ROLE, "analyst"):
        with connect(stack, role, autocommit=True) as conn:
            assert conn.adbc_current_catalog == "duckcell"
            assert conn.adbc_current_db_schema == "main"
            conn.adbc_current_catalog = "duckcell"
            conn.adbc_current_db_schema = "main"
            with pytest.raises(adbc_driver_manager.Error, match=r"INVALID_VALUE|invalid"):
                conn.adbc_current_db_schema = "elsewhere"


def test_a_session_uses_another_catalog_and_comes_back_home(stack: FlightStack) -> None:
    """In a session, catalog = an attached in-memory database runs USE there; catalog =
    duckcell again runs USE back to the session's own database (it is not just recorded)."""
    with connect(stack, SESSION_ROLE, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("ATTACH ':memory:' AS pad")
        conn.adbc_current_catalog = "pad"
        cursor.execute("CREATE TABLE there AS SELECT 1 AS n")
        assert rows(cursor, "SELECT current_database()") == [("pad",)]
        conn.adbc_current_catalog = "duckcell"
        assert conn.adbc_current_catalog == "duckcell"
        assert rows(cursor, "SELECT current_database(), current_schema()") == [("memory", "main")]
        assert rows(cursor, "SELECT n FROM pad.there") == [(1,)]


def test_the_altertable_client_options_transactions_and_ingest(
    stack: FlightStack, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(stack.ca_pem)
    script = [
        ["options", {"catalog": "duckcell", "schema": "main"}],
        ["options", {"catalog": "duckcell", "compute_size": "L", "schema": "nowhere"}],
        ["begin"],
        ["execute", "CREATE TABLE t (n INTEGER)"],
        ["execute", "INSERT INTO t VALUES (1), (2)"],
        ["commit"],
        ["begin"],
        ["execute", "INSERT INTO t VALUES (3)"],
        ["rollback"],
        ["query", "SELECT sum(n)::INTEGER AS s FROM t"],
        ["ingest", "x", "CREATE", [{"a": 1, "b": "u"}, {"a": 2, "b": None}]],
        ["ingest", "x", "CREATE", [{"a": 3, "b": "w"}]],
        ["ingest", "x", "APPEND", [{"a": 3, "b": "w"}]],
        ["ingest", "x", "CREATE_APPEND", [{"a": 4, "b": "w"}]],
        ["query", "SELECT count(*)::INTEGER AS c FROM x"],
        ["ingest", "x", "REPLACE", [{"a": 9, "b": "r"}]],
        ["query", "SELECT a, b FROM x"],
        ["catalogs"],
        ["schemas"],
        # Prepared statements: parameters bound after GetFlightInfo (this client's order).
        ["prepare", "SELECT ?::INTEGER + 1 AS y", [41]],
        ["prepare", "SELECT ?::INTEGER + 1 AS y", {"any": 41}],
        ["prepare", "SELECT $id::INTEGER + $step AS y, $id AS id", {"step": 1, "id": 41}],
        ["prepare", "SELECT ?::INTEGER + 1 AS y", {"arrow": {"v": [41]}}],
        ["prepare", "SELECT $id::INTEGER AS y", {"other": 1}],
    ]
    answers = run_client(ca_file, stack.server.port, f"dck1.{SESSION_ROLE}", script)
    assert answers[0] == {"ok": None}
    # Per option: the unknown one and the value it cannot take; the catalog was set.
    assert "compute_size: INVALID_NAME" in answers[1]["error"]
    assert "schema: INVALID_VALUE" in answers[1]["error"] and "catalog" not in answers[1]["error"]
    assert answers[2:9] == [
        {"ok": None},
        {"ok": 0},
        {"ok": 2},
        {"ok": None},
        {"ok": None},
        {"ok": 1},
        {"ok": None},
    ]
    assert answers[9] == {"ok": [{"s": 3}]}
    assert answers[10] == {"ok": None} and "already exists" in answers[11]["error"]
    assert answers[12:15] == [{"ok": None}, {"ok": None}, {"ok": [{"c": 4}]}]
    assert answers[15:17] == [{"ok": None}, {"ok": [{"a": 9, "b": "r"}]}]
    # The session's own tables (t, x) live in DuckDB's database "memory": listed too.
    assert answers[17] == {"ok": [{"catalog_name": "duckcell"}, {"catalog_name": "memory"}]}
    assert answers[18] == {
        "ok": [
            {"catalog_name": "duckcell", "db_schema_name": "main"},
            {"catalog_name": "memory", "db_schema_name": "main"},
        ]
    }
    assert answers[19:23] == [{"ok": [{"y": 42}]}] * 2 + [
        {"ok": [{"y": 42, "id": 41}]},
        {"ok": [{"y": 42}]},
    ]
    assert "no value bound for parameter $id" in answers[23]["error"]
    refused = run_client(ca_file, stack.server.port, "dck1.analyst", [["begin"], script[10]])
    assert "transactions need a session" in refused[0]["error"]
    assert "nothing outlives a statement" in refused[0]["error"]
    assert "bulk ingest needs a session" in refused[1]["error"]


def test_adbc_executemany_runs_every_set_in_the_session(stack: FlightStack) -> None:
    with connect(stack, SESSION_ROLE, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE many (n INTEGER, s VARCHAR)")
        cursor.executemany("INSERT INTO many VALUES (?, ?)", [(1, "a"), (2, None), (3, "c")])
        assert rows(cursor, "SELECT n, s FROM many ORDER BY n") == [(1, "a"), (2, None), (3, "c")]
        # Named placeholders take the bound columns by name, whatever their order.
        batch = pa.record_batch({"b": [2], "a": [40]})
        cursor.execute("SELECT $a::INTEGER + $b::INTEGER AS total", parameters=batch)
        assert cursor.fetchall() == [(42,)]
    with (
        connect(stack, "analyst", autocommit=True) as conn,
        conn.cursor() as cursor,
        pytest.raises(adbc_driver_manager.NotSupportedError, match="sessions only"),
    ):
        cursor.executemany("SELECT ?", [(1,), (2,)])


def test_uploads_past_their_bounds_are_refused_while_they_are_read(stack: FlightStack) -> None:
    """Parameter sets and ingests are read batch by batch and refused past their caps (rows,
    bytes), so one call cannot make the control plane hold an upload of any size."""
    with connect(stack, SESSION_ROLE, autocommit=True) as conn, conn.cursor() as cursor:
        too_many = [(n,) for n in range(MAX_PARAMETER_ROWS + 1)]
        with pytest.raises(adbc_driver_manager.Error, match="bind at most 10000"):
            cursor.executemany("SELECT ?", too_many)
        one = pa.record_batch({"0": pa.array([b"x" * (1 << 20)], pa.binary())})
        wide = pa.Table.from_batches([one] * 17)  # 17 messages of 1 MiB: each under gRPC's cap
        with pytest.raises(adbc_driver_manager.Error, match="more than 16777216 bytes"):
            cursor.executemany("SELECT ?", wide)
        row = pa.record_batch({"s": pa.array([b"y" * (1 << 20)], pa.binary())})
        big = pa.Table.from_batches([row] * 33)
        with pytest.raises(adbc_driver_manager.Error, match="more than 33554432 bytes"):
            cursor.adbc_ingest("big", big, mode="create")
        cursor.execute("SELECT 42")  # the connection goes on
        assert cursor.fetchall() == [(42,)]


def test_metadata_in_a_session_lists_what_the_session_made(stack: FlightStack) -> None:
    with connect(stack, SESSION_ROLE, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TABLE made (id INTEGER, note VARCHAR)")
        cursor.execute("CREATE TEMP VIEW seen AS SELECT 1 AS one")
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        listed = {
            (catalog["catalog_name"], schema["db_schema_name"], table["table_name"])
            for catalog in objects
            for schema in catalog["catalog_db_schemas"] or []
            for table in schema["db_schema_tables"] or []
        }
        assert listed == {
            ("duckcell", "main", "trips"),
            ("memory", "main", "made"),
            ("temp", "main", "seen"),
        }
        made = conn.adbc_get_table_schema("made", catalog_filter="memory")
        assert made.names == ["id", "note"] and made.field("id").type == pa.int32()
        # A catalog table's schema is read in the session (a session-mode role has no other).
        assert conn.adbc_get_table_schema("trips").names == ["id", "zone", "fare"]
        # The names listed work in SQL.
        assert rows(cursor, "SELECT count(*)::INTEGER FROM memory.main.made") == [(0,)]
    # Another connection lists its own session only.
    with connect(stack, SESSION_ROLE, autocommit=True) as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        assert [catalog["catalog_name"] for catalog in objects] == ["duckcell"]
