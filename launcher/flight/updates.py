"""Bound parameters and statements that change data, as Flight SQL carries them.

Parameters: the ADBC driver binds values with ``DoPut(CommandPreparedStatementQuery)`` (or
``...Update``), one record batch whose columns are named "0", "1", ... in placeholder order. The
server keeps them with the prepared handle as an Arrow IPC stream of that one row, which travels
untouched (control plane -> tunnel -> worker -> runner) to the sandbox, where DuckDB binds the
values (``con.execute(sql, params)``): they are never written into the SQL text.

``executemany`` sends all its rows in one ``DoPut``; each row is kept as a parameter set of its
own (``parameter_rows``). In a session they all run in the session's sandbox, one execution per
row, and the answer is the sum of their counts. On a per-query connection that is refused with
a message saying so: a per-query sandbox per row would start N sandboxes for one call, and a
data-changing batch would land in N sandboxes' temp state, which is worse than an honest
refusal. Columns bound by name (``$id``) are put in the order ``placeholders.py`` gave them.

Statements that change data: the driver asks at prepare time (``is_update``), and DuckDB would
execute a non-SELECT statement merely to compute a result schema, so the kind of statement is
read from DuckDB's parser (``changes_data``, through the control plane's parser processes)
before anything runs. An update runs like a query
and its affected-row count (DuckDB's ``Count`` column) is the answer. In a per-query sandbox
DDL and DML change only that sandbox's temporary state, destroyed with it: nothing persists.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pyarrow.ipc as ipc

from launcher.errors import SqlError, StatementLimitError
from launcher.model.sql import ParsedSql

from .messages import InvalidRequest
from .placeholders import Placeholders

# Statement types that return rows (everything else is executed for its effect).
QUERY_TYPES = {"SELECT", "EXPLAIN", "PRAGMA"}
EXECUTEMANY = (
    "this connection runs each statement in a fresh sandbox and got {rows} parameter sets: "
    "executemany is not supported there (it runs in sessions only); run the statement once "
    "per parameter set, or insert many rows with INSERT ... SELECT"
)
MANY_FOR_A_QUERY = (
    "a query takes one parameter set per execution and got {rows}: execute it once per set"
)
UNBOUND = "no value bound for parameter ${name}: bind a column named {name!r}"


def changes_data(sql: str, parse: Callable[[str], ParsedSql]) -> bool:
    """Whether ``sql``'s last statement is not a query (INSERT, CREATE, ...), by DuckDB's
    parser (``parse``), without running it. SQL that does not parse counts as a query:
    running it then reports DuckDB's own message. A statement too large or too costly to
    parse raises ``StatementLimitError``."""
    try:
        statements = parse(sql).statements
    except StatementLimitError:
        raise
    except SqlError:
        return False
    return bool(statements) and statements[-1].kind not in QUERY_TYPES


# What one DoPut may bind: parameter sets are kept per row with the prepared handle until it is
# closed (each as an IPC stream, its schema included), so both the rows and their bytes are
# bounded. Past either the call is refused, having held at most this much.
MAX_PARAMETER_ROWS = 10_000
MAX_PARAMETER_BYTES = 16 * 1024 * 1024


def read_upload(reader: flight.MetadataRecordBatchReader, max_bytes: int, what: str) -> pa.Table:
    """The record batches a DoPut uploads, read one at a time and refused (``InvalidRequest``)
    as soon as their Arrow data passes ``max_bytes``: never the whole upload first."""
    batches: list[pa.RecordBatch] = []
    size = 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        if chunk.data is None:
            continue
        size += chunk.data.nbytes
        if size > max_bytes:
            raise InvalidRequest(
                f"{what} of more than {max_bytes} bytes of Arrow data: send it in smaller calls"
            )
        batches.append(chunk.data)
    return pa.Table.from_batches(batches, schema=reader.schema)


def read_parameters(reader: flight.MetadataRecordBatchReader) -> pa.Table | None:
    """The parameter sets a DoPut carries, one per row (``None`` when it has no rows); at most
    ``MAX_PARAMETER_ROWS`` rows and ``MAX_PARAMETER_BYTES`` of Arrow data."""
    table = read_upload(reader, MAX_PARAMETER_BYTES, "parameters")
    if table.num_rows > MAX_PARAMETER_ROWS:
        raise InvalidRequest(
            f"{table.num_rows} parameter sets in one call; bind at most {MAX_PARAMETER_ROWS} "
            "(or ingest the rows: adbc_ingest)"
        )
    return table if table.num_rows else None


def parameter_rows(table: pa.Table | None, placeholders: Placeholders) -> tuple[bytes, ...]:
    """Each row of ``table`` as an IPC stream of one row, its columns in placeholder order;
    ``InvalidRequest`` when a named placeholder has no column."""
    if table is None:
        return ()
    try:
        order = placeholders.order(table.schema.names)
    except KeyError as missing:
        raise InvalidRequest(UNBOUND.format(name=missing.args[0])) from None
    if order is not None:
        table = table.select(order)
    table = table.combine_chunks()
    rows = []
    for index in range(table.num_rows):
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(index, 1))
        rows.append(sink.getvalue().to_pybytes())
    return tuple(rows)


def update_count(result: pa.Table, rows: int | None) -> int:
    """The affected-row count of an update: DuckDB answers DML with one ``Count`` column
    (empty for DDL, which affects no rows), a write through the write path ``Count`` first;
    any other result counts its rows."""
    if result.schema.names[:1] == ["Count"]:  # COPY ... TO answers bytes and destination too
        return int(pc.sum(result.column(0)).as_py() or 0)
    return rows if rows is not None else result.num_rows
