"""Which gRPC status each duckcell error reaches a client as, seen by real clients.

``FailingRouter`` plays a worker that fails the query named in the SQL with the error
``ERRORS`` gives it, before the schema (``GetFlightInfo`` fails) or after it (the ``DoGet``
stream fails). Each case is checked with pyarrow's Flight client (its exception class) and with
the ADBC driver (its ``AdbcStatusCode``, which the driver takes from the gRPC status code).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import adbc_driver_flightsql.dbapi as adbc_flightsql
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_flightsql import DatabaseOptions
from adbc_driver_manager import AdbcStatusCode, Error

from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.routing import QueryDone
from launcher.errors import (
    MemoryLimitError,
    QueryCancelledError,
    QueryDeniedError,
    QueryTimeoutError,
    ResultLimitError,
    SandboxLostError,
    SessionError,
    SqlError,
    WorkerDrainingError,
    WorkerShutdownError,
    WorkerUnavailableError,
    query_error,
)
from launcher.flight import FlightListen, FlightSqlServer
from launcher.flight import messages as msg
from launcher.protocol import flightsql_pb2 as pb
from tests.support.flightserver import (
    KEY,
    OTHER_KEY,
    TABLE,
    bearer,
    ipc_messages,
    on,
    statement,
    verify,
)

DEADLINE_S = 5.0
# What the worker fails with, by name.
ERRORS: dict[str, Callable[[], Exception]] = {
    "sql": lambda: SqlError('Binder Error: Referenced column "x" not found'),
    "denied": lambda: QueryDeniedError("role analyst may not read table salaries"),
    "timeout": lambda: QueryTimeoutError("statement timeout: the query ran past 2 s"),
    "cancelled": lambda: QueryCancelledError("the query was cancelled on worker w-1"),
    "worker_shutdown": lambda: WorkerShutdownError("worker w-1 shut down; retry the query"),
    "worker_draining": lambda: WorkerDrainingError("every worker is draining; retry later"),
    "sandbox_lost": lambda: SandboxLostError("the sandbox died; retry the query"),
    "no_worker": lambda: WorkerUnavailableError("no worker is online: start one"),
    "capacity": lambda: query_error("capacity", "every sandbox stayed busy; retry later"),
    "memory": lambda: MemoryLimitError("the sandbox hit its 1 GiB memory limit"),
    "result_limit": lambda: ResultLimitError("the result passed max_result_rows: add a LIMIT"),
    "policy": lambda: query_error("policy", "policy agent is invalid on worker w-1"),
    "session": lambda: SessionError("session ses-1 has ended: open a new session"),
    "bug": lambda: RuntimeError("secret internals"),
}
# name -> (what pyarrow's client raises, the ADBC status): the table in launcher/flight/status.py.
EXPECTED: dict[str, tuple[type[Exception], AdbcStatusCode]] = {
    "sql": (pa.ArrowInvalid, AdbcStatusCode.INVALID_ARGUMENT),
    "denied": (flight.FlightUnauthorizedError, AdbcStatusCode.UNAUTHORIZED),
    "timeout": (flight.FlightTimedOutError, AdbcStatusCode.TIMEOUT),
    "cancelled": (flight.FlightCancelledError, AdbcStatusCode.CANCELLED),
    "worker_shutdown": (flight.FlightUnavailableError, AdbcStatusCode.IO),
    "worker_draining": (flight.FlightUnavailableError, AdbcStatusCode.IO),
    "sandbox_lost": (flight.FlightUnavailableError, AdbcStatusCode.IO),
    "no_worker": (flight.FlightUnavailableError, AdbcStatusCode.IO),
    "capacity": (flight.FlightUnavailableError, AdbcStatusCode.IO),
    "memory": (flight.FlightServerError, AdbcStatusCode.UNKNOWN),
    "result_limit": (flight.FlightServerError, AdbcStatusCode.UNKNOWN),
    "policy": (pa.ArrowInvalid, AdbcStatusCode.INVALID_ARGUMENT),
    "session": (pa.ArrowKeyError, AdbcStatusCode.NOT_FOUND),
    "bug": (flight.FlightInternalError, AdbcStatusCode.INTERNAL),
}
OK_SQL = "SELECT 42"  # runs, like ScriptedRouter's OK
_NAME = re.compile(r"SELECT '(\w+)'( AS streamed)?")


def failing(name: str, *, streamed: bool = False) -> str:
    """SQL that ``FailingRouter`` fails with ``ERRORS[name]``, after the schema if streamed."""
    return f"SELECT '{name}'{' AS streamed' if streamed else ''}"


class FailingRouter:
    """Fails ``failing(...)`` SQL; runs anything else like ``ScriptedRouter`` runs ``OK``."""

    def __init__(self) -> None:
        self.started: list[str] = []

    async def run(self, sql: str, policy: str, **_: object) -> AsyncIterator[bytes | QueryDone]:
        self.started.append(sql)
        found = _NAME.fullmatch(sql)
        chunks = ipc_messages(TABLE)
        if found and not found[2]:
            raise ERRORS[found[1]]()
        yield chunks[0]
        if found:
            raise ERRORS[found[1]]()
        for chunk in chunks[1:]:
            yield chunk
        yield QueryDone(TABLE.num_rows)


class Served:
    def __init__(self, server: FlightSqlServer, router: FailingRouter, ca_pem: bytes) -> None:
        self.server, self.router, self.ca_pem = server, router, ca_pem

    def client(self) -> flight.FlightClient:
        return flight.connect(self.server.location, tls_root_certs=self.ca_pem)

    def adbc(self) -> adbc_flightsql.Connection:
        db_kwargs = {
            DatabaseOptions.TLS_ROOT_CERTS.value: self.ca_pem.decode(),
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {KEY}",
        }
        return adbc_flightsql.connect(self.server.location, db_kwargs=db_kwargs, autocommit=True)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """Limits of 2 parked tickets and 2 prepared statements per key."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ca = ControlPlaneData(tmp_path / "cp").ca()
    router = FailingRouter()
    server = FlightSqlServer(
        FlightListen.parse("127.0.0.1:0"),
        router,
        verify,
        ca=ca,
        hosts=["127.0.0.1"],
        max_parked_per_key=2,
        max_prepared_per_key=2,
    )
    on(loop, server.start())
    try:
        yield Served(server, router, ca.cert_pem())
    finally:
        on(loop, server.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(DEADLINE_S)
        loop.close()


def _assert_message(name: str, text: str) -> None:
    """The worker's message comes first; a bug's stays in the server's log, and no status
    carries the server's traceback or paths (``status.sendable``)."""
    assert "Traceback" not in text and "/launcher/" not in text, text
    if name == "bug":
        assert "log has the details" in text and "secret internals" not in text
    else:
        assert str(ERRORS[name]()) in text


@pytest.mark.parametrize("name", list(ERRORS))
def test_a_failure_before_the_schema_fails_get_flight_info_with_its_status(
    served: Served, name: str
) -> None:
    raised, adbc_status = EXPECTED[name]
    with served.client() as client, pytest.raises(raised) as failed:
        client.get_flight_info(statement(failing(name)), bearer(KEY))
    assert type(failed.value) is raised
    _assert_message(name, str(failed.value))
    with served.adbc() as conn, conn.cursor() as cursor, pytest.raises(Error) as adbc_failed:
        cursor.execute(failing(name))
    assert adbc_failed.value.status_code == adbc_status
    _assert_message(name, str(adbc_failed.value))


@pytest.mark.parametrize("name", ["sql", "timeout", "cancelled", "worker_shutdown", "session"])
def test_a_failure_after_the_schema_fails_the_doget_stream_with_its_status(
    served: Served, name: str
) -> None:
    raised, adbc_status = EXPECTED[name]
    with served.client() as client:
        info = client.get_flight_info(statement(failing(name, streamed=True)), bearer(KEY))
        reader = client.do_get(info.endpoints[0].ticket, bearer(KEY))
        # read_chunk, not read_all: pyarrow's read_all turns CANCELLED into KeyboardInterrupt.
        with pytest.raises(raised) as failed:
            reader.read_chunk()
        _assert_message(name, str(failed.value))
    with served.adbc() as conn, conn.cursor() as cursor, pytest.raises(Error) as adbc_failed:
        cursor.execute(failing(name, streamed=True))
        cursor.fetchall()
    assert adbc_failed.value.status_code == adbc_status
    _assert_message(name, str(adbc_failed.value))


def test_an_unsupported_action_is_unimplemented(served: Served) -> None:
    with served.client() as client, pytest.raises(pa.ArrowNotImplementedError, match="Nope"):
        list(client.do_action(flight.Action("Nope", b""), bearer(KEY)))


def _prepare(client: flight.FlightClient, sql: str, key: str = KEY) -> bytes:
    body = msg.pack(pb.ActionCreatePreparedStatementRequest(query=sql))
    (result,) = client.do_action(flight.Action(msg.CREATE_PREPARED_STATEMENT, body), bearer(key))
    _, answer = msg.unpack(result.body.to_pybytes())
    return pb.ActionCreatePreparedStatementResult.FromString(answer).prepared_statement_handle


def _close(client: flight.FlightClient, handle: bytes, key: str = KEY) -> None:
    body = msg.pack(pb.ActionClosePreparedStatementRequest(prepared_statement_handle=handle))
    assert (
        list(client.do_action(flight.Action(msg.CLOSE_PREPARED_STATEMENT, body), bearer(key))) == []
    )


def _run_prepared(client: flight.FlightClient, handle: bytes, key: str = KEY) -> pa.Table:
    command = msg.pack(pb.CommandPreparedStatementQuery(prepared_statement_handle=handle))
    info = client.get_flight_info(flight.FlightDescriptor.for_command(command), bearer(key))
    return client.do_get(info.endpoints[0].ticket, bearer(key)).read_all()


def test_closing_an_unknown_prepared_statement_succeeds_and_closes_nothing(served: Served) -> None:
    """Idempotent (``PreparedStatements.close`` says why): unknown, closed or another key's."""
    with served.client() as client:
        handle = _prepare(client, OK_SQL)
        _close(client, b"never issued")
        _close(client, handle, key=OTHER_KEY)  # not the owner: answered alike, left open
        assert _run_prepared(client, handle).equals(TABLE)
        _close(client, handle)
        _close(client, handle)
        with pytest.raises(pa.ArrowKeyError, match="unknown prepared statement"):
            _run_prepared(client, handle)


def test_a_key_holds_a_limited_number_of_prepared_statements(served: Served) -> None:
    with served.client() as client:
        first, _second = _prepare(client, "SELECT 1"), _prepare(client, "SELECT 2")
        with pytest.raises(flight.FlightUnavailableError, match="holds 2 prepared statements"):
            _prepare(client, "SELECT 3")
        _prepare(client, "SELECT 3", key=OTHER_KEY)  # the limit is per key
        _close(client, first)
        _prepare(client, "SELECT 3")


def test_a_key_holds_a_limited_number_of_unfetched_results(served: Served) -> None:
    """The third statement is refused before it is routed: no sandbox starts for it."""
    with served.client() as client:
        first = client.get_flight_info(statement(OK_SQL), bearer(KEY))
        client.get_flight_info(statement(OK_SQL), bearer(KEY))
        with pytest.raises(flight.FlightUnavailableError, match="fetch them") as failed:
            client.get_flight_info(statement(OK_SQL), bearer(KEY))
        assert "2 executed statements whose results nobody fetched" in str(failed.value)
        assert len(served.router.started) == 2
        client.get_flight_info(statement(OK_SQL), bearer(OTHER_KEY))  # per key
        assert client.do_get(first.endpoints[0].ticket, bearer(KEY)).read_all().equals(TABLE)
        client.get_flight_info(statement(OK_SQL), bearer(KEY))
    with served.adbc() as conn, conn.cursor() as cursor, pytest.raises(Error) as adbc_failed:
        cursor.execute(OK_SQL)
    assert adbc_failed.value.status_code == AdbcStatusCode.IO
