"""Where a query runs: the pure rule that picks a worker for it.

A connection may be pinned to one worker (``connections.NAME.worker`` in the catalog: the
data, or the credentials to reach it, live only on that host). A query that reads a pinned
connection's tables runs on that worker or not at all; a query that reads none runs on any
online worker, round robin. A query that reads tables pinned to two different workers cannot
run anywhere and is refused before it is sent.

The catalog's tables are found in the SQL by DuckDB's parser (``access.tables_read``), the
same rule the worker uses to decide what to fetch, so both sides agree on what a query reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from launcher.errors import QueryDeniedError, WorkerUnavailableError
from launcher.model.catalog import Catalog, Table


@dataclass(frozen=True, slots=True)
class Pin:
    """A query's placement constraint: the worker (id or name) and the connection that asks."""

    worker: str
    connection: str


@dataclass(frozen=True, slots=True)
class Candidate:
    """An online worker as placement sees it."""

    worker_id: str
    name: str = ""


def pin_for(catalog: Catalog, tables: Sequence[Table]) -> Pin | None:
    """The pin a query reading ``tables`` (``access.tables_read``) must honour, or None.
    Raises QueryDeniedError for conflicting pins."""
    pins: dict[str, str] = {}
    for table in tables:
        connection = catalog.connections[table.connection]
        if connection.worker:
            pins.setdefault(connection.worker, connection.name)
    if len(pins) > 1:
        named = ", ".join(sorted(f"{conn} -> {worker}" for worker, conn in pins.items()))
        raise QueryDeniedError(
            f"the query reads tables of connections pinned to different workers ({named}); "
            "no single worker may read them all: split the query or change the pins"
        )
    if not pins:
        return None
    worker, connection = next(iter(pins.items()))
    return Pin(worker, connection)


def choose_worker(online: Sequence[Candidate], pin: Pin | None, turn: int) -> str:
    """The worker id to run on, from ``online`` (sorted, stable) and a round-robin counter."""
    if pin is not None:
        online = [w for w in online if pin.worker in (w.worker_id, w.name)]
        if not online:
            raise WorkerUnavailableError(
                f"worker {pin.worker} is not online, and connection {pin.connection} is pinned "
                f"to it: start it (`duckcell worker --state DIR` on its host)"
            )
    if not online:
        raise WorkerUnavailableError(
            "no worker online: start one with `duckcell worker --state DIR`"
        )
    return online[turn % len(online)].worker_id
