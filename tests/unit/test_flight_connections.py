"""A connection is a session on a session-mode role, with the real clients over TLS.

The stack is ``tests.support.flightstack``'s: the real ``FlightSqlServer`` with an in-process
DuckDB playing the worker, where a session is one DuckDB connection kept open; role
``notebook`` is session-mode, ``analyst`` per-query. A temp table witnesses where statements
ran. Clients: the ADBC Flight SQL driver (handshake with username/password, cookie middleware,
a static bearer key), the Altertable client with its default arguments (its own process), and
pyarrow's Flight client for what a hostile caller would send.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import adbc_driver_flightsql.dbapi as adbc_flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_flightsql import DatabaseOptions

from launcher.controlplane.audit import AuditRecord
from launcher.flight import messages as msg
from launcher.flight.connections import HandshakeTokens
from launcher.protocol import flightsql_pb2 as pb
from tests.support.altertable import run_client
from tests.support.flightstack import SESSION_ROLE, FlightStack, flight_stack
from tests.support.waiting import eventually, run

COOKIE_MIDDLEWARE = "adbc.flight.sql.rpc.with_cookie_middleware"
CREATE, READ = "CREATE TEMP TABLE notes AS SELECT 42 AS n", "SELECT n FROM notes"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FlightStack]:
    yield from flight_stack(tmp_path)


def connect(stack: FlightStack, **options: str) -> adbc_flightsql.Connection:
    db_kwargs = {DatabaseOptions.TLS_ROOT_CERTS.value: stack.ca_pem.decode(), **options}
    return adbc_flightsql.connect(stack.server.location, db_kwargs=db_kwargs, autocommit=True)


def handshake(role: str) -> dict[str, str]:
    """ADBC's username/password: a basic-auth handshake, then the token it returns."""
    return {"username": "anyone", "password": f"dck1.{role}"}


def bearer(role: str) -> dict[str, str]:
    return {DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer dck1.{role}"}


def create_then_read(conn: adbc_flightsql.Connection) -> list[tuple[object, ...]]:
    with conn.cursor() as cursor:
        cursor.execute(CREATE)
        cursor.execute(READ)
        return cursor.fetchall()


@pytest.mark.parametrize(
    "options",
    [handshake(SESSION_ROLE), {**bearer(SESSION_ROLE), COOKIE_MIDDLEWARE: "true"}],
    ids=["handshake-token", "session-cookie"],
)
def test_on_a_session_mode_role_each_connection_is_one_session(
    stack: FlightStack, options: dict[str, str]
) -> None:
    with connect(stack, **options) as first, connect(stack, **options) as second:
        assert create_then_read(first) == [(42,)]
        # Another connection of the same key has a session of its own.
        with second.cursor() as cursor, pytest.raises(adbc_driver_manager.Error, match="notes"):
            cursor.execute(READ)
        assert create_then_read(second) == [(42,)]
    sessions = {call.session_id for call in stack.router.calls}
    assert len(sessions) == 2 and "" not in sessions
    assert stack.router.sessions == {}  # conn.close() sent CloseSession: both ended


def test_a_session_mode_role_without_a_connection_is_told_how_to_get_one(
    stack: FlightStack,
) -> None:
    with (
        connect(stack, **bearer(SESSION_ROLE)) as conn,
        conn.cursor() as cursor,
        pytest.raises(adbc_driver_manager.ProgrammingError) as refused,
    ):
        cursor.execute("SELECT 1")
    text = str(refused.value)
    assert "INVALID_ARGUMENT" in text and "runs each connection in a session" in text
    assert "handshake" in text and "with_cookie_middleware" in text
    assert "Traceback" not in text and ".py" not in text
    assert stack.router.calls == [] and stack.router.sessions == {}


def test_a_per_query_role_stays_per_query_whatever_the_connection(stack: FlightStack) -> None:
    for options in (handshake("analyst"), {**bearer("analyst"), COOKIE_MIDDLEWARE: "true"}):
        with connect(stack, **options) as conn, conn.cursor() as cursor:
            cursor.execute(CREATE)
            with pytest.raises(adbc_driver_manager.Error, match="notes"):
                cursor.execute(READ)
    assert {call.session_id for call in stack.router.calls} == {""}
    assert stack.router.sessions == {}


class Cookies(flight.ClientMiddlewareFactory):
    """Keeps the ``set-cookie`` values a server sends to a pyarrow client."""

    def __init__(self) -> None:
        self.values: list[str] = []

    def start_call(self, info: flight.CallInfo) -> flight.ClientMiddleware:
        return _Received(self)


class _Received(flight.ClientMiddleware):
    def __init__(self, cookies: Cookies) -> None:
        self._cookies = cookies

    def received_headers(self, headers: dict[str, list[str]]) -> None:
        self._cookies.values.extend(headers.get("set-cookie", []))


def call_options(authorization: str, cookie: str = "") -> flight.FlightCallOptions:
    headers = [(b"authorization", authorization.encode())]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return flight.FlightCallOptions(headers=headers, timeout=10)


def statement(sql: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(msg.pack(pb.CommandStatementQuery(query=sql)))


def test_another_keys_cookie_and_a_guessed_token_are_refused_and_audited(
    stack: FlightStack,
) -> None:
    cookies = Cookies()
    with flight.connect(
        stack.server.location, tls_root_certs=stack.ca_pem, middleware=[cookies]
    ) as client:
        mine = call_options(f"Bearer dck1.{SESSION_ROLE}")
        with pytest.raises(pa.ArrowInvalid, match="names no connection"):
            client.get_flight_info(statement("SELECT 1"), mine)  # no cookie sent yet
    assert cookies.values, "the first answer sets the session cookie"
    cookie = cookies.values[0].split(";")[0]
    assert cookie.startswith("arrow_flight_session_id=")
    with flight.connect(stack.server.location, tls_root_certs=stack.ca_pem) as client:
        # The owner's cookie names its connection: the statement runs in its session.
        owner = call_options(f"Bearer dck1.{SESSION_ROLE}", cookie)
        info = client.get_flight_info(statement(CREATE), owner)
        client.do_get(info.endpoints[0].ticket, owner).read_all()
        # The same cookie with another key (basic auth here) is refused, not a new session.
        other = base64.b64encode(b"x:dck1.analyst").decode()
        with pytest.raises(flight.FlightUnauthorizedError, match="not issued to this API key"):
            client.get_flight_info(statement(READ), call_options(f"Basic {other}", cookie))
        # A made-up token is no key and no connection.
        with pytest.raises(flight.FlightUnauthenticatedError, match="unknown or expired"):
            client.get_flight_info(statement(READ), call_options("Bearer dcs1." + "A" * 43))

    def refused() -> list[AuditRecord]:
        return [r for r in stack.audit.records if r.outcome == "refused"]

    # Written on the server's loop after the call was answered: wait for both rows.
    run(lambda: eventually(lambda: len(refused()) == 2, "both refusals audited"))
    assert [(r.caller, r.reason) for r in refused()] == [
        ("key-analyst", "connection"),
        ("(unknown)", "connection"),
    ]
    assert len({c.session_id for c in stack.router.calls}) == 1


def test_the_altertable_client_with_its_defaults(stack: FlightStack, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(stack.ca_pem)
    script = [
        ["query", "SELECT 42 AS a"],
        ["execute", "CREATE TEMP TABLE t (n INTEGER)"],
        ["execute", "INSERT INTO t VALUES (1), (2)"],
        ["query", "SELECT sum(n)::INTEGER AS s FROM t"],
    ]
    session = run_client(ca_file, stack.server.port, f"dck1.{SESSION_ROLE}", script)
    assert session == [{"ok": [{"a": 42}]}, {"ok": 0}, {"ok": 2}, {"ok": [{"s": 3}]}]
    per_query = run_client(ca_file, stack.server.port, "dck1.analyst", script)
    assert per_query[:3] == [{"ok": [{"a": 42}]}, {"ok": 0}, {"error": per_query[2]["error"]}]
    assert "Table with name t does not exist" in per_query[2]["error"]
    assert stack.router.sessions == {}  # Client.close() sent CloseSession


def test_the_token_table_holds_no_usable_api_key() -> None:
    """A token resolves to its API key, but the table keeps only the token's digest and the key
    sealed under the token: a dump of the server's memory between calls shows neither."""
    tokens = HandshakeTokens()
    api_key = "dck1.0123456789abcdef.a-secret-that-must-not-be-kept"
    token = tokens.issue(api_key, "0123456789abcdef")
    held = repr(vars(tokens))
    assert "a-secret-that-must-not-be-kept" not in held and token not in held
    found = tokens.resolve(token)
    assert found is not None and found[0] == api_key
    assert tokens.resolve(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
