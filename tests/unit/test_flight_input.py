"""Bad input over Flight SQL is INVALID_ARGUMENT with one line, and no error a client sees
carries a server-side traceback or file path (``launcher/flight/status.py`` says how).

Seen by the real ADBC driver and by pyarrow's client, which can send what the driver cannot:
a statement whose bytes are not UTF-8 (the driver's protobuf refuses to encode one).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_manager import AdbcStatusCode, Error
from google.protobuf import any_pb2

from launcher.flight import messages as msg
from launcher.protocol import flightsql_pb2 as pb
from tests.support.flightstack import FlightStack, flight_stack

BEARER = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer dck1.admin")])
NOT_UTF8 = b"SELECT '\xff'"  # the bad byte at offset 8
NOT_UTF8_LINE = "the statement is not valid UTF-8 (byte 0xff at offset 8)"
WITH_NUL = "SELECT 'a\0b'"  # the NUL at offset 9
NUL_LINE = "the statement contains a NUL byte (offset 9)"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[FlightStack]:
    yield from flight_stack(tmp_path)


def _client(stack: FlightStack) -> flight.FlightClient:
    return flight.connect(stack.server.location, tls_root_certs=stack.ca_pem)


def _command(name: str, statement: bytes) -> bytes:
    """A Flight SQL message whose field 1 (the statement) holds ``statement``'s bytes as they
    are, wrapped in an ``Any``: what a client that does not check UTF-8 sends."""
    assert len(statement) < 128  # one-byte length
    body = bytes([1 << 3 | 2, len(statement)]) + statement
    return any_pb2.Any(type_url=msg.TYPE_URL_PREFIX + name, value=body).SerializeToString()


def _assert_clean(text: str) -> None:
    """What a client reads: the status's message, nothing of the server's insides."""
    assert "Traceback" not in text and "/launcher/" not in text and ".py" not in text, text


def _assert_adbc_clean(error: Error) -> None:
    _assert_clean(str(error))
    for _key, value in error.details or []:
        _assert_clean(value.decode("utf-8", "replace") if isinstance(value, bytes) else value)


def test_a_statement_that_is_not_utf8_is_invalid_argument_with_one_line(
    stack: FlightStack,
) -> None:
    """Each call that carries a statement: execute, update, prepare."""
    with _client(stack) as client:
        query = flight.FlightDescriptor.for_command(_command("CommandStatementQuery", NOT_UTF8))
        with pytest.raises(pa.ArrowInvalid) as failed:
            client.get_flight_info(query, BEARER)
        update = flight.FlightDescriptor.for_command(_command("CommandStatementUpdate", NOT_UTF8))
        writer, _ = client.do_put(update, pa.schema([]), BEARER)
        with pytest.raises(pa.ArrowInvalid) as put_failed:
            writer.close()
        prepare = _command("ActionCreatePreparedStatementRequest", NOT_UTF8)
        with pytest.raises(pa.ArrowInvalid) as prepare_failed:
            list(client.do_action(flight.Action(msg.CREATE_PREPARED_STATEMENT, prepare), BEARER))
    for error in (failed.value, put_failed.value, prepare_failed.value):
        text = str(error)
        assert text.startswith(NOT_UTF8_LINE) and "\n" not in text, text
        _assert_clean(text)
    assert stack.router.calls == []


def test_another_string_field_that_is_not_utf8_is_named(stack: FlightStack) -> None:
    tables = _command("CommandGetTables", b"cat\xc3")  # field 1: the catalog
    with _client(stack) as client, pytest.raises(pa.ArrowInvalid) as failed:
        client.get_flight_info(flight.FlightDescriptor.for_command(tables), BEARER)
    assert str(failed.value).startswith(
        "CommandGetTables.catalog is not valid UTF-8 (byte 0xc3 at offset 3)"
    )


def test_a_statement_with_a_nul_byte_is_refused(stack: FlightStack) -> None:
    """pyarrow's client: the ADBC driver passes SQL as a C string, which ends at the NUL."""
    with _client(stack) as client:
        query = msg.pack(pb.CommandStatementQuery(query=WITH_NUL))
        with pytest.raises(pa.ArrowInvalid) as failed:
            client.get_flight_info(flight.FlightDescriptor.for_command(query), BEARER)
        prepare = msg.pack(pb.ActionCreatePreparedStatementRequest(query="a\0b"))
        with pytest.raises(pa.ArrowInvalid) as prepare_failed:
            list(client.do_action(flight.Action(msg.CREATE_PREPARED_STATEMENT, prepare), BEARER))
    assert str(failed.value).startswith(NUL_LINE) and "\n" not in str(failed.value)
    assert str(prepare_failed.value).startswith("the statement contains a NUL byte (offset 1)")
    _assert_clean(str(failed.value))
    assert stack.router.calls == []


def test_errors_reach_an_adbc_client_without_a_server_traceback(stack: FlightStack) -> None:
    """INVALID_ARGUMENT (a SQL error at execute, and at fetch through a prepared statement's
    parameters) used to carry pyarrow's "Python exception: Traceback ... launcher/flight/..."."""
    with stack.connect("admin") as conn, conn.cursor() as cursor:
        with pytest.raises(Error) as syntax:
            cursor.execute("SELEC 1")
        assert syntax.value.status_code == AdbcStatusCode.INVALID_ARGUMENT
        assert "syntax error" in str(syntax.value)
        _assert_adbc_clean(syntax.value)
        with pytest.raises(Error) as binder:
            cursor.execute("SELECT no_such_column FROM trips WHERE id = ?", parameters=(1,))
        assert binder.value.status_code == AdbcStatusCode.INVALID_ARGUMENT
        _assert_adbc_clean(binder.value)
        cursor.execute("SELECT 42 AS answer")  # the connection still serves
        assert cursor.fetchall() == [(42,)]


def test_not_found_and_unimplemented_carry_their_message_only(stack: FlightStack) -> None:
    stale = flight.Ticket(msg.statement_ticket(b"never issued"))
    with _client(stack) as client:
        with pytest.raises(pa.ArrowKeyError) as not_found:
            client.do_get(stale, BEARER).read_all()
        with pytest.raises(pa.ArrowNotImplementedError) as unimplemented:
            list(client.do_action(flight.Action("Nope", b""), BEARER))
    assert str(not_found.value).startswith("unknown or expired ticket")
    assert str(unimplemented.value).startswith("action 'Nope' is not supported")
    for error in (not_found.value, unimplemented.value):
        _assert_clean(str(error))


def test_flight_calls_flight_sql_does_not_use_are_unimplemented_with_a_message(
    stack: FlightStack,
) -> None:
    """pyarrow's defaults answered them with an empty message and a traceback."""
    descriptor = flight.FlightDescriptor.for_command(b"anything")
    with _client(stack) as client:
        with pytest.raises(pa.ArrowNotImplementedError) as schema:
            client.get_schema(descriptor, BEARER)
        with pytest.raises(pa.ArrowNotImplementedError) as listing:
            list(client.list_flights(b"", BEARER))
        writer, reader = client.do_exchange(descriptor, BEARER)
        with pytest.raises(pa.ArrowNotImplementedError) as exchange:
            reader.read_all()
        with contextlib.suppress(pa.ArrowNotImplementedError):  # the call's status, again
            writer.close()
    for error, call in ((schema, "GetSchema"), (listing, "ListFlights"), (exchange, "DoExchange")):
        assert str(error.value).startswith(f"{call} is not supported:")
        _assert_clean(str(error.value))
