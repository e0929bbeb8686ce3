"""The Flight SQL server alone, over a real Flight connection, with a scripted router.

``ScriptedRouter`` stands in for the control plane's ``QueryRouter``: it yields Arrow IPC bytes
and ``QueryDone`` as a worker would, and records when a query's stream is closed (which, for the
real router, sends ``Cancel`` to the worker). The server runs on its own event loop in a thread,
as in the control plane; the test drives pyarrow's blocking Flight client.
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2

from bench.controlplane_process import ControlPlaneProcess
from launcher.cli.main import main
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.routing import QueryDone, WholeResult
from launcher.errors import ControlPlaneError, ResultLimitError, SqlError
from launcher.flight import FlightListen, FlightSqlServer
from launcher.flight import messages as msg
from launcher.flight.metadata import SQL_INFO_SCHEMA
from launcher.protocol import flightsql_pb2 as pb
from tests.support.flightserver import (
    DEADLINE_S,
    KEY,
    OTHER_KEY,
    TABLE,
    bearer,
    ipc_messages,
    on,
    statement,
    verify,
)

REPO = Path(__file__).resolve().parents[2]
# SQL the role rule parses (DuckDB's parser) before the scripted router sees it.
OK, HANG, FAIL = "SELECT 'ok'", "SELECT 'hang'", "SELECT fail"
# A small result that arrives in one piece (inline through the tunnel), then its outcome.
WHOLE, WHOLE_THEN_FAIL = "SELECT 'whole'", "SELECT 'whole', 'then fail'"
# The same bytes in one chunk but streamed (not marked whole): never read ahead.
ONE_CHUNK = "SELECT 'one chunk'"


class ScriptedRouter:
    """Plays a worker: ``fail`` raises DuckDB's error, ``hang`` stops after the schema."""

    def __init__(self) -> None:
        self.closed: list[str] = []
        self.all_closed = threading.Condition()

    async def run(
        self, sql: str, policy: str, *, caller: str = "", parameters: bytes = b"", **_: str
    ) -> AsyncIterator[bytes | QueryDone]:
        try:
            if sql == FAIL:
                raise SqlError('Binder Error: Referenced column "fail" not found')
            if sql == ONE_CHUNK:
                yield b"".join(ipc_messages(TABLE))
                await asyncio.Event().wait()  # the rest of a long stream, never sent
            if sql in (WHOLE, WHOLE_THEN_FAIL):
                yield WholeResult(b"".join(ipc_messages(TABLE)))
                if sql == WHOLE_THEN_FAIL:
                    raise ResultLimitError("result limit: more than 2 rows")
                yield QueryDone(TABLE.num_rows)
                return
            chunks = ipc_messages(TABLE)
            yield chunks[0]
            if sql == HANG:
                await asyncio.Event().wait()
            for chunk in chunks[1:]:
                yield chunk
            yield QueryDone(TABLE.num_rows)
        finally:
            with self.all_closed:
                self.closed.append(sql)
                self.all_closed.notify_all()

    def wait_closed(self, count: int) -> list[str]:
        with self.all_closed:
            assert self.all_closed.wait_for(lambda: len(self.closed) >= count, DEADLINE_S)
            return list(self.closed)


class Served:
    def __init__(self, server: FlightSqlServer, router: ScriptedRouter, ca_pem: bytes) -> None:
        self.server = server
        self.router = router
        self.ca_pem = ca_pem

    def client(self) -> flight.FlightClient:
        return flight.connect(self.server.location, tls_root_certs=self.ca_pem)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(DEADLINE_S)
    loop.close()


@pytest.fixture
def served(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> Iterator[Served]:
    ca = ControlPlaneData(tmp_path / "cp").ca()
    router = ScriptedRouter()
    server = FlightSqlServer(
        FlightListen.parse("127.0.0.1:0"),
        router,
        verify,
        ca=ca,
        hosts=["localhost", "127.0.0.1"],
        ticket_expiry_s=0.2,
    )
    on(loop, server.start())
    try:
        yield Served(server, router, ca.cert_pem())
    finally:
        on(loop, server.stop())


def test_a_statement_streams_the_workers_batches_with_the_announced_schema(
    served: Served,
) -> None:
    with served.client() as client:
        info = client.get_flight_info(statement(OK), bearer(KEY))
        assert info.schema == TABLE.schema
        table = client.do_get(info.endpoints[0].ticket, bearer(KEY)).read_all()
    assert table.equals(TABLE)
    assert served.router.wait_closed(1) == [OK]


def test_a_result_that_arrived_whole_is_taken_at_get_flight_info(served: Served) -> None:
    """DoGet then sends it from pyarrow's side; the routed query is over before DoGet."""
    with served.client() as client:
        info = client.get_flight_info(statement(WHOLE), bearer(KEY))
        assert served.router.wait_closed(1) == [WHOLE]  # already finished and let go
        table = client.do_get(info.endpoints[0].ticket, bearer(KEY)).read_all()
        assert table.equals(TABLE) and info.schema == TABLE.schema
        # The worker's outcome still counts: a failure after the bytes fails the call.
        with pytest.raises(flight.FlightServerError, match="result limit"):
            client.get_flight_info(statement(WHOLE_THEN_FAIL), bearer(KEY))
        # Bytes that merely end like a stream are not taken for a whole result: GetFlightInfo
        # answers at the schema and leaves the rest to DoGet (which the test never calls).
        info = client.get_flight_info(statement(ONE_CHUNK), bearer(KEY))
        assert info.schema == TABLE.schema
        assert served.router.closed == [WHOLE, WHOLE_THEN_FAIL]


def test_a_ticket_is_good_once_and_only_for_the_key_that_asked(served: Served) -> None:
    with served.client() as client:
        ticket = client.get_flight_info(statement(OK), bearer(KEY)).endpoints[0].ticket
        with pytest.raises(pa.ArrowKeyError, match="unknown or expired ticket"):
            client.do_get(ticket, bearer(OTHER_KEY)).read_all()
        assert client.do_get(ticket, bearer(KEY)).read_all().num_rows == 3
        with pytest.raises(pa.ArrowKeyError, match="unknown or expired ticket"):
            client.do_get(ticket, bearer(KEY)).read_all()


def test_a_ticket_nobody_fetches_expires_and_cancels_its_query(served: Served) -> None:
    with served.client() as client:
        ticket = client.get_flight_info(statement(HANG), bearer(KEY)).endpoints[0].ticket
        assert served.router.wait_closed(1) == [HANG]  # expiry_s is 0.2 here
        with pytest.raises(pa.ArrowKeyError, match="unknown or expired ticket"):
            client.do_get(ticket, bearer(KEY)).read_all()


def test_a_client_cancelling_its_doget_closes_the_query(served: Served) -> None:
    with served.client() as client:
        info = client.get_flight_info(statement(HANG), bearer(KEY))
        reader = client.do_get(info.endpoints[0].ticket, bearer(KEY))
        reader.cancel()
        assert served.router.wait_closed(1) == [HANG]


def test_a_sql_error_fails_get_flight_info_with_duckdbs_message(served: Served) -> None:
    """INVALID_ARGUMENT, DuckDB's message first (pyarrow appends a short traceback after it)."""
    with served.client() as client, pytest.raises(pa.ArrowInvalid) as failed:
        client.get_flight_info(statement(FAIL), bearer(KEY))
    assert str(failed.value).startswith('Binder Error: Referenced column "fail" not found.')


@pytest.mark.parametrize("header", [None, "Bearer None", "Bearer dck1.wrong", "Basic Zm9v"])
def test_calls_without_a_valid_key_are_unauthenticated(served: Served, header: str | None) -> None:
    headers = [] if header is None else [(b"authorization", header.encode())]
    options = flight.FlightCallOptions(headers=headers, timeout=DEADLINE_S)
    with served.client() as client:
        with pytest.raises(flight.FlightUnauthenticatedError):
            client.get_flight_info(statement(OK), options)
        with pytest.raises(flight.FlightUnauthenticatedError):
            list(client.do_action(flight.Action(msg.CLOSE_SESSION, b""), options))
    assert served.router.closed == []


def test_a_handshake_returns_a_fresh_opaque_token_never_the_key(served: Served) -> None:
    with served.client() as client:
        name, first = client.authenticate_basic_token("anyone", KEY)
        _name, second = client.authenticate_basic_token("anyone", KEY)
        assert name == b"authorization" and first.startswith(b"Bearer dcs1.")
        assert first != second and KEY.encode() not in first + second
        token = first.decode().removeprefix("Bearer ")
        info = client.get_flight_info(statement(WHOLE), bearer(token))
        assert client.do_get(info.endpoints[0].ticket, bearer(token)).read_all().equals(TABLE)
        # A token the server did not hand out is refused, whatever it looks like.
        guessed = "dcs1." + token.removeprefix("dcs1.")[::-1]
        with pytest.raises(flight.FlightUnauthenticatedError, match="unknown or expired session"):
            client.get_flight_info(statement(WHOLE), bearer(guessed))
        with pytest.raises(flight.FlightUnauthenticatedError, match="unknown API key"):
            client.authenticate_basic_token("anyone", "dck1.wrong")


def test_basic_auth_is_accepted_on_every_call(served: Served) -> None:
    basic = base64.b64encode(f"user:{KEY}".encode())
    options = flight.FlightCallOptions(
        headers=[(b"authorization", b"Basic " + basic)], timeout=DEADLINE_S
    )
    with served.client() as client:
        info = client.get_flight_info(statement(WHOLE), options)
        assert client.do_get(info.endpoints[0].ticket, options).read_all().equals(TABLE)
        wrong = base64.b64encode(b"user:dck1.wrong")
        refused = flight.FlightCallOptions(headers=[(b"authorization", b"Basic " + wrong)])
        with pytest.raises(flight.FlightUnauthenticatedError, match="unknown API key"):
            client.get_flight_info(statement(WHOLE), refused)


def test_sql_info_answers_name_versions_and_transactions(served: Served) -> None:
    command = msg.pack(pb.CommandGetSqlInfo(info=[0, 1, 2, 3, 8]))
    with served.client() as client:
        info = client.get_flight_info(flight.FlightDescriptor.for_command(command), bearer(KEY))
        table = client.do_get(info.endpoints[0].ticket, bearer(KEY)).read_all()
    assert info.schema == SQL_INFO_SCHEMA == table.schema
    values = {row["info_name"]: row["value"] for row in table.to_pylist()}
    assert values[0] == "duckcell" and values[2] == pa.__version__
    assert values[3] is False and values[8] == 0


def test_prepared_statements_run_their_sql_and_close(served: Served) -> None:
    create = msg.pack(pb.ActionCreatePreparedStatementRequest(query=OK))
    with served.client() as client:
        (result,) = client.do_action(
            flight.Action(msg.CREATE_PREPARED_STATEMENT, create), bearer(KEY)
        )
        name, body = msg.unpack(result.body.to_pybytes())
        assert name == "ActionCreatePreparedStatementResult"
        handle = pb.ActionCreatePreparedStatementResult.FromString(body).prepared_statement_handle
        command = msg.pack(pb.CommandPreparedStatementQuery(prepared_statement_handle=handle))
        descriptor = flight.FlightDescriptor.for_command(command)
        info = client.get_flight_info(descriptor, bearer(KEY))
        assert client.do_get(info.endpoints[0].ticket, bearer(KEY)).read_all().equals(TABLE)
        close = msg.pack(pb.ActionClosePreparedStatementRequest(prepared_statement_handle=handle))
        list(client.do_action(flight.Action(msg.CLOSE_PREPARED_STATEMENT, close), bearer(KEY)))
        with pytest.raises(pa.ArrowKeyError, match="unknown prepared statement"):
            client.get_flight_info(descriptor, bearer(KEY))


def test_stopping_the_server_cancels_queries_waiting_for_their_doget(
    loop: asyncio.AbstractEventLoop, served: Served
) -> None:
    with served.client() as client:
        client.get_flight_info(statement(HANG), bearer(KEY))
    on(loop, served.server.stop())
    assert served.router.wait_closed(1) == [HANG]


def test_plaintext_is_refused_unless_the_listen_address_is_loopback() -> None:
    for listen in ["0.0.0.0:0", "10.1.2.3:9000", "[::]:0"]:
        with pytest.raises(ControlPlaneError, match="--flight-plaintext needs a loopback"):
            FlightListen.parse(listen, plaintext=True)
    for listen in ["127.0.0.1:0", "[::1]:0", "localhost:0"]:
        assert FlightListen.parse(listen, plaintext=True).location().startswith("grpc+tcp://")
    assert FlightListen.parse("0.0.0.0:0").location() == "grpc+tls://0.0.0.0:0"


def test_the_cli_refuses_plaintext_off_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["controlplane", "serve", "--data", str(tmp_path / "cp"), "--listen", "127.0.0.1:0"]
    argv += ["--flight-listen", "0.0.0.0:0", "--flight-plaintext"]
    assert main(argv) == 2
    assert "--flight-plaintext needs a loopback" in capsys.readouterr().err


def test_commands_carry_the_specifications_type_urls() -> None:
    data = msg.pack(pb.CommandStatementQuery(query="SELECT 1"))
    assert b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery" in data
    assert msg.parse_command(data) == msg.StatementQuery("SELECT 1")
    ticket = msg.statement_ticket(b"h")
    assert msg.parse_ticket(ticket) == msg.StatementTicket(b"h")
    with pytest.raises(msg.UnsupportedRequest, match="CommandGetXdbcTypeInfo"):
        msg.parse_command(_any("CommandGetXdbcTypeInfo"))
    with pytest.raises(msg.UnsupportedRequest, match="not a Flight SQL command"):
        msg.parse_command(b"\xff\xff")


def _any(name: str) -> bytes:
    return any_pb2.Any(type_url=msg.TYPE_URL_PREFIX + name).SerializeToString()


def test_stopping_the_server_ends_a_streaming_doget_and_cancels_its_query(
    loop: asyncio.AbstractEventLoop, served: Served
) -> None:
    with served.client() as client:
        info = client.get_flight_info(statement(HANG), bearer(KEY))
        reader = client.do_get(info.endpoints[0].ticket, bearer(KEY))
        assert reader.schema == TABLE.schema  # the DoGet is running, waiting for batches
        on(loop, served.server.stop())
        assert served.router.wait_closed(1) == [HANG]
        with pytest.raises(flight.FlightUnavailableError, match="shutting down"):
            reader.read_all()


def test_controlplane_serve_flight_listen_serves_flight_sql_until_sigterm(tmp_path: Path) -> None:
    """The CLI wiring: `controlplane serve --flight-listen` serves Flight SQL with TLS on the
    control plane's loop, authenticates with a key from `apikey create`, and stops on SIGTERM."""
    data = tmp_path / "cp"
    key = ControlPlaneData(data).api_keys().create("analyst")
    argv = [sys.executable, "-m", "launcher.cli", "controlplane", "serve", "--data", str(data)]
    argv += ["--listen", "127.0.0.1:0", "--flight-listen", "127.0.0.1:0"]
    with subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=REPO) as serving:
        watchdog = threading.Timer(DEADLINE_S * 4, serving.kill)  # a hang fails, never stalls
        watchdog.start()
        try:
            location = _flight_location(serving)
            ca_pem = ControlPlaneData(data).ca().cert_pem()
            command = msg.pack(pb.CommandGetSqlInfo(info=[0]))
            descriptor = flight.FlightDescriptor.for_command(command)
            with flight.connect(location, tls_root_certs=ca_pem) as client:
                info = client.get_flight_info(descriptor, bearer(key))
                table = client.do_get(info.endpoints[0].ticket, bearer(key)).read_all()
            assert table.column("value").to_pylist() == ["duckcell"]
        finally:
            serving.send_signal(signal.SIGTERM)
            watchdog.cancel()
        assert serving.wait(DEADLINE_S * 2) == 0


def _flight_location(serving: subprocess.Popen[str]) -> str:
    """The Flight SQL location from the banner `controlplane serve` prints once it listens."""
    assert serving.stderr is not None
    lines = []
    for line in serving.stderr:
        lines.append(line)
        found = re.search(r"Flight SQL on (grpc\+tls://127\.0\.0\.1:\d+)", line)
        if found:
            return found[1]
    raise AssertionError(f"no Flight SQL banner; stderr was: {''.join(lines)}")


def test_the_control_plane_core_does_not_import_the_flight_surface() -> None:
    """Flight depends on the control plane, never the reverse (``launcher/flight/serve.py``)."""
    probe = "import sys, launcher.controlplane.server; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert "launcher.flight" not in loaded


def test_the_benchmarks_control_plane_process_serves_flight_sql(tmp_path: Path) -> None:
    """``duckcell controlplane serve --flight-listen`` in a process, as the benchmarks run it."""
    data = ControlPlaneData(tmp_path / "cp")
    key = data.api_keys().create("analyst")

    async def scenario() -> None:
        async with ControlPlaneProcess(data, flight=True) as control_plane:
            location = control_plane.flight_location
            await asyncio.to_thread(_sql_info, location, data.ca().cert_pem(), key)

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S * 4))


def _sql_info(location: str, ca_pem: bytes, key: str) -> None:
    descriptor = flight.FlightDescriptor.for_command(msg.pack(pb.CommandGetSqlInfo(info=[0])))
    with flight.connect(location, tls_root_certs=ca_pem) as client:
        info = client.get_flight_info(descriptor, bearer(key))
        table = client.do_get(info.endpoints[0].ticket, bearer(key)).read_all()
    assert table.column("value").to_pylist() == ["duckcell"]
