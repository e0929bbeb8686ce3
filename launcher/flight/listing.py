"""The catalog as Flight SQL metadata: one catalog, one schema, the tables a role may read.

Clients see the control plane's catalog as catalog ``duckcell``, schema ``main`` (where the
sandbox binds each table, as a temp view over its files) and, in it, only the tables
``access.visible_tables`` gives the caller's role: a table the role may not read is not listed
either. Filters are the specification's LIKE patterns (``%`` any run, ``_`` one character).

A table's Arrow schema (``GetTables`` with ``include_schema``, what ``adbc_get_table_schema``
and ``adbc_get_objects(depth="all")`` ask for) comes from a worker: ``SELECT * FROM "<table>"
LIMIT 0`` routed for the caller, so the types are what the sandbox reads from the real files,
the same a query's result will carry. Those schemas are cached per catalog revision and table
for ``SCHEMA_TTL_S``: a tool listing objects would otherwise start one sandbox per table on
every refresh, and a file rewritten under the same catalog is seen again soon after.

In a session (``sessions.py``: a session-mode role's connection, or a named session) the
listing also holds what the session made: its tables and views, under the database and schema
DuckDB gives them (``memory.main.t``, ``temp.main.t``: names that work in its SQL), read from
the session's DuckDB (``duckdb_tables()``, ``duckdb_views()``); their schemas come from the
session too. The catalog tables the sandbox binds there (temp views) are listed once, as
above. Nothing of another connection's session is ever listed: each lists its own.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

import pyarrow as pa

from launcher.controlplane.access import visible_tables
from launcher.controlplane.apikeys import ApiKey
from launcher.model.catalog import Catalog

from .bridge import LoopBridge
from .connections import Connection
from .gateway import Gateway
from .messages import DbSchemasRequest, InvalidRequest, TablesRequest
from .metadata import CATALOGS_SCHEMA, DB_SCHEMAS_SCHEMA, TABLES_SCHEMA, TABLES_WITH_SCHEMA_SCHEMA
from .statements import RunningQuery

CATALOG_NAME = "duckcell"
SCHEMA_NAME = "main"
TABLE_TYPE = "TABLE"
VIEW_TYPE = "VIEW"
# What a session made: (database, schema, name, type) of its tables and views.
SESSION_OBJECTS = (
    "SELECT database_name, schema_name, table_name, 'TABLE' FROM duckdb_tables() "
    "WHERE NOT internal UNION ALL "
    "SELECT database_name, schema_name, view_name, 'VIEW' FROM duckdb_views() WHERE NOT internal"
)
# Seconds a table's schema, read through a worker, is reused for the same catalog revision.
SCHEMA_TTL_S = 30.0

Cancelled = Callable[[], bool]


# The longest LIKE pattern a metadata call may send; a name is never longer.
MAX_PATTERN_CHARS = 1024


def like(pattern: str | None, value: str) -> bool:
    """Whether ``value`` matches the LIKE ``pattern`` (``None`` matches everything): ``%`` is
    any run of characters, ``_`` any one.

    Matched in linear passes, never by a backtracking regex: ``'%' * 1000 + 'x'`` took Python's
    ``re`` (which holds the GIL, stalling every thread of the control plane) past 19 s. The
    pattern is cut at each ``%`` into pieces of fixed length; the first must match at the start,
    the last at the end, and each other one at its leftmost place after the one before (the
    leftmost place leaves the most room for the rest, so it is the only one to try).
    """
    if pattern is None:
        return True
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidRequest(
            f"a name pattern of {len(pattern)} characters; send at most {MAX_PATTERN_CHARS}"
        )
    pieces = pattern.split("%")
    if len(pieces) == 1:
        return len(value) == len(pattern) and _piece_at(pattern, value, 0)
    first, *middle, last = pieces
    if len(first) + len(last) > len(value):
        return False
    if not _piece_at(first, value, 0) or not _piece_at(last, value, len(value) - len(last)):
        return False
    at, end = len(first), len(value) - len(last)
    for piece in middle:
        found = _find_piece(piece, value, at, end)
        if found < 0:
            return False
        at = found + len(piece)
    return True


def _piece_at(piece: str, value: str, at: int) -> bool:
    """Whether ``piece`` (``_`` matching any one character) lies in ``value`` at ``at``."""
    return all(p == "_" or p == v for p, v in zip(piece, value[at : at + len(piece)], strict=True))


def _find_piece(piece: str, value: str, start: int, end: int) -> int:
    """The leftmost place in ``value[start:end]`` where ``piece`` lies, or -1."""
    for at in range(start, end - len(piece) + 1):
        if _piece_at(piece, value, at):
            return at
    return -1


def revision_of(catalog: Catalog) -> str:
    """A name for this version of the catalog: a hash of its normalized document."""
    return hashlib.sha256(catalog.to_json().encode()).hexdigest()


class CatalogListing:
    """Answers GetCatalogs, GetDbSchemas and GetTables for a caller (on handler threads)."""

    def __init__(
        self,
        gateway: Gateway,
        bridge: LoopBridge,
        *,
        ttl_s: float = SCHEMA_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._gateway = gateway
        self._bridge = bridge
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        # (catalog revision, table, scope: "" or the session's key and connection)
        self._schemas: dict[tuple[str, str, str], tuple[float, bytes]] = {}

    def catalogs(
        self, caller: ApiKey, connection: Connection | None, cancelled: Cancelled
    ) -> pa.Table:
        names = [CATALOG_NAME]
        for database, _schema, _name, _kind in self._own(caller, connection, cancelled):
            if database not in names:
                names.append(database)
        return pa.table({"catalog_name": names}, schema=CATALOGS_SCHEMA)

    def db_schemas(
        self,
        caller: ApiKey,
        request: DbSchemasRequest,
        connection: Connection | None,
        cancelled: Cancelled,
    ) -> pa.Table:
        found = _in_catalog(request.catalog) and like(request.db_schema_pattern, SCHEMA_NAME)
        rows = [(CATALOG_NAME, SCHEMA_NAME)] if found else []
        for database, schema, _name, _kind in self._own(caller, connection, cancelled):
            row = (database, schema)
            if (
                request.catalog in (None, database)
                and like(request.db_schema_pattern, schema)
                and row not in rows
            ):
                rows.append(row)
        return pa.Table.from_pylist(
            [dict(zip(DB_SCHEMAS_SCHEMA.names, row, strict=True)) for row in rows],
            schema=DB_SCHEMAS_SCHEMA,
        )

    def tables(
        self,
        caller: ApiKey,
        request: TablesRequest,
        cancelled: Cancelled,
        connection: Connection | None = None,
    ) -> pa.Table:
        """The visible tables matching ``request`` (and, in a session, the session's own);
        with ``include_schema``, each one's schema as IPC-serialized bytes (raises the
        worker's error if a table cannot be read)."""
        catalog = self._gateway.catalog()
        matches = (
            _in_catalog(request.catalog)
            and like(request.db_schema_pattern, SCHEMA_NAME)
            and (not request.table_types or TABLE_TYPE in request.table_types)
        )
        listed = [
            (CATALOG_NAME, SCHEMA_NAME, table.name, TABLE_TYPE)
            for table in visible_tables(catalog, caller.role)
            if matches and like(request.table_pattern, table.name)
        ]
        for database, schema, name, kind in self._own(caller, connection, cancelled):
            if (
                request.catalog in (None, database)
                and like(request.db_schema_pattern, schema)
                and like(request.table_pattern, name)
                and (not request.table_types or kind in request.table_types)
            ):
                listed.append((database, schema, name, kind))
        columns: dict[str, list[object]] = {
            "catalog_name": [row[0] for row in listed],
            "db_schema_name": [row[1] for row in listed],
            "table_name": [row[2] for row in listed],
            "table_type": [row[3] for row in listed],
        }
        if not request.include_schema:
            return pa.table(columns, schema=TABLES_SCHEMA)
        revision = revision_of(catalog)
        columns["table_schema"] = [
            self._schema(caller, revision, name, cancelled, connection)
            if database == CATALOG_NAME
            else self._read(caller, _qualified(database, schema, name), cancelled, connection)
            .serialize()
            .to_pybytes()
            for database, schema, name, _kind in listed
        ]
        return pa.table(columns, schema=TABLES_WITH_SCHEMA_SCHEMA)

    def _own(
        self, caller: ApiKey, connection: Connection | None, cancelled: Cancelled
    ) -> list[tuple[str, str, str, str]]:
        """The session's own tables and views ([] outside a session), without the catalog
        tables the sandbox bound there (temp views named like them)."""
        if connection is None or not self._gateway.runs_in_session(caller, connection):
            return []
        bound = {table.name.lower() for table in self._gateway.catalog().tables.values()}
        result = self._gateway.route(caller, SESSION_OBJECTS, b"", connection)
        query = RunningQuery.open(self._bridge, caller.key_id, result, cancelled)
        table = pa.Table.from_batches(list(query.batches(cancelled)), query.schema)
        found: list[tuple[str, str, str, str]] = []
        for row in table.to_pylist():
            database, schema, name, kind = (str(value) for value in row.values())
            if not (database == "temp" and kind == VIEW_TYPE and name.lower() in bound):
                found.append((database, schema, name, kind))
        return found

    def _schema(
        self,
        caller: ApiKey,
        revision: str,
        table: str,
        cancelled: Cancelled,
        connection: Connection | None = None,
    ) -> bytes:
        now = self._clock()
        # A schema read in a session came from that session's sandbox, which the caller's SQL
        # has run in (and may own, if it broke DuckDB): it is reused for that connection only.
        # Read per query (a fresh sandbox, this server's own SQL), it is reused for every key.
        in_session = connection is not None and self._gateway.runs_in_session(caller, connection)
        scope = f"{caller.key_id}:{connection.key}" if in_session and connection else ""
        with self._lock:
            cached = self._schemas.get((revision, table, scope))
        if cached is not None and cached[0] > now:
            return cached[1]
        schema = self.read_schema(caller, table, cancelled, connection).serialize().to_pybytes()
        with self._lock:
            self._schemas = {k: v for k, v in self._schemas.items() if v[0] > now}
            self._schemas[(revision, table, scope)] = (now + self._ttl_s, schema)
        return schema

    def read_schema(
        self,
        caller: ApiKey,
        table: str,
        cancelled: Cancelled,
        connection: Connection | None = None,
    ) -> pa.Schema:
        """``table``'s schema as a worker's sandbox reads it (no rows are fetched): in the
        connection's session when its statements run there (a session-mode role's must)."""
        return self._read(caller, _qualified(table), cancelled, connection)

    def _read(
        self, caller: ApiKey, quoted: str, cancelled: Cancelled, connection: Connection | None
    ) -> pa.Schema:
        result = self._gateway.route(caller, f"SELECT * FROM {quoted} LIMIT 0", b"", connection)
        query = RunningQuery.open(self._bridge, caller.key_id, result, cancelled)
        for _batch in query.batches(cancelled):  # none; reads on to the worker's outcome
            pass
        return query.schema


def _in_catalog(catalog: str | None) -> bool:
    """A ``catalog`` filter is an exact name, not a pattern (``None``: any catalog)."""
    return catalog is None or catalog == CATALOG_NAME


def _qualified(*parts: str) -> str:
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)
