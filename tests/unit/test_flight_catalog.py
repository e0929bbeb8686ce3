"""Roles, catalog metadata, parameters and updates through the real ADBC driver and the real
Flight SQL server, with an in-process DuckDB standing in for router and worker
(``support/flightstack.py``); the whole chain through the tunnel is ``test_flight_adbc.py``'s."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from launcher.flight import messages as msg
from launcher.flight.listing import MAX_PATTERN_CHARS, like
from launcher.flight.messages import InvalidRequest
from launcher.flight.updates import changes_data
from launcher.model.sql.tables import analyze
from launcher.protocol import flightsql_pb2 as pb
from tests.support.flightstack import TRIPS, FlightStack, flight_stack


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FlightStack]:
    yield from flight_stack(tmp_path)


def rows(stack: FlightStack, role: str, sql: str, parameters: tuple[object, ...] = ()) -> list:
    with stack.connect(role) as conn, conn.cursor() as cursor:
        cursor.execute(sql, parameters or None)
        return cursor.fetchall()


def test_a_role_runs_under_its_policy_and_is_named_as_caller(stack: FlightStack) -> None:
    assert rows(stack, "analyst", "SELECT count(*) FROM trips") == [(3,)]
    (call,) = stack.router.calls
    assert (call.policy, call.caller) == ("default", "key-analyst/analyst")
    assert call.role == "analyst"  # the router checks the role again when it places the query


@pytest.mark.parametrize(
    ("role", "sql", "message"),
    [
        ("analyst", "SELECT * FROM salaries", "may not read table salaries"),
        ("intern", "SELECT 1", "role 'intern' is not defined"),
    ],
)
def test_a_refused_query_is_permission_denied_and_never_routed(
    stack: FlightStack, role: str, sql: str, message: str
) -> None:
    with pytest.raises(adbc_driver_manager.Error, match=message) as refused:
        rows(stack, role, sql)
    assert "UNAUTHORIZED" in str(refused.value)  # ADBC's name for PERMISSION_DENIED
    assert "Traceback" not in str(refused.value)
    assert stack.router.calls == []


def objects(stack: FlightStack, role: str, **filters: str) -> dict[str, list[str]]:
    """Table name -> its column names, as ``adbc_get_objects(depth="all")`` lists them."""
    with stack.connect(role) as conn:
        found = conn.adbc_get_objects(depth="all", **filters).read_all().to_pylist()
    assert [catalog["catalog_name"] for catalog in found] == ["duckcell"]
    (schema,) = found[0]["catalog_db_schemas"]
    assert schema["db_schema_name"] == "main"
    return {
        table["table_name"]: [column["column_name"] for column in table["table_columns"]]
        for table in schema["db_schema_tables"]
    }


def test_get_objects_lists_only_the_tables_the_role_may_read(stack: FlightStack) -> None:
    assert objects(stack, "analyst") == {"trips": ["id", "zone", "fare"]}
    assert objects(stack, "admin") == {"salaries": ["name", "pay"], "trips": ["id", "zone", "fare"]}
    assert objects(stack, "admin", table_name_filter="sal%") == {"salaries": ["name", "pay"]}
    # Each schema was read once through the "worker", for the caller who first asked.
    assert [(call.sql, call.caller) for call in stack.router.calls] == [
        ('SELECT * FROM "trips" LIMIT 0', "key-analyst/analyst"),
        ('SELECT * FROM "salaries" LIMIT 0', "key-admin/admin"),
    ]


def test_get_table_schema_comes_from_the_worker_and_is_cached(stack: FlightStack) -> None:
    with stack.connect("analyst") as conn:
        first = conn.adbc_get_table_schema("trips")
        second = conn.adbc_get_table_schema("trips", db_schema_filter="main")
    assert first == second
    assert [(f.name, f.type) for f in first] == [(f.name, f.type) for f in TRIPS.schema]
    assert [call.sql for call in stack.router.calls] == ['SELECT * FROM "trips" LIMIT 0']
    with stack.connect("analyst") as conn, pytest.raises(adbc_driver_manager.Error):
        conn.adbc_get_table_schema("salaries")  # hidden from this role


def test_parameters_are_bound_by_duckdb_never_written_into_the_sql(stack: FlightStack) -> None:
    sql = "SELECT ? + 1 AS n, ?::VARCHAR AS s"
    assert rows(stack, "admin", sql, (41, "x")) == [(42, "x")]
    assert rows(stack, "admin", sql, (1, "it's")) == [(2, "it's")]
    assert [(call.sql, call.parameters) for call in stack.router.calls] == [
        (sql, [41, "x"]),
        (sql, [1, "it's"]),
    ]


def test_a_data_changing_statement_answers_its_row_count(stack: FlightStack) -> None:
    with stack.connect("admin") as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE t AS SELECT * FROM range(5)")
        assert cursor.rowcount == 5
        cursor.execute("CREATE TEMP TABLE u AS SELECT * FROM range(?)", (2,))
        assert cursor.rowcount == 2
    assert [call.parameters for call in stack.router.calls] == [[], [2]]


def test_executemany_is_refused_with_what_to_do(stack: FlightStack) -> None:
    with (
        stack.connect("admin") as conn,
        conn.cursor() as cursor,
        pytest.raises(adbc_driver_manager.NotSupportedError, match="executemany is not supported"),
    ):
        cursor.executemany("CREATE TEMP TABLE t AS SELECT ? AS x", [(1,), (2,)])
    assert stack.router.calls == []


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        (None, "trips", True),
        ("trips", "trips", True),
        ("tr%", "trips", True),
        ("t_ips", "trips", True),
        ("%s", "trips", True),
        ("tr", "trips", False),
        ("TRIPS", "trips", False),
        ("a.c", "abc", False),
        ("100%", "100%", True),
    ],
)
def test_like_patterns(pattern: str | None, value: str, matches: bool) -> None:
    assert like(pattern, value) is matches


def test_like_agrees_with_a_regex_and_takes_linear_time_on_hostile_patterns() -> None:
    """Every pattern of up to 6 of ``ab%_`` against every name of up to 6 of ``ab``, as the
    regex reading of LIKE says; then patterns that make a backtracking regex run for minutes
    (``'%' * 1000 + 'x'`` held the GIL past 19 s) answer at once, and an overlong one is refused."""

    def regex(pattern: str, value: str) -> bool:
        text = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
        return re.fullmatch(text, value, re.DOTALL) is not None

    for size in range(7):
        for pattern in map("".join, itertools.product("ab%_", repeat=size)):
            for length in range(7):
                for value in map("".join, itertools.product("ab", repeat=length)):
                    assert like(pattern, value) is regex(pattern, value), (pattern, value)
    began = time.process_time()
    assert not like("%" * 1000 + "x", "trips_2024_yellow")
    assert not like("%a" * 500 + "b", "a" * 1000 + "c")
    assert like("%" * MAX_PATTERN_CHARS, "main")
    assert time.process_time() - began < 1  # CPU seconds: minutes with a backtracking regex
    with pytest.raises(InvalidRequest, match="at most 1024"):
        like("%" * (MAX_PATTERN_CHARS + 1), "main")


@pytest.mark.parametrize(
    ("sql", "changes"),
    [
        ("SELECT 1", False),
        ("FROM trips", False),
        ("EXPLAIN SELECT 1", False),
        ("INSERT INTO t VALUES (1)", True),
        ("CREATE TABLE t AS SELECT 1", True),
        ("SELECT 1; DROP TABLE t", True),
        ("SELEC 1", False),
    ],
)
def test_changes_data_reads_the_last_statements_type(sql: str, changes: bool) -> None:
    assert changes_data(sql, analyze) is changes


def test_schema_bytes_are_an_ipc_serialized_schema(stack: FlightStack) -> None:
    with stack.connect("admin") as conn:
        schema = conn.adbc_get_table_schema("salaries")
    assert schema.field("pay").type == pa.int32()


def test_do_put_answers_the_raw_prepared_statement_result(stack: FlightStack) -> None:
    """What ADBC reads after binding: PutResult metadata holding ``DoPutPreparedStatementResult``
    itself, not wrapped in ``Any``; and a denied table is PERMISSION_DENIED for any client."""
    options = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer dck1.admin")])
    create = msg.pack(pb.ActionCreatePreparedStatementRequest(query="SELECT ? AS v"))
    with flight.connect(stack.server.location, tls_root_certs=stack.ca_pem) as client:
        (result,) = client.do_action(flight.Action(msg.CREATE_PREPARED_STATEMENT, create), options)
        _name, body = msg.unpack(result.body.to_pybytes())
        handle = pb.ActionCreatePreparedStatementResult.FromString(body).prepared_statement_handle
        command = msg.pack(pb.CommandPreparedStatementQuery(prepared_statement_handle=handle))
        descriptor = flight.FlightDescriptor.for_command(command)
        values = pa.table({"0": pa.array([7], pa.int64())})
        writer, metadata = client.do_put(descriptor, values.schema, options)
        writer.write_table(values)
        writer.done_writing()
        answer = pb.DoPutPreparedStatementResult.FromString(metadata.read().to_pybytes())
        writer.close()
        assert answer.prepared_statement_handle == handle
        info = client.get_flight_info(descriptor, options)
        assert client.do_get(info.endpoints[0].ticket, options).read_all().to_pylist() == [{"v": 7}]
        denied = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer dck1.analyst")])
        query = msg.pack(pb.CommandStatementQuery(query="SELECT * FROM salaries"))
        with pytest.raises(flight.FlightUnauthorizedError, match="may not read table salaries"):
            client.get_flight_info(flight.FlightDescriptor.for_command(query), denied)


def test_a_named_session_keeps_its_state_until_the_client_closes_it(stack: FlightStack) -> None:
    """``x-duckcell-session`` on every call: the statements share one session (here a kept
    DuckDB connection), other connections do not see it, and ``conn.close()`` ends it."""
    with stack.connect("admin", session="notebook") as conn, conn.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE notes AS SELECT 42 AS n")
        cursor.execute("SELECT n FROM notes")
        assert cursor.fetchall() == [(42,)]
        (session_id,) = stack.router.sessions
        assert stack.router.sessions[session_id][:2] == ("key-admin/admin", "agent-session")
        with pytest.raises(adbc_driver_manager.Error, match="notes"):
            rows(stack, "admin", "SELECT n FROM notes")  # no session: a fresh sandbox
    assert stack.router.sessions == {}  # CloseSession on conn.close() ended it
    assert [call.session_id for call in stack.router.calls] == [session_id, session_id, ""]


def test_a_session_that_ended_fails_once_then_a_new_one_opens(stack: FlightStack) -> None:
    with stack.connect("admin", session="job") as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        (first,) = stack.router.sessions
        stack.router.sessions.pop(first)  # the worker ended it (idle TTL)
        with pytest.raises(adbc_driver_manager.Error, match="has ended"):
            cursor.execute("SELECT 1")
        cursor.execute("SELECT 2")
        assert cursor.fetchall() == [(2,)]
        assert list(stack.router.sessions) != [first] and len(stack.router.sessions) == 1


def test_a_malformed_session_name_is_refused_before_anything_opens(stack: FlightStack) -> None:
    with (
        stack.connect("admin", session="no spaces/please") as conn,
        conn.cursor() as cursor,
        pytest.raises(adbc_driver_manager.ProgrammingError, match="is not a session name"),
    ):
        cursor.execute("SELECT 1")
    assert stack.router.sessions == {} and stack.router.calls == []
