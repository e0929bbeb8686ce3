"""The answers to Flight SQL's metadata commands: SqlInfo, catalogs, schemas, tables.

Each result has the exact Arrow schema the specification gives, because drivers read the columns
by position and type. SqlInfo answers what drivers ask on connect and in ``adbc_get_info``;
catalogs, schemas and tables are listed from the control plane's catalog (``listing.py``).
"""

from __future__ import annotations

import pyarrow as pa

from launcher import __version__

from .messages import (
    CatalogsRequest,
    DbSchemasRequest,
    MetadataRequest,
    SqlInfoRequest,
    TablesRequest,
    TableTypesRequest,
)

SERVER_NAME = "duckcell"

# SqlInfo ids of the specification (enum SqlInfo) that this server answers.
SERVER_NAME_ID = 0
SERVER_VERSION_ID = 1
ARROW_VERSION_ID = 2
READ_ONLY_ID = 3
SQL_ID = 4
TRANSACTION_ID = 8  # SqlSupportedTransaction: 0 = none, 1 = transactions
CANCEL_ID = 9
BULK_INGESTION_ID = 10
INGEST_TRANSACTIONS_ID = 11

# The dense union's members, in the specification's order (their position is the type code).
_STRING, _BOOL, _BIGINT, _INT32 = 0, 1, 2, 3
_VALUE_TYPE = pa.dense_union(
    [
        pa.field("string_value", pa.utf8()),
        pa.field("bool_value", pa.bool_()),
        pa.field("bigint_value", pa.int64()),
        pa.field("int32_bitmask", pa.int32()),
        pa.field("string_list", pa.list_(pa.utf8())),
        pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32()))),
    ]
)
SQL_INFO_SCHEMA = pa.schema(
    [pa.field("info_name", pa.uint32(), nullable=False), pa.field("value", _VALUE_TYPE, False)]
)
CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema(
    [pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8(), nullable=False)]
)
TABLES_SCHEMA = pa.schema(
    [
        pa.field("catalog_name", pa.utf8()),
        pa.field("db_schema_name", pa.utf8()),
        pa.field("table_name", pa.utf8(), nullable=False),
        pa.field("table_type", pa.utf8(), nullable=False),
    ]
)
TABLES_WITH_SCHEMA_SCHEMA = TABLES_SCHEMA.append(
    pa.field("table_schema", pa.binary(), nullable=False)
)
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), nullable=False)])


def _sql_info_values(sessions: bool) -> dict[int, tuple[int, object]]:
    """What this server supports for a caller whose statements run in sessions (``sessions``:
    transactions and bulk ingest) or each in a fresh sandbox (neither)."""
    return {
        SERVER_NAME_ID: (_STRING, SERVER_NAME),
        SERVER_VERSION_ID: (_STRING, __version__),
        ARROW_VERSION_ID: (_STRING, pa.__version__),
        READ_ONLY_ID: (_BOOL, False),
        SQL_ID: (_BOOL, True),
        TRANSACTION_ID: (_INT32, 1 if sessions else 0),
        CANCEL_ID: (_BOOL, False),
        BULK_INGESTION_ID: (_BOOL, sessions),
        INGEST_TRANSACTIONS_ID: (_BOOL, sessions),
    }


def schema_of(request: MetadataRequest) -> pa.Schema:
    """The result schema ``GetFlightInfo`` announces for ``request``."""
    if isinstance(request, SqlInfoRequest):
        return SQL_INFO_SCHEMA
    if isinstance(request, CatalogsRequest):
        return CATALOGS_SCHEMA
    if isinstance(request, DbSchemasRequest):
        return DB_SCHEMAS_SCHEMA
    if isinstance(request, TablesRequest):
        return TABLES_WITH_SCHEMA_SCHEMA if request.include_schema else TABLES_SCHEMA
    if isinstance(request, TableTypesRequest):
        return TABLE_TYPES_SCHEMA
    raise TypeError(f"not a metadata request: {request!r}")


def answer(request: MetadataRequest, *, sessions: bool = False) -> pa.Table:
    """The result ``DoGet`` streams for ``request`` when it needs no catalog (``listing.py``
    answers those); ``sessions``: the caller's statements run in sessions."""
    if isinstance(request, SqlInfoRequest):
        return sql_info(request.ids, sessions=sessions)
    if isinstance(request, TableTypesRequest):
        return pa.table({"table_type": ["TABLE", "VIEW"]}, schema=TABLE_TYPES_SCHEMA)
    return schema_of(request).empty_table()


def sql_info(ids: tuple[int, ...], *, sessions: bool = False) -> pa.Table:
    """The SqlInfo rows for ``ids`` (all known ones when empty); unknown ids are left out,
    as the specification allows."""
    known = _sql_info_values(sessions)
    wanted = [i for i in (ids or tuple(known)) if i in known]
    members: list[list[object]] = [[] for _ in _VALUE_TYPE]
    type_codes: list[int] = []
    offsets: list[int] = []
    for info_id in wanted:
        code, value = known[info_id]
        type_codes.append(code)
        offsets.append(len(members[code]))
        members[code].append(value)
    children = [
        pa.array(values, type=field.type)
        for values, field in zip(members, _VALUE_TYPE, strict=True)
    ]
    value = pa.UnionArray.from_dense(
        pa.array(type_codes, pa.int8()),
        pa.array(offsets, pa.int32()),
        children,
        [field.name for field in _VALUE_TYPE],
    )
    return pa.Table.from_arrays([pa.array(wanted, pa.uint32()), value], schema=SQL_INFO_SCHEMA)
