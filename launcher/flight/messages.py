"""Flight SQL's protobuf messages in and out, as small domain values.

Flight SQL wraps each command in ``google.protobuf.Any``: a descriptor's ``cmd``, a ticket, an
action's body and its results. The project's message definitions live in package
``duckcell.flightsql.v1`` (``launcher/protocol/flightsql.proto``) so they cannot clash in
protobuf's global pool, which means ``Any.Pack`` would write our type URL; clients expect the
specification's (``type.googleapis.com/arrow.flight.protocol.sql.<Message>``), so this module
writes and reads type URLs itself. Nothing outside this module sees a protobuf type; a message
this server does not handle raises ``UnsupportedRequest``.

A message that does not parse raises ``InvalidRequest`` (INVALID_ARGUMENT), one line saying
what is wrong; a statement (``query``) that is not UTF-8 or holds a NUL byte raises
``StatementTextError`` (``launcher.inputs``, INVALID_ARGUMENT too) naming the byte and its
offset. protobuf only says "String field had bad UTF-8", so the field and the byte are found
again from the raw fields (``_undecodable``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa
from google.protobuf import any_pb2, empty_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from launcher.inputs import check_statement_text, statement_text
from launcher.protocol import flightsql_pb2 as pb

TYPE_URL_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
# The field every statement-carrying message keeps its SQL in.
STATEMENT_FIELD = "query"
_LENGTH_DELIMITED = 2  # protobuf's wire type of strings and bytes

M = TypeVar("M", bound=Message)

# Action types (DoAction) the server answers.
CREATE_PREPARED_STATEMENT = "CreatePreparedStatement"
CLOSE_PREPARED_STATEMENT = "ClosePreparedStatement"
CLOSE_SESSION = "CloseSession"
SET_SESSION_OPTIONS = "SetSessionOptions"
GET_SESSION_OPTIONS = "GetSessionOptions"
BEGIN_TRANSACTION = "BeginTransaction"
END_TRANSACTION = "EndTransaction"
# SetSessionOptionsResult's per-option error codes.
INVALID_OPTION_NAME = pb.SetSessionOptionsResult.ERROR_VALUE_INVALID_NAME
INVALID_OPTION_VALUE = pb.SetSessionOptionsResult.ERROR_VALUE_INVALID_VALUE
OPTION_ERROR = pb.SetSessionOptionsResult.ERROR_VALUE_ERROR


class UnsupportedRequest(Exception):
    """A Flight SQL message this server does not handle (yet); the message names it."""


class InvalidRequest(Exception):
    """A request this server understands but cannot take as sent (a malformed session name,
    several parameter rows); the message says what to send instead."""


@dataclass(frozen=True, slots=True)
class StatementQuery:
    sql: str


@dataclass(frozen=True, slots=True)
class PreparedStatementQuery:
    handle: bytes


@dataclass(frozen=True, slots=True)
class PreparedStatementUpdate:
    handle: bytes


@dataclass(frozen=True, slots=True)
class StatementUpdate:
    sql: str


@dataclass(frozen=True, slots=True)
class IngestCommand:
    """``CommandStatementIngest``: where the uploaded batches go and what to do when the table
    exists (``if_exists``: "fail", "append", "replace") or not (``if_missing``: "create",
    "fail")."""

    table: str
    schema: str | None = None
    catalog: str | None = None
    temporary: bool = False
    if_missing: str = "create"
    if_exists: str = "fail"


@dataclass(frozen=True, slots=True)
class StatementTicket:
    handle: bytes


@dataclass(frozen=True, slots=True)
class SqlInfoRequest:
    ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CatalogsRequest:
    pass


@dataclass(frozen=True, slots=True)
class DbSchemasRequest:
    """``None`` filters match everything; patterns are SQL LIKE patterns (``%``, ``_``)."""

    catalog: str | None = None
    db_schema_pattern: str | None = None


@dataclass(frozen=True, slots=True)
class TablesRequest:
    include_schema: bool
    catalog: str | None = None
    db_schema_pattern: str | None = None
    table_pattern: str | None = None
    table_types: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TableTypesRequest:
    pass


MetadataRequest = (
    SqlInfoRequest | CatalogsRequest | DbSchemasRequest | TablesRequest | TableTypesRequest
)
Command = StatementQuery | PreparedStatementQuery | MetadataRequest
PutCommand = PreparedStatementQuery | PreparedStatementUpdate | StatementUpdate | IngestCommand
Ticket = StatementTicket | MetadataRequest


def pack(message: Message) -> bytes:
    """``message`` in an ``Any`` with the specification's type URL, serialized."""
    wrapper = any_pb2.Any(
        type_url=TYPE_URL_PREFIX + message.DESCRIPTOR.name, value=message.SerializeToString()
    )
    return wrapper.SerializeToString()


def unpack(data: bytes) -> tuple[str, bytes]:
    """The message name and body of a serialized ``Any`` from a Flight SQL client."""
    wrapper = any_pb2.Any()
    try:
        wrapper.ParseFromString(data)
    except DecodeError:
        raise UnsupportedRequest("not a Flight SQL command (expected a protobuf Any)") from None
    if not wrapper.type_url.startswith(TYPE_URL_PREFIX):
        raise UnsupportedRequest(f"not a Flight SQL command: {wrapper.type_url or 'no type'}")
    return wrapper.type_url.removeprefix(TYPE_URL_PREFIX), wrapper.value


def _metadata(name: str, body: bytes) -> MetadataRequest | None:
    if name == "CommandGetSqlInfo":
        return SqlInfoRequest(tuple(_parse(pb.CommandGetSqlInfo, body).info))
    if name == "CommandGetCatalogs":
        return CatalogsRequest()
    if name == "CommandGetDbSchemas":
        schemas = _parse(pb.CommandGetDbSchemas, body)
        return DbSchemasRequest(
            _optional(schemas, "catalog"), _optional(schemas, "db_schema_filter_pattern")
        )
    if name == "CommandGetTables":
        tables = _parse(pb.CommandGetTables, body)
        return TablesRequest(
            tables.include_schema,
            _optional(tables, "catalog"),
            _optional(tables, "db_schema_filter_pattern"),
            _optional(tables, "table_name_filter_pattern"),
            tuple(tables.table_types),
        )
    if name == "CommandGetTableTypes":
        return TableTypesRequest()
    return None


def _parse(message_type: type[M], body: bytes) -> M:
    """``body`` as a ``message_type``; ``InvalidRequest`` (or ``StatementTextError``) when it
    is not one."""
    try:
        return message_type.FromString(body)
    except DecodeError:
        raise InvalidRequest(_undecodable(message_type, body)) from None


def _statement(message_type: type[Message], body: bytes) -> str:
    """The SQL of a statement-carrying message, refused unless UTF-8 text without NUL."""
    sql: str = getattr(_parse(message_type, body), STATEMENT_FIELD)
    check_statement_text(sql)
    return sql


def _undecodable(message_type: type[Message], body: bytes) -> str:
    """Why ``body`` is no ``message_type``: the string field whose bytes are not UTF-8 (the
    statement's raises ``StatementTextError`` with the byte and its offset), else in general."""
    name = message_type.DESCRIPTOR.name
    fields = message_type.DESCRIPTOR.fields_by_number
    try:
        raw = UnknownFieldSet(empty_pb2.Empty.FromString(body))  # every field, undecoded
    except DecodeError:
        return f"a malformed {name} message (not protobuf); send the Flight SQL message"
    for item in raw:
        field = fields.get(item.field_number)
        if (
            field is None
            or field.type != FieldDescriptor.TYPE_STRING
            or item.wire_type != _LENGTH_DELIMITED
        ):
            continue
        if field.name == STATEMENT_FIELD:
            statement_text(item.data)  # raises when it is the culprit
            continue
        try:
            item.data.decode("utf-8")
        except UnicodeDecodeError as error:
            return (
                f"{name}.{field.name} is not valid UTF-8 (byte 0x{item.data[error.start]:02x} "
                f"at offset {error.start}): send it as UTF-8"
            )
    return f"a malformed {name} message; send the Flight SQL message the specification defines"


def _optional(message: Message, field: str) -> str | None:
    """An ``optional string`` field: ``None`` when the client left it out (match all)."""
    return str(getattr(message, field)) if message.HasField(field) else None


def parse_command(data: bytes) -> Command:
    """A ``GetFlightInfo`` descriptor's command."""
    name, body = unpack(data)
    if name == "CommandStatementQuery":
        return StatementQuery(_statement(pb.CommandStatementQuery, body))
    if name == "CommandPreparedStatementQuery":
        message = _parse(pb.CommandPreparedStatementQuery, body)
        return PreparedStatementQuery(message.prepared_statement_handle)
    found = _metadata(name, body)
    if found is None:
        raise UnsupportedRequest(f"{name} is not supported by this server yet")
    return found


def parse_ticket(data: bytes) -> Ticket:
    """A ``DoGet`` ticket: a statement's (``statement_ticket``) or a metadata command."""
    name, body = unpack(data)
    if name == "TicketStatementQuery":
        return StatementTicket(_parse(pb.TicketStatementQuery, body).statement_handle)
    found = _metadata(name, body)
    if found is None:
        raise UnsupportedRequest(f"a {name} ticket is not one this server hands out")
    return found


def parse_put(data: bytes) -> PutCommand:
    """A ``DoPut`` descriptor's command: parameters for a prepared statement, or an update."""
    name, body = unpack(data)
    if name == "CommandPreparedStatementQuery":
        message = _parse(pb.CommandPreparedStatementQuery, body)
        return PreparedStatementQuery(message.prepared_statement_handle)
    if name == "CommandPreparedStatementUpdate":
        update = _parse(pb.CommandPreparedStatementUpdate, body)
        return PreparedStatementUpdate(update.prepared_statement_handle)
    if name == "CommandStatementUpdate":
        return StatementUpdate(_statement(pb.CommandStatementUpdate, body))
    if name == "CommandStatementIngest":
        return _ingest(_parse(pb.CommandStatementIngest, body))
    raise UnsupportedRequest(f"DoPut with {name} is not supported by this server")


def put_prepared_result(handle: bytes) -> bytes:
    """The PutResult metadata after binding parameters: the raw message, not in an ``Any``
    (the ADBC driver reads it so); the handle stays the same."""
    return pb.DoPutPreparedStatementResult(prepared_statement_handle=handle).SerializeToString()


def put_update_result(count: int) -> bytes:
    """The PutResult metadata of an update: the affected row count, raw like the above."""
    return pb.DoPutUpdateResult(record_count=count).SerializeToString()


def statement_ticket(handle: bytes) -> bytes:
    return pack(pb.TicketStatementQuery(statement_handle=handle))


def metadata_ticket(command: bytes) -> bytes:
    """Metadata commands are their own tickets: DoGet gets the same ``Any`` back."""
    return command


def parse_create_prepared(body: bytes) -> str:
    """The SQL of a ``CreatePreparedStatement`` action."""
    name, value = unpack(body)
    if name != "ActionCreatePreparedStatementRequest":
        raise UnsupportedRequest(f"CreatePreparedStatement with a {name} body")
    return _statement(pb.ActionCreatePreparedStatementRequest, value)


def parse_close_prepared(body: bytes) -> bytes:
    """The handle of a ``ClosePreparedStatement`` action."""
    name, value = unpack(body)
    if name != "ActionClosePreparedStatementRequest":
        raise UnsupportedRequest(f"ClosePreparedStatement with a {name} body")
    return _parse(pb.ActionClosePreparedStatementRequest, value).prepared_statement_handle


def prepared_result(
    handle: bytes, *, is_update: bool = False, parameters: tuple[str, ...] = ()
) -> bytes:
    """``CreatePreparedStatement``'s answer. The dataset schema is left empty ("known when it
    runs": only the sandbox knows it); the parameter schema names each parameter (its type is
    the sandbox's to decide: null here). ``is_update`` makes the driver execute with
    ``CommandPreparedStatementUpdate`` and read a row count instead of a result."""
    result = pb.ActionCreatePreparedStatementResult(
        prepared_statement_handle=handle, is_update=is_update
    )
    if parameters:
        schema = pa.schema([pa.field(name, pa.null()) for name in parameters])
        result.parameter_schema = schema.serialize().to_pybytes()
    return pack(result)


def close_session_result() -> bytes:
    """``CloseSession``'s answer (a plain Flight message, not wrapped in ``Any``)."""
    return pb.CloseSessionResult(status=pb.CloseSessionResult.STATUS_CLOSED).SerializeToString()


_Options = pb.CommandStatementIngest.TableDefinitionOptions
_IF_MISSING = {
    _Options.TABLE_NOT_EXIST_OPTION_UNSPECIFIED: "create",
    _Options.TABLE_NOT_EXIST_OPTION_CREATE: "create",
    _Options.TABLE_NOT_EXIST_OPTION_FAIL: "fail",
}
_IF_EXISTS = {
    _Options.TABLE_EXISTS_OPTION_UNSPECIFIED: "fail",
    _Options.TABLE_EXISTS_OPTION_FAIL: "fail",
    _Options.TABLE_EXISTS_OPTION_APPEND: "append",
    _Options.TABLE_EXISTS_OPTION_REPLACE: "replace",
}


def _ingest(message: pb.CommandStatementIngest) -> IngestCommand:
    if not message.table:
        raise InvalidRequest("CommandStatementIngest without a table name: name the table")
    options = message.table_definition_options
    if_missing = _IF_MISSING.get(options.if_not_exist)
    if_exists = _IF_EXISTS.get(options.if_exists)
    if if_missing is None or if_exists is None:
        raise InvalidRequest("CommandStatementIngest: unknown table definition options")
    return IngestCommand(
        message.table,
        _optional(message, "schema"),
        _optional(message, "catalog"),
        message.temporary,
        if_missing,
        if_exists,
    )


def parse_set_options(body: bytes) -> dict[str, object]:
    """The options a ``SetSessionOptions`` action sets: a string, bool, int, float or list of
    strings each, ``None`` for an option sent without a value (unset it)."""
    request = _parse(pb.SetSessionOptionsRequest, body)
    values: dict[str, object] = {}
    for name, option in request.session_options.items():
        kind = option.WhichOneof("option_value")
        value = None if kind is None else getattr(option, kind)
        if kind == "string_list_value":
            value = list(option.string_list_value.values)
        values[name] = value
    return values


def set_options_result(errors: dict[str, int]) -> bytes:
    """``SetSessionOptions``' answer (unwrapped): an error code per option not set."""
    result = pb.SetSessionOptionsResult()
    for name, code in errors.items():
        result.errors[name].value = code  # type: ignore[assignment]
    return result.SerializeToString()


def get_options_result(values: dict[str, str]) -> bytes:
    """``GetSessionOptions``' answer (unwrapped): each option as a string value."""
    result = pb.GetSessionOptionsResult()
    for name, value in values.items():
        result.session_options[name].string_value = value
    return result.SerializeToString()


def parse_begin_transaction(body: bytes) -> None:
    """Checks a ``BeginTransaction`` action's body (it carries nothing)."""
    name, _value = unpack(body)
    if name != "ActionBeginTransactionRequest":
        raise UnsupportedRequest(f"BeginTransaction with a {name} body")


def begin_transaction_result(transaction_id: bytes) -> bytes:
    return pack(pb.ActionBeginTransactionResult(transaction_id=transaction_id))


def parse_end_transaction(body: bytes) -> tuple[bytes, bool]:
    """The transaction an ``EndTransaction`` action ends and whether it commits (else it
    rolls back)."""
    name, value = unpack(body)
    if name != "ActionEndTransactionRequest":
        raise UnsupportedRequest(f"EndTransaction with a {name} body")
    request = _parse(pb.ActionEndTransactionRequest, value)
    if request.action == pb.ActionEndTransactionRequest.END_TRANSACTION_COMMIT:
        return request.transaction_id, True
    if request.action == pb.ActionEndTransactionRequest.END_TRANSACTION_ROLLBACK:
        return request.transaction_id, False
    raise InvalidRequest("EndTransaction without an action: send COMMIT or ROLLBACK")
