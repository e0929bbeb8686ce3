"""Bound parameters and statements that change data, as Flight SQL carries them.

Parameters: the ADBC driver binds values with ``DoPut(CommandPreparedStatementQuery)`` (or
``...Update``), one record batch whose columns are named "0", "1", ... in placeholder order. The
server keeps them with the prepared handle as an Arrow IPC stream of that one row, which travels
untouched (control plane -> tunnel -> worker -> runner) to the sandbox, where DuckDB binds the
values (``con.execute(sql, params)``): they are never written into the SQL text.

One parameter set per execution: ``executemany`` sends all its rows in one ``DoPut``, and that
is refused with a message saying so. Running a per-query sandbox once per row would start N
sandboxes for one call, and a data-changing batch would land in N sandboxes' temp state, which
is worse than an honest refusal; run the statement once per row, or load the rows with
``INSERT ... SELECT`` from a table.

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

from .messages import UnsupportedRequest

# Statement types that return rows (everything else is executed for its effect).
QUERY_TYPES = {"SELECT", "EXPLAIN", "PRAGMA"}
EXECUTEMANY = (
    "this server binds one parameter set per execution and got {rows}: run the statement "
    "once per parameter set (executemany is not supported), or insert many rows with "
    "INSERT ... SELECT"
)


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


def read_parameters(reader: flight.MetadataRecordBatchReader) -> bytes:
    """The bound parameter set a DoPut carries, as an IPC stream of one row (``b""`` when it
    has no rows: nothing bound). Raises ``UnsupportedRequest`` for more than one row."""
    table = reader.read_all()
    if table.num_rows == 0:
        return b""
    if table.num_rows > 1:
        raise UnsupportedRequest(EXECUTEMANY.format(rows=table.num_rows))
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return sink.getvalue().to_pybytes()


def update_count(result: pa.Table, rows: int | None) -> int:
    """The affected-row count of an update: DuckDB answers DML with one ``Count`` column
    (empty for DDL, which affects no rows); any other result counts its rows."""
    if result.schema.names == ["Count"]:
        return int(pc.sum(result.column(0)).as_py() or 0)
    return rows if rows is not None else result.num_rows
