"""Placement rule (pure): pinned connections decide the worker; unpinned queries round robin."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from launcher.controlplane.access import tables_read
from launcher.controlplane.catalogs import (
    CATALOG_FILE,
    CONFIG_LOCK,
    EMPTY,
    CatalogWatcher,
    apply_catalog,
    read_catalog,
)
from launcher.controlplane.placement import Candidate, Pin, choose_worker, pin_for
from launcher.errors import CatalogError, QueryDeniedError, SqlError, WorkerUnavailableError
from launcher.model.catalog import Catalog, parse_catalog
from launcher.model.sql.tables import table_names
from tests.support.parsers import InlineParser

CATALOG = """
connections:
  east: {kind: local, worker: wkr-east}
  west: {kind: local, worker: west-box}
  shared: {kind: local}
tables:
  orders: {connection: east, path: /data/orders, format: parquet}
  refunds: {connection: east, path: /data/refunds, format: parquet}
  users: {connection: west, path: /data/users, format: csv}
  zones: {connection: shared, path: /data/zones, format: csv}
"""

WORKERS = [Candidate("wkr-east", "east-box"), Candidate("wkr-west", "west-box")]


@pytest.fixture
def catalog() -> Catalog:
    return parse_catalog(CATALOG, "cat.yaml", Path("/"))


@pytest.mark.parametrize(
    ("sql", "pin"),
    [
        ("SELECT 42", None),
        ("SELECT * FROM zones", None),
        ("SELECT * FROM orders", Pin("wkr-east", "east")),
        ("SELECT * FROM ORDERS o JOIN refunds r USING (id)", Pin("wkr-east", "east")),
        ("SELECT * FROM orders JOIN zones USING (zone)", Pin("wkr-east", "east")),
        ("WITH users AS (SELECT 1) SELECT * FROM users", None),  # a CTE, not the table
        ("SELECT * FROM (SELECT * FROM users) u", Pin("west-box", "west")),
        ("SELECT * FROM temp_thing", None),
    ],
)
def test_pin_follows_the_tables_the_parser_finds(catalog: Catalog, sql: str, pin: Pin) -> None:
    assert pin_for(catalog, catalog.referenced(table_names(sql))) == pin


def test_tables_pinned_to_two_workers_are_refused_naming_both(catalog: Catalog) -> None:
    with pytest.raises(QueryDeniedError, match=r"east -> wkr-east, west -> west-box"):
        pin_for(catalog, catalog.referenced(["orders", "users"]))


def test_unparsable_sql_is_duckdbs_error_when_pins_need_its_tables(catalog: Catalog) -> None:
    with pytest.raises(SqlError, match="syntax error"):
        asyncio.run(tables_read(catalog, None, "SELEC 1", InlineParser()))


def test_pinned_query_lands_on_its_worker_by_id_or_name_every_time() -> None:
    by_id, by_name = Pin("wkr-east", "east"), Pin("west-box", "west")
    assert {choose_worker(WORKERS, by_id, turn) for turn in range(10)} == {"wkr-east"}
    assert {choose_worker(WORKERS, by_name, turn) for turn in range(10)} == {"wkr-west"}


def test_unpinned_queries_round_robin() -> None:
    assert [choose_worker(WORKERS, None, turn) for turn in range(4)] == [
        "wkr-east",
        "wkr-west",
        "wkr-east",
        "wkr-west",
    ]


def test_pinned_worker_offline_names_it_and_the_connection() -> None:
    with pytest.raises(WorkerUnavailableError, match=r"worker wkr-gone is not online.*conn a"):
        choose_worker(WORKERS, Pin("wkr-gone", "conn a"), 0)
    with pytest.raises(WorkerUnavailableError, match="no worker online"):
        choose_worker([], None, 0)


def test_apply_writes_normalized_catalog_and_watcher_sees_new_revision(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = tmp_path / "first.yaml"
    first.write_text(CATALOG)
    seen = []
    watcher = CatalogWatcher(data, seen.append)
    assert watcher.current == EMPTY and not watcher.check()

    version = apply_catalog(data, first)
    assert watcher.check() and seen == [version]
    assert set(watcher.current.catalog.tables) == {"orders", "refunds", "users", "zones"}
    assert read_catalog(data) == version
    assert not watcher.check()  # nothing changed since

    second = tmp_path / "second.yaml"
    second.write_text(CATALOG + "  trips: {connection: shared, path: trips, format: parquet}\n")
    newer = apply_catalog(data, second)
    assert newer.revision != version.revision and watcher.check()
    # A relative local path was made absolute against the file's directory when applied.
    assert watcher.current.catalog.tables["trips"].path == str(tmp_path / "trips")


def test_bad_catalog_is_refused_and_the_applied_one_stays(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = tmp_path / "good.yaml"
    good.write_text(CATALOG)
    version = apply_catalog(data, good)
    bad = tmp_path / "bad.yaml"
    bad.write_text("tables:\n  t: {connection: nowhere, path: x, format: parquet}\n")
    with pytest.raises(CatalogError, match=r"bad\.yaml:2"):
        apply_catalog(data, bad)
    assert read_catalog(data) == version
    assert sorted(p.name for p in data.iterdir()) == [CONFIG_LOCK, CATALOG_FILE]


def test_watcher_keeps_last_good_catalog_when_the_file_is_corrupted(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = tmp_path / "good.yaml"
    good.write_text(CATALOG)
    apply_catalog(data, good)
    watcher = CatalogWatcher(data)
    kept = watcher.current
    (data / CATALOG_FILE).write_text("{not json")
    assert not watcher.check()
    assert watcher.current == kept
