"""The Flight SQL handlers: statements, prepared statements, metadata, actions.

Every handler runs on one of pyarrow.flight's threads, after ``ApiKeyMiddlewareFactory`` has
authenticated the call. A statement is routed at ``GetFlightInfo`` and streamed at ``DoGet``
(``statements.py`` says why); metadata commands are answered here, their command bytes doubling
as their ticket. Batches are decoded from the worker's Arrow IPC bytes and re-framed for Flight,
never converted row by row.

Prepared statements are SQL text kept per key with the parameters last bound to them
(``DoPut``, see ``updates.py``): the ADBC driver always prepares, even without parameters, so
executing one routes its SQL like a plain statement. Every routed statement passes the role
rule first (``gateway.py``). Statements that change data answer ``DoPut`` with their row count.
A statement runs in its connection's session when the role is session-mode or the call names
a session in ``x-duckcell-session`` (``sessions.py``); ``CloseSession`` ends it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight

from launcher.controlplane.apikeys import ApiKey
from launcher.errors import SessionError
from launcher.model.sql import check_statement

from . import metadata
from .auth import caller_of, connection_of
from .bridge import LoopBridge
from .gateway import Gateway
from .ingest import (
    MAX_INGEST_BYTES,
    catalog_ingest_sql,
    catalog_table,
    ingest_parameters,
    ingest_sql,
)
from .ingest import NEEDS_SESSION as INGEST_NEEDS_SESSION
from .listing import CatalogListing
from .messages import (
    BEGIN_TRANSACTION,
    CLOSE_PREPARED_STATEMENT,
    CLOSE_SESSION,
    CREATE_PREPARED_STATEMENT,
    END_TRANSACTION,
    GET_SESSION_OPTIONS,
    SET_SESSION_OPTIONS,
    CatalogsRequest,
    DbSchemasRequest,
    IngestCommand,
    MetadataRequest,
    PreparedStatementQuery,
    PreparedStatementUpdate,
    StatementQuery,
    StatementTicket,
    TablesRequest,
    UnsupportedRequest,
    begin_transaction_result,
    close_session_result,
    get_options_result,
    metadata_ticket,
    parse_begin_transaction,
    parse_close_prepared,
    parse_command,
    parse_create_prepared,
    parse_end_transaction,
    parse_put,
    parse_set_options,
    parse_ticket,
    prepared_result,
    put_prepared_result,
    put_update_result,
    set_options_result,
    statement_ticket,
)
from .options import SessionOptions
from .placeholders import Placeholders, scan
from .statements import Prepared, PreparedStatements, QueryTickets, RunningQuery, UnknownHandle
from .status import handler, status_of, streamed, translated
from .transactions import NO_TRANSACTIONS, UNKNOWN_TRANSACTION, Transactions
from .updates import (
    EXECUTEMANY,
    MANY_FOR_A_QUERY,
    changes_data,
    parameter_rows,
    read_parameters,
    read_upload,
    update_count,
)

log = logging.getLogger(__name__)

# A ticket handle starting so names a prepared statement run at DoGet (bound late).
LATE_BIND = b"late:"

ACTIONS = [
    (CREATE_PREPARED_STATEMENT, "prepare a statement (one parameter set per execution)"),
    (CLOSE_PREPARED_STATEMENT, "forget a prepared statement"),
    (CLOSE_SESSION, "end this connection's session (its sandbox too)"),
    (SET_SESSION_OPTIONS, "set the connection's catalog and schema"),
    (GET_SESSION_OPTIONS, "the connection's catalog and schema"),
    (BEGIN_TRANSACTION, "begin a transaction in the connection's session"),
    (END_TRANSACTION, "commit or roll back the connection's transaction"),
]


class FlightSqlService(flight.FlightServerBase):
    """pyarrow.flight's server with duckcell's handlers; it listens once constructed."""

    def __init__(
        self,
        location: str,
        *,
        gateway: Gateway,
        bridge: LoopBridge,
        tickets: QueryTickets,
        prepared: PreparedStatements,
        **server_options: object,
    ) -> None:
        super().__init__(location, **server_options)  # type: ignore[arg-type]
        self.gateway = gateway
        self._bridge = bridge
        self.listing = CatalogListing(gateway, bridge)
        self.tickets = tickets
        self.prepared = prepared
        self.options = SessionOptions()
        self.transactions = Transactions()

    @handler
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        caller = caller_of(context)
        with translated():
            command = parse_command(descriptor.command)
        if isinstance(command, StatementQuery):
            return self._statement_info(caller, command.sql, b"", descriptor, context)
        if isinstance(command, PreparedStatementQuery):
            prepared = self._prepared(command.handle, caller)
            if prepared.placeholders.count and not prepared.parameters:
                # Parameters bound after GetFlightInfo (the Altertable client's order): the
                # statement runs at DoGet with what is bound by then; the schema comes with
                # the stream.
                late = statement_ticket(LATE_BIND + command.handle)
                return _info(pa.schema([]), descriptor, late)
            parameters = _one_set(prepared.parameters)
            return self._statement_info(caller, prepared.sql, parameters, descriptor, context)
        ticket = metadata_ticket(descriptor.command)
        return _info(metadata.schema_of(command), descriptor, ticket)

    @handler
    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.FlightDataStream:
        caller = caller_of(context)
        with translated():
            request = parse_ticket(ticket.ticket)
        if not isinstance(request, StatementTicket):
            return flight.RecordBatchStream(self._metadata(caller, request, context))
        if request.handle.startswith(LATE_BIND):
            prepared = self._prepared(request.handle.removeprefix(LATE_BIND), caller)
            query = self._open(caller, prepared.sql, _one_set(prepared.parameters), context)
            self.tickets.streaming(query)
            return flight.GeneratorStream(query.schema, streamed(self._stream(query, context)))
        with translated():
            query = self.tickets.claim(request.handle, caller.key_id)
        if query.table is not None:  # it arrived whole at GetFlightInfo
            self.tickets.done(query)
            return flight.RecordBatchStream(query.table)
        return flight.GeneratorStream(query.schema, streamed(self._stream(query, context)))

    @handler
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        """Bind parameters to a prepared statement, or run an update and send its count.

        The answer is PutResult metadata: a ``DoPutPreparedStatementResult`` or a
        ``DoPutUpdateResult``, serialized as they are (not in an ``Any``)."""
        caller = caller_of(context)
        with translated():
            command = parse_put(descriptor.command)
        if isinstance(command, IngestCommand):
            writer.write(
                pa.py_buffer(put_update_result(self._ingest(caller, command, reader, context)))
            )
            return
        with translated():
            table = read_parameters(reader)
        if isinstance(command, PreparedStatementQuery):
            prepared = self._prepared(command.handle, caller)
            with translated():
                rows = parameter_rows(table, prepared.placeholders)
                self.prepared.bind(command.handle, caller.key_id, rows)
            writer.write(pa.py_buffer(put_prepared_result(command.handle)))
            return
        if isinstance(command, PreparedStatementUpdate):
            prepared = self._prepared(command.handle, caller)
            with translated():
                rows = parameter_rows(table, prepared.placeholders) or prepared.parameters
            sql = prepared.sql
        else:
            sql = command.sql
            with translated():
                rows = parameter_rows(table, Placeholders(sql))
        count = self._update_each(caller, sql, rows, context)
        writer.write(pa.py_buffer(put_update_result(count)))

    @handler
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> list[bytes]:
        caller = caller_of(context)
        body = action.body.to_pybytes() if action.body is not None else b""
        with translated():
            if action.type == CREATE_PREPARED_STATEMENT:
                sql = parse_create_prepared(body)
                check_statement(sql)  # first: a prepared statement is kept until closed
                is_update = changes_data(sql, self.gateway.parse)
                placeholders = scan(sql)
                handle = self.prepared.create(caller.key_id, placeholders, is_update=is_update)
                names = placeholders.names or tuple(map(str, range(placeholders.count)))
                return [prepared_result(handle, is_update=is_update, parameters=names)]
            if action.type == CLOSE_PREPARED_STATEMENT:  # idempotent: see PreparedStatements
                self.prepared.close(parse_close_prepared(body), caller.key_id)
                return []
        connection = connection_of(context)
        if action.type == CLOSE_SESSION:
            if connection is not None:
                self.options.forget(caller, connection)
                self.transactions.forget(caller, connection)
                with translated():
                    self.gateway.sessions.close(caller, connection)
            return [close_session_result()]
        if action.type == SET_SESSION_OPTIONS:
            values = parse_set_options(body)
            in_session = connection is not None and (
                connection.kind == "header" or self.gateway.session_roles(caller.role)
            )

            def use(sql: str) -> None:
                self._update(caller, sql, b"", context)

            errors = self.options.set(caller, connection, values, use if in_session else None)
            return [set_options_result(errors)]
        if action.type == GET_SESSION_OPTIONS:
            return [get_options_result(self.options.get(caller, connection))]
        if action.type == BEGIN_TRANSACTION:
            parse_begin_transaction(body)
            if connection is None or not self.gateway.runs_in_session(caller, connection):
                raise UnsupportedRequest(NO_TRANSACTIONS.format(role=caller.role))
            if not self.gateway.sessions.current(caller, connection):
                # No session (never opened, or it ended unseen): no transaction either.
                self.transactions.forget(caller, connection)
            transaction_id = self.transactions.begin(caller, connection)
            try:
                self._update(caller, "BEGIN TRANSACTION", b"", context)
            except BaseException:
                self.transactions.cancel(caller, connection, transaction_id)
                raise
            return [begin_transaction_result(transaction_id)]
        if action.type == END_TRANSACTION:
            transaction_id, commit = parse_end_transaction(body)
            if connection is None:
                raise UnknownHandle(UNKNOWN_TRANSACTION)
            self.transactions.end(caller, connection, transaction_id)
            self._update(caller, "COMMIT" if commit else "ROLLBACK", b"", context)
            return []
        unsupported = UnsupportedRequest(f"action {action.type!r} is not supported by this server")
        raise status_of(unsupported)

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return ACTIONS

    # Flight calls Flight SQL does not use: pyarrow's defaults would answer with a bare
    # NotImplementedError and its traceback; these say what to call instead.
    @handler
    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        raise UnsupportedRequest(
            "GetSchema is not supported: call GetFlightInfo, whose answer carries the schema"
        )

    @handler
    def list_flights(
        self, context: flight.ServerCallContext, criteria: bytes
    ) -> Iterator[flight.FlightInfo]:
        raise UnsupportedRequest("ListFlights is not supported: send Flight SQL commands")

    @handler
    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        raise UnsupportedRequest("DoExchange is not supported: send Flight SQL commands")

    def _prepared(self, handle: bytes, caller: ApiKey) -> Prepared:
        with translated():
            return self.prepared.get(handle, caller.key_id)

    def _metadata(
        self, caller: ApiKey, request: MetadataRequest, context: flight.ServerCallContext
    ) -> pa.Table:
        connection = connection_of(context)
        with translated():
            if isinstance(request, CatalogsRequest):
                return self.listing.catalogs(caller, connection, context.is_cancelled)
            if isinstance(request, DbSchemasRequest):
                return self.listing.db_schemas(caller, request, connection, context.is_cancelled)
            if isinstance(request, TablesRequest):
                return self.listing.tables(caller, request, context.is_cancelled, connection)
            return metadata.answer(request, sessions=self.gateway.session_roles(caller.role))

    def _ingest(
        self,
        caller: ApiKey,
        command: IngestCommand,
        reader: flight.MetadataRecordBatchReader,
        context: flight.ServerCallContext,
    ) -> int:
        """Ingest the uploaded rows into a catalog table through the write path, or into the
        connection's session (``ingest.py``)."""
        target = catalog_table(self.gateway.catalog(), caller.role, command)
        if target is None and not self.gateway.runs_in_session(caller, connection_of(context)):
            raise UnsupportedRequest(INGEST_NEEDS_SESSION.format(role=caller.role))
        with translated():
            table = read_upload(reader, MAX_INGEST_BYTES, "an ingest")
            sql = (
                ingest_sql(command, table.schema)
                if target is None
                else catalog_ingest_sql(command, target, table.schema)
            )
            parameters = ingest_parameters(table)
        log.info("flight ingest of %d rows from key %s", table.num_rows, caller.key_id)
        return self._update(caller, sql, parameters, context)

    def _statement_info(
        self,
        caller: ApiKey,
        sql: str,
        parameters: bytes,
        descriptor: flight.FlightDescriptor,
        context: flight.ServerCallContext,
    ) -> flight.FlightInfo:
        """Route ``sql`` now and read its schema; the rest waits for ``DoGet``."""
        log.info("flight query from key %s (%s)", caller.key_id, caller.role)
        with translated():
            self.tickets.check_room(caller.key_id)
        query = self._open(caller, sql, parameters, context)
        with translated():
            query.prefetch()
            handle = self.tickets.park(query)
        return _info(query.schema, descriptor, statement_ticket(handle))

    def _update_each(
        self,
        caller: ApiKey,
        sql: str,
        rows: tuple[bytes, ...],
        context: flight.ServerCallContext,
    ) -> int:
        """Run ``sql`` once per parameter set (once without any); the summed row count.
        Several sets run in the connection's session only (``updates.py``)."""
        if len(rows) <= 1:
            return self._update(caller, sql, rows[0] if rows else b"", context)
        if not self.gateway.runs_in_session(caller, connection_of(context)):
            raise UnsupportedRequest(EXECUTEMANY.format(rows=len(rows)))
        return sum(self._update(caller, sql, row, context) for row in rows)

    def _update(
        self, caller: ApiKey, sql: str, parameters: bytes, context: flight.ServerCallContext
    ) -> int:
        """Run a statement that changes data to its end; its affected-row count."""
        log.info("flight update from key %s (%s)", caller.key_id, caller.role)
        query = self._open(caller, sql, parameters, context)
        with translated():
            table = pa.Table.from_batches(list(query.batches(context.is_cancelled)), query.schema)
        return update_count(table, query.result.rows)

    def _open(
        self, caller: ApiKey, sql: str, parameters: bytes, context: flight.ServerCallContext
    ) -> RunningQuery:
        """Route ``sql`` (in the connection's session, if it runs in one) and read its schema."""
        connection = connection_of(context)
        with translated():
            result = self.gateway.route(caller, sql, parameters, connection)
            try:
                return RunningQuery.open(self._bridge, caller.key_id, result, context.is_cancelled)
            except SessionError:
                if connection is not None:  # ended: the connection's next statement reopens
                    self.gateway.sessions.forget(caller, connection)
                    self.transactions.forget(caller, connection)  # ended with its session
                    self.options.forget(caller, connection)  # a new session starts at home
                raise

    def _stream(
        self, query: RunningQuery, context: flight.ServerCallContext
    ) -> Iterator[pa.RecordBatch]:
        try:
            with translated():
                yield from query.batches(context.is_cancelled)
        finally:
            self.tickets.done(query)


def _info(
    schema: pa.Schema, descriptor: flight.FlightDescriptor, ticket: bytes
) -> flight.FlightInfo:
    """One endpoint without locations: the client fetches from this same server."""
    endpoint = flight.FlightEndpoint(ticket, [])
    return flight.FlightInfo(schema, descriptor, [endpoint], -1, -1)


def _one_set(rows: tuple[bytes, ...]) -> bytes:
    """The one parameter set a query runs with (``b""``: none); several are refused."""
    if len(rows) > 1:
        raise UnsupportedRequest(MANY_FOR_A_QUERY.format(rows=len(rows)))
    return rows[0] if rows else b""
