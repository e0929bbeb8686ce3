"""Role rule (pure): defined roles, readable tables, the policy a role fixes; and which SQL
needs parsing for it (``tables_read``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from launcher.controlplane.access import authorize, tables_read, visible_tables
from launcher.errors import QueryDeniedError, SqlError
from launcher.model.catalog import Catalog, parse_catalog
from tests.support.parsers import InlineParser

CATALOG = """
connections:
  local: {kind: local}
tables:
  trips: {connection: local, path: /data/trips, format: parquet}
  zones: {connection: local, path: /data/zones, format: csv}
  salaries: {connection: local, path: /data/salaries, format: csv}
roles:
  analyst: {policy: default, tables: [trips, zones]}
  agent: {policy: agent-session, tables: [trips]}
  admin: {}
"""


@pytest.fixture
def catalog() -> Catalog:
    return parse_catalog(CATALOG, "cat.yaml", Path("/"))


def check(catalog: Catalog, role: str, sql: str, requested: str = "") -> str:
    """``authorize`` over the tables ``tables_read`` finds, as the router calls them."""
    tables = asyncio.run(tables_read(catalog, role, sql, InlineParser()))
    return authorize(catalog, role, tables, requested)


@pytest.mark.parametrize(
    ("role", "sql", "requested", "policy"),
    [
        ("analyst", "SELECT * FROM trips JOIN zones USING (zone)", "", "default"),
        ("analyst", "SELECT 42", "default", "default"),
        ("agent", "SELECT count(*) FROM trips", "", "agent-session"),
        ("admin", "SELECT * FROM salaries", "", ""),
        ("admin", "SELECT * FROM salaries", "strict", "strict"),
        ("analyst", "WITH salaries AS (SELECT 1) SELECT * FROM salaries", "", "default"),
    ],
)
def test_allowed_queries_get_their_roles_policy(
    catalog: Catalog, role: str, sql: str, requested: str, policy: str
) -> None:
    assert check(catalog, role, sql, requested) == policy


@pytest.mark.parametrize(
    ("role", "sql", "requested", "message"),
    [
        ("analyst", "SELECT * FROM salaries", "", "may not read table salaries"),
        ("agent", "SELECT * FROM trips, zones", "", "may not read table zones"),
        ("analyst", "SELECT 1", "strict", "may not choose policy 'strict'"),
        ("intruder", "SELECT 1", "", "role 'intruder' is not defined"),
    ],
)
def test_denied_queries_say_why(
    catalog: Catalog, role: str, sql: str, requested: str, message: str
) -> None:
    with pytest.raises(QueryDeniedError, match=message):
        check(catalog, role, sql, requested)


def test_unparsable_sql_is_duckdbs_error(catalog: Catalog) -> None:
    with pytest.raises(SqlError, match="syntax error"):
        check(catalog, "analyst", "SELEC 1")


def test_without_roles_any_key_reads_everything() -> None:
    assert check(Catalog.EMPTY, "whatever", "SELECT * FROM anything", "strict") == "strict"


@pytest.mark.parametrize(("role", "parsed"), [("analyst", True), ("admin", False), (None, False)])
def test_sql_is_parsed_only_for_a_role_limited_to_some_tables(
    catalog: Catalog, role: str | None, parsed: bool
) -> None:
    parser = InlineParser()
    tables = asyncio.run(tables_read(catalog, role, "SELECT * FROM salaries", parser))
    assert bool(parser.parsed) is parsed
    assert [t.name for t in tables] == (["salaries"] if parsed else [])


def test_visible_tables_follow_the_role(catalog: Catalog) -> None:
    assert [t.name for t in visible_tables(catalog, "analyst")] == ["trips", "zones"]
    assert [t.name for t in visible_tables(catalog, "agent")] == ["trips"]
    assert [t.name for t in visible_tables(catalog, "admin")] == ["salaries", "trips", "zones"]
    assert visible_tables(catalog, "intruder") == []
