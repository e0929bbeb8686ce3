"""A Flight SQL server over an in-process DuckDB "worker", for tests that need real results
without the tunnel: the real ADBC driver talks to the real ``FlightSqlServer``, whose router is
``DuckRouter``, which runs each query on a fresh DuckDB connection with the catalog's tables bound
as views, as a sandbox would, and yields the Arrow IPC bytes a runner sends.

``DuckRouter.calls`` records what reached the "worker" (SQL, policy, caller, parameters), so a
test can check what the role rule let through and what it stopped. The server runs on its own
loop in a thread, as on the control plane.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import warnings
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import adbc_driver_flightsql.dbapi as adbc_flightsql
import duckdb
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from adbc_driver_flightsql import DatabaseOptions

from launcher.controlplane.access import authorize, tables_read
from launcher.controlplane.apikeys import ApiKey
from launcher.controlplane.audit import AuditRecord
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.routing import QueryDone
from launcher.errors import ApiKeyError, SessionError, SqlError
from launcher.flight import FlightListen, FlightSqlServer
from launcher.model.catalog import Catalog, parse_catalog
from tests.support.parsers import InlineParser

DEADLINE_S = 10.0
# How an ADBC client names its session: a header on every call.
SESSION_OPTION = "adbc.flight.sql.rpc.call_header.x-duckcell-session"
# API keys of the fake key store: "dck1.<role>" has that role.
ROLES = ("analyst", "admin", "intern", "notebook")
# The session-mode role of the test catalog (its policy has isolation: session).
SESSION_ROLE = "notebook"
CATALOG = """
connections:
  files: {kind: local}
tables:
  trips: {connection: files, path: trips.parquet, format: parquet}
  salaries: {connection: files, path: salaries.parquet, format: parquet}
roles:
  analyst: {policy: default, tables: [trips]}
  notebook: {policy: agent-session, tables: [trips]}
  admin: {}
"""
TRIPS = pa.table(
    {
        "id": pa.array([1, 2, 3], pa.int64()),
        "zone": pa.array(["north", "south", None], pa.string()),
        "fare": pa.array([9.5, 12.25, 7.0], pa.float64()),
    }
)
SALARIES = pa.table({"name": ["ann"], "pay": pa.array([100], pa.int32())})


@dataclass(frozen=True, slots=True)
class Call:
    sql: str
    policy: str
    caller: str
    parameters: list[object]
    session_id: str = ""
    role: str | None = None


def write_catalog(directory: Path) -> Catalog:
    """The test catalog, over two Parquet files written into ``directory``."""
    pq.write_table(TRIPS, directory / "trips.parquet")
    pq.write_table(SALARIES, directory / "salaries.parquet")
    return parse_catalog(CATALOG, str(directory / "catalog.yaml"))


class DuckRouter:
    """Plays router and worker at once: runs each query in a fresh in-process DuckDB."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.calls: list[Call] = []
        # A session is a DuckDB connection kept open: (owner, policy, connection) by id.
        self.sessions: dict[str, tuple[str, str, duckdb.DuckDBPyConnection]] = {}
        self._numbers = itertools.count(1)

    async def open_session(self, policy: str = "", *, owner: str) -> str:
        session_id = f"ses-{next(self._numbers)}"
        self.sessions[session_id] = (owner, policy, self._connect())
        return session_id

    async def close_session(self, session_id: str, *, owner: str) -> None:
        found = self.sessions.pop(session_id, None)
        if found is None or found[0] != owner:
            raise SessionError(f"unknown session {session_id!r}")
        found[2].close()

    async def run(
        self,
        sql: str,
        policy: str,
        *,
        caller: str = "",
        role: str | None = None,
        parameters: bytes = b"",
        session_id: str = "",
        owner: str = "",
    ) -> AsyncIterator[bytes | QueryDone]:
        values = _values(parameters)
        found = self.sessions.get(session_id) if session_id else None
        if role is not None:  # as QueryRouter places a query: the role's rule, checked again
            tables = await tables_read(self.catalog, role, sql, InlineParser())
            authorize(self.catalog, role, tables)
            policy = found[1] if found else authorize(self.catalog, role, tables, policy)
        self.calls.append(Call(sql, policy, caller, values, session_id, role))
        if session_id:
            if found is None or found[0] != owner:
                raise SessionError(f"session {session_id} has ended: open a new one")
            table = self._execute(found[2], sql, values)
        else:
            con = self._connect()
            try:
                table = self._execute(con, sql, values)
            finally:
                con.close()
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        yield sink.getvalue().to_pybytes()
        yield QueryDone(table.num_rows)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        """A fresh "sandbox": the catalog's tables bound as views over their files."""
        con = duckdb.connect()
        for table in self.catalog.tables.values():
            con.execute(
                f"CREATE TEMP VIEW {table.name} AS SELECT * FROM read_parquet('{table.path}')"
            )
        return con

    @staticmethod
    def _execute(con: duckdb.DuckDBPyConnection, sql: str, values: list[object]) -> pa.Table:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = con.execute(sql, values)
                if result.description is None:  # USE, BEGIN, COMMIT: no result set
                    return pa.table({})
                return result.to_arrow_table()
        except duckdb.Error as error:
            raise SqlError(str(error)) from None


def _values(parameters: bytes) -> list[object]:
    """The one row of bound values, in placeholder order, as DuckDB's Python API takes them."""
    if not parameters:
        return []
    table = ipc.open_stream(parameters).read_all()
    assert table.num_rows == 1, table
    return [column[0].as_py() for column in table.columns]


async def verify(key: str) -> ApiKey:
    role = key.removeprefix("dck1.")
    if key.startswith("dck1.") and role in ROLES:
        return ApiKey(key_id=f"key-{role}", role=role)
    raise ApiKeyError("unknown API key: create one with `duckcell controlplane apikey create`")


class AuditList:
    """The audit sink of the stack: the records written, in order."""

    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def open(self, record: AuditRecord) -> None:
        self.records.append(record)

    def write(self, record: AuditRecord) -> None:
        self.records.append(record)


class FlightStack:
    """A TLS Flight SQL server on loopback with ``DuckRouter``; ``connect`` as a role."""

    def __init__(self, tmp_path: Path, catalog: Catalog) -> None:
        self.router = DuckRouter(catalog)
        self.catalog = catalog
        self.audit = AuditList()
        self.ca_pem = ControlPlaneData(tmp_path / "cp").ca().cert_pem()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = FlightSqlServer(
            FlightListen.parse("127.0.0.1:0"),
            self.router,
            verify,
            ca=ControlPlaneData(tmp_path / "cp").ca(),
            hosts=["localhost", "127.0.0.1"],
            catalog=lambda: self.catalog,
            session_roles=lambda role: role == SESSION_ROLE,
            audit=self.audit,
        )
        self.on(self.server.start())

    def on(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(DEADLINE_S)

    def connect(self, role: str, session: str = "") -> adbc_flightsql.Connection:
        """An ADBC connection with ``role``'s key; with ``session``, in that named session."""
        db_kwargs = {
            DatabaseOptions.TLS_ROOT_CERTS.value: self.ca_pem.decode(),
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer dck1.{role}",
        }
        if session:
            db_kwargs[SESSION_OPTION] = session
        return adbc_flightsql.connect(self.server.location, db_kwargs=db_kwargs, autocommit=True)

    def close(self) -> None:
        self.on(self.server.stop())
        for _owner, _policy, con in list(self.router.sessions.values()):
            con.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEADLINE_S)
        self._loop.close()


def flight_stack(tmp_path: Path) -> Iterator[FlightStack]:
    """Fixture body: the stack over the test catalog, stopped afterwards."""
    stack = FlightStack(tmp_path, write_catalog(tmp_path))
    try:
        yield stack
    finally:
        stack.close()
