"""Bulk ingest (``CommandStatementIngest``) into the session's DuckDB.

What ``adbc_ingest``, pandas ``DataFrame.to_sql`` and polars ``write_database`` over ADBC, and
the Altertable client's ``ingest`` send: a ``DoPut`` whose batches are the rows, answered with
the number of rows written. The rows go to the connection's session sandbox as statement
parameters, never as SQL text: each column travels as one ``LIST`` value in the one parameter
row the runner binds (``updates.py``), and ``INSERT ... SELECT unnest(?), unnest(?), ...`` turns
them back into rows there (DuckDB zips unnests of equal length). The table's columns are the
upload's Arrow types as DuckDB names them (``column_types``, read from an empty DuckDB relation
of the schema: no rows and no client SQL reach DuckDB in the control plane).

Modes (the specification's table definition options): ``create`` (fail if it exists),
``append`` (fail if missing), create-or-append, ``replace`` (create or recreate), each into a
temporary table when asked. An ingest needs a session: on a per-query connection the table
would vanish with its sandbox, so it is refused (UNIMPLEMENTED) saying so.

Ingest into a **catalog table** the role may see (``duckcell.main.<table>``, or the bare name)
whose path is an S3 prefix (``s3://bucket/prefix/``) writes a new Parquet object under that
prefix through the existing write path, on any connection: ``COPY (SELECT ...) TO
's3://bucket/prefix/ingest-<uuid>.parquet'``, which the worker uploads with its own
credentials, and only where the role's policy allows writes under that prefix (else the write
path refuses it, PERMISSION_DENIED). A catalog table takes appends only (its other objects are
not the ingest's to replace), never a temporary one.

Uploads over ``MAX_INGEST_BYTES`` of Arrow data are refused (the parameters travel in one
message through the tunnel): split them into several ingests with ``append``.
"""

from __future__ import annotations

import uuid

import duckdb
import pyarrow as pa
import pyarrow.ipc as ipc

from launcher.controlplane.access import visible_tables
from launcher.model.catalog import Catalog, Table

from .listing import CATALOG_NAME, SCHEMA_NAME
from .messages import IngestCommand, InvalidRequest, UnsupportedRequest
from .options import quote

MAX_INGEST_BYTES = 32 * 1024 * 1024
TOO_LARGE = (
    "this upload holds {size} bytes of Arrow data, more than one ingest takes "
    f"({MAX_INGEST_BYTES} bytes): split it into several ingests (mode append)"
)
NEEDS_SESSION = (
    "bulk ingest needs a session, and role {role!r} runs each statement in a fresh sandbox "
    "that ends with it (the table would vanish at once): use a role whose policy is "
    "session-mode, or name a session with the header x-duckcell-session: <name>"
)


CATALOG_APPENDS_ONLY = (
    "{table!r} is a catalog table: ingest appends a new object to it (mode append or "
    "create_append, not temporary); it cannot create, replace or shadow it"
)
NOT_A_PREFIX = (
    "catalog table {table!r} is not over an S3 prefix (s3://bucket/prefix/), so ingest cannot "
    "add an object to it"
)


def catalog_table(catalog: Catalog, role: str, command: IngestCommand) -> Table | None:
    """The catalog table ``command`` ingests into, if it names one ``role`` may see."""
    if command.catalog not in (None, "", CATALOG_NAME) or command.schema not in (
        None,
        "",
        SCHEMA_NAME,
    ):
        return None
    for table in visible_tables(catalog, role):
        if table.name.lower() == command.table.lower():
            return table
    return None


def catalog_ingest_sql(command: IngestCommand, table: Table, schema: pa.Schema) -> str:
    """The ``COPY ... TO`` that writes the upload as a new object under ``table``'s prefix
    (one LIST parameter per column, as ``ingest_sql``)."""
    if command.if_exists != "append" or command.temporary:
        raise UnsupportedRequest(CATALOG_APPENDS_ONLY.format(table=table.name))
    if not (table.path.startswith("s3://") and table.path.endswith("/")):
        raise UnsupportedRequest(NOT_A_PREFIX.format(table=table.name))
    columns = ", ".join(
        f"CAST(unnest(?) AS {kind}) AS {quote(field.name)}"
        for field, kind in zip(schema, column_types(schema), strict=True)
    )
    destination = f"{table.path}ingest-{uuid.uuid4().hex}.parquet".replace("'", "''")
    return f"COPY (SELECT {columns}) TO '{destination}'"


def column_types(schema: pa.Schema) -> list[str]:
    """The DuckDB type of each column of ``schema`` (as DuckDB reads that Arrow type)."""
    connection = duckdb.connect()
    try:
        relation = connection.from_arrow(schema.empty_table())
        return [str(kind) for kind in relation.types]
    finally:
        connection.close()


def target(command: IngestCommand) -> str:
    """The quoted table name; the advertised catalog and schema name the session's own."""
    parts = [command.table]
    if command.schema not in (None, "", SCHEMA_NAME):
        parts.insert(0, command.schema)
        if command.catalog not in (None, "", CATALOG_NAME):
            parts.insert(0, command.catalog)
    elif command.catalog not in (None, "", CATALOG_NAME):
        raise InvalidRequest(
            f"ingest into catalog {command.catalog!r} needs a schema too (or use catalog "
            f"{CATALOG_NAME!r})"
        )
    return ".".join(quote(part) for part in parts)


def ingest_sql(command: IngestCommand, schema: pa.Schema) -> str:
    """The statements that ingest rows of ``schema`` as ``command`` asks (the last one, the
    INSERT, takes one LIST parameter per column)."""
    name = target(command)
    columns = ", ".join(
        f"{quote(field.name)} {kind}"
        for field, kind in zip(schema, column_types(schema), strict=True)
    )
    temp = "TEMP " if command.temporary else ""
    statements: list[str] = []
    if command.if_missing == "create":
        if command.if_exists == "replace":
            statements.append(f"CREATE OR REPLACE {temp}TABLE {name} ({columns})")
        elif command.if_exists == "append":
            statements.append(f"CREATE {temp}TABLE IF NOT EXISTS {name} ({columns})")
        else:
            statements.append(f"CREATE {temp}TABLE {name} ({columns})")
    elif command.if_exists == "replace":
        statements.append(f"DELETE FROM {name}")  # must exist: emptied, then filled
    elif command.if_exists == "fail":
        raise InvalidRequest("ingest with 'fail if missing' and 'fail if exists' cannot succeed")
    unnests = ", ".join("unnest(?)" for _field in schema)
    statements.append(f"INSERT INTO {name} SELECT {unnests}")
    return ";\n".join(statements)


def ingest_parameters(table: pa.Table) -> bytes:
    """One parameter row: each column of ``table`` as one LIST value, as an IPC stream."""
    size = table.nbytes
    if size > MAX_INGEST_BYTES:
        raise InvalidRequest(TOO_LARGE.format(size=size))
    columns = []
    for column in table.columns:
        values = column.combine_chunks()
        columns.append(pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values))
    row = pa.table(columns, names=[str(i) for i in range(len(columns))])
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, row.schema) as writer:
        writer.write_table(row)
    return sink.getvalue().to_pybytes()
