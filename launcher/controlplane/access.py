"""What an API key's role may do with a query: the pure rule both client surfaces apply.

The gRPC ``Query`` service and the Flight SQL endpoint authenticate a key, then ask
``authorize`` before routing: the role (from the catalog's ``roles`` section) must be defined,
may read every catalog table the SQL names (found by DuckDB's parser, as the worker finds them:
``tables_read``), and fixes the policy the query runs under. ``visible_tables`` is the same rule
for metadata: a client lists only the tables its role may read.
"""

from __future__ import annotations

from collections.abc import Sequence

from launcher.errors import QueryDeniedError
from launcher.model.catalog import Catalog, Role, Table
from launcher.model.sql import SqlParser


def role_of(catalog: Catalog, role_name: str) -> Role:
    """The role, or QueryDeniedError when the catalog defines roles but not this one."""
    role = catalog.role(role_name)
    if role is None:
        known = ", ".join(sorted(catalog.roles))
        raise QueryDeniedError(
            f"role {role_name!r} is not defined in the control plane's catalog (roles: {known}): "
            "add it under roles: and apply the catalog, or use a key of a defined role"
        )
    return role


async def tables_read(
    catalog: Catalog, role_name: str | None, sql: str, parser: SqlParser
) -> list[Table]:
    """The catalog tables ``sql`` reads, as far as ``authorize`` and the pins need them.

    The SQL is parsed (in ``parser``'s processes) only when the answer matters: the role is
    limited to some tables, or a connection is pinned to a worker; else ``[]``. Raises what
    ``SqlParser.parse`` raises (SqlError with DuckDB's message, StatementLimitError, ...).
    """
    if not catalog.tables:
        return []
    role = catalog.role(role_name) if role_name is not None else None
    limited = role is not None and role.tables is not None
    if not limited and not any(c.worker for c in catalog.connections.values()):
        return []
    return catalog.referenced((await parser.parse(sql)).tables)


def authorize(
    catalog: Catalog, role_name: str, tables: Sequence[Table], requested_policy: str = ""
) -> str:
    """The policy name the query runs under ("" = the worker's default); ``tables`` are the
    catalog tables it reads (``tables_read``).

    Raises QueryDeniedError (unknown role, a table the role may not read, a policy the role
    may not choose).
    """
    role = role_of(catalog, role_name)
    for table in tables if role.tables is not None else ():
        if not role.may_read(table.name):
            raise QueryDeniedError(
                f"role {role_name!r} may not read table {table.name}: ask an administrator to "
                "add it to the role's tables in the control plane's catalog"
            )
    if role.policy and requested_policy and requested_policy != role.policy:
        raise QueryDeniedError(
            f"role {role_name!r} runs its queries under policy {role.policy!r}; it may not "
            f"choose policy {requested_policy!r}"
        )
    return role.policy or requested_policy


def visible_tables(catalog: Catalog, role_name: str) -> list[Table]:
    """The catalog tables the role may see, by name; none for an undefined role."""
    role = catalog.role(role_name)
    if role is None:
        return []
    return [catalog.tables[name] for name in sorted(catalog.tables) if role.may_read(name)]
