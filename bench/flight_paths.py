"""The three ways ``bench_flight.py`` fetches a result as Arrow, each a blocking call that a
worker thread makes so the bench's event loop (the worker's tunnel) keeps running:

* in-process DuckDB: one connection, ``to_arrow_reader().read_all()``;
* a one-hop Flight server in this process beside DuckDB (what a GizmoSQL-style server gives):
  ``do_get`` streams ``fetch_record_batch`` over plaintext loopback gRPC to a raw
  ``pyarrow.flight.FlightClient`` (the target's bar), and the same over TLS (a diagnostic:
  the chain's client hop is TLS, so this separates what TLS costs from what the hops cost);
* the whole chain through ADBC: Flight SQL on the control plane (TLS, API key) -> mTLS tunnel
  -> worker -> warm-pool sandbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
from adbc_driver_flightsql import DatabaseOptions
from adbc_driver_flightsql import dbapi as adbc_flightsql

# Under the client's 16 MiB gRPC message cap for two int64 columns (16 bytes a row).
ONE_HOP_BATCH_ROWS = 500_000


@dataclass(frozen=True, slots=True)
class Fetch:
    """One timed fetch: seconds from the call to the whole table in client memory."""

    seconds: float
    rows: int
    bytes: int  # Arrow buffer bytes of the table the client holds (same measure for all paths)


def timed(fetch_table: Callable[[str], pa.Table], sql: str) -> Fetch:
    started = time.perf_counter()
    table = fetch_table(sql)
    elapsed = time.perf_counter() - started
    return Fetch(elapsed, table.num_rows, table.nbytes)


class InProcessDuckDB:
    """The baseline: one DuckDB connection in this process, results fetched as Arrow."""

    def __init__(self) -> None:
        self._con = duckdb.connect()

    def fetch(self, sql: str) -> pa.Table:
        return self._con.sql(sql).to_arrow_reader().read_all()

    def close(self) -> None:
        self._con.close()


class OneHopServer(flight.FlightServerBase):
    """A minimal Flight server in this process: the ticket is the SQL, ``do_get`` streams
    DuckDB's record batches. No auth, no TLS, no planning RPCs: the cheapest server a client
    can fetch DuckDB results from, so it is the bar for the chain's per-hop cost."""

    def __init__(self, tls: tuple[bytes, bytes] | None = None) -> None:
        """``tls``: (certificate PEM, key PEM) to serve TLS with; plaintext without."""
        if tls is None:
            super().__init__("grpc://127.0.0.1:0")
        else:
            pair = flight.CertKeyPair(cert=tls[0], key=tls[1])
            super().__init__("grpc+tls://127.0.0.1:0", tls_certificates=[pair])
        self.tls = tls is not None
        self._con = duckdb.connect()

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.RecordBatchStream:
        cursor = self._con.cursor()  # one per call: gRPC serves calls on its own threads
        reader = cursor.sql(ticket.ticket.decode()).fetch_record_batch(ONE_HOP_BATCH_ROWS)
        return flight.RecordBatchStream(reader)

    def close(self) -> None:
        self.shutdown()
        self._con.close()


class OneHopClient:
    """A raw ``FlightClient`` on the one-hop server, connected once and reused."""

    def __init__(self, server: OneHopServer, ca_pem: bytes | None = None) -> None:
        """``ca_pem`` verifies a TLS server's certificate."""
        if server.tls:
            location = f"grpc+tls://127.0.0.1:{server.port}"
            self._client = flight.FlightClient(location, tls_root_certs=ca_pem)
        else:
            self._client = flight.FlightClient(f"grpc://127.0.0.1:{server.port}")

    def fetch(self, sql: str) -> pa.Table:
        return self._client.do_get(flight.Ticket(sql.encode())).read_all()

    def close(self) -> None:
        self._client.close()


class ChainClient:
    """ADBC on the control plane's Flight SQL endpoint, one connection and cursor reused, as
    a tool that keeps a connection open would; each ``execute`` still runs in a new sandbox."""

    def __init__(self, location: str, ca_pem: bytes, api_key: str) -> None:
        db_kwargs = {
            DatabaseOptions.TLS_ROOT_CERTS.value: ca_pem.decode(),
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {api_key}",
        }
        self._conn = adbc_flightsql.connect(location, db_kwargs=db_kwargs, autocommit=True)
        self._cursor = self._conn.cursor()

    def fetch(self, sql: str) -> pa.Table:
        self._cursor.execute(sql)
        return self._cursor.fetch_arrow_table()

    def close(self) -> None:
        self._cursor.close()
        self._conn.close()
