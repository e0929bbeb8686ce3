"""The gRPC statuses a real Flight SQL client gets for real failures, over the whole real chain:
ADBC -> control plane (Flight SQL, TLS) -> mTLS tunnel -> worker -> hardened sandbox.

The unit tier (``tests/unit/test_flight_status.py``) checks every error class over an in-process
router; this proves the ones a sandbox produces arrive with the same status: DuckDB's errors,
the statement timeout, the result limit, and a query cancelled on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import adbc_driver_manager
import docker
import pyarrow.flight as flight
import pytest
from adbc_driver_manager import AdbcStatusCode

from launcher.config import LauncherConfig
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.flight import messages as msg
from launcher.protocol import flightsql_pb2 as pb
from tests.support.flight import in_thread
from tests.support.flightchain import WAIT_S, Chain, chain
from tests.support.waiting import eventually

from .conftest import containers_of

pytestmark = pytest.mark.docker
# The analyst role runs under the integration tier's ``tight`` policy: a 2 s statement
# timeout and 100,000 result rows at most.
CATALOG = "roles:\n  analyst: {policy: tight}\n"
# No row before its end, which it never reaches.
SLOW_AGGREGATE = "SELECT sum(i) AS total FROM range(10000000000000) t(i)"
# Streams rows until something stops it.
ENDLESS = "SELECT i FROM range(1000000000000) t(i)"
# Streams a row now and then until something stops it.
TRICKLE = "SELECT i FROM range(1000000000000) t(i) WHERE i % 20000000 = 0"


@contextlib.asynccontextmanager
async def tight_chain(config: LauncherConfig, tmp_path: Path) -> AsyncIterator[Chain]:
    """``chain`` with ``CATALOG`` applied before the control plane starts."""
    source = tmp_path / "catalog.yaml"
    source.write_text(CATALOG)
    apply_catalog(ControlPlaneData(tmp_path / "cp").root, source)
    async with chain(config, tmp_path) as c:
        yield c


def failure(c: Chain, sql: str) -> adbc_driver_manager.Error:
    """The ADBC error ``sql`` fails with (blocking: call it in a thread)."""
    try:
        c.fetch(sql)
    except adbc_driver_manager.Error as error:
        return error
    raise AssertionError(f"{sql!r} did not fail")


def test_sandbox_failures_reach_adbc_with_statuses_it_can_act_on(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with tight_chain(config, tmp_path) as c:
            syntax = await in_thread(failure, c, "SELEC 1")
            assert isinstance(syntax, adbc_driver_manager.ProgrammingError)
            assert syntax.status_code == AdbcStatusCode.INVALID_ARGUMENT
            assert "syntax error" in str(syntax).partition(". Detail:")[0]

            timeout = await in_thread(failure, c, SLOW_AGGREGATE)
            assert timeout.status_code == AdbcStatusCode.TIMEOUT  # DEADLINE_EXCEEDED
            assert "timeout" in str(timeout).lower()

            too_big = await in_thread(failure, c, ENDLESS)
            assert too_big.status_code == AdbcStatusCode.UNKNOWN  # no RESOURCE_EXHAUSTED
            assert "max_result_rows" in str(too_big)
            await eventually(lambda: len(c.records) == 3, "the queries ended on the worker", WAIT_S)
            assert [r.outcome for r in c.records] == ["sql", "timeout", "result_limit"]
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 180))


def test_a_query_cancelled_on_the_worker_reaches_adbc_as_cancelled(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with chain(config, tmp_path) as c:
            failing = asyncio.create_task(in_thread(failure, c, TRICKLE))
            executor = c.launcher.executor
            await eventually(
                lambda: bool(executor.running()), "the query runs on the worker", WAIT_S
            )
            (query_id,) = executor.running()
            assert await executor.cancel(query_id)
            cancelled = await failing
            assert cancelled.status_code == AdbcStatusCode.CANCELLED
            assert "cancelled" in str(cancelled)
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 180))


def test_get_flight_info_for_an_aggregate_waits_for_the_whole_aggregate(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    """The sandbox sends the schema once DuckDB's reader exists, and DuckDB builds that reader
    when its first result chunk is ready: for an aggregate, after the whole aggregation. So
    GetFlightInfo returns when the result is complete and DoGet just fetches it, while a
    streaming query's GetFlightInfo returns with its first chunk (``ENDLESS`` never ends)."""
    aggregate = "SELECT sum(i) AS total FROM range(3000000000) t(i)"

    def timed(c: Chain, sql: str) -> tuple[float, float]:
        """Seconds GetFlightInfo took, then seconds DoGet took to its first batch."""
        command = msg.pack(pb.CommandStatementQuery(query=sql))
        descriptor = flight.FlightDescriptor.for_command(command)
        header = (b"authorization", f"Bearer {c.api_key}".encode())
        options = flight.FlightCallOptions(headers=[header])
        ca_pem = c.control_plane.data.ca().cert_pem()
        with flight.connect(c.control_plane.location, tls_root_certs=ca_pem) as client:
            started = time.perf_counter()
            info = client.get_flight_info(descriptor, options)
            schema_s = time.perf_counter() - started
            reader = client.do_get(info.endpoints[0].ticket, options)
            reader.read_chunk()
            reader.cancel()
            return schema_s, time.perf_counter() - started - schema_s

    async def scenario() -> None:
        async with chain(config, tmp_path) as c:
            await in_thread(timed, c, "SELECT 1")  # the pool warm for the next queries
            info_s, get_s = await in_thread(timed, c, aggregate)
            print(f"aggregate: GetFlightInfo {info_s:.2f} s, DoGet {get_s:.2f} s")
            assert info_s > 4 * get_s, (info_s, get_s)
            info_s, _ = await in_thread(timed, c, ENDLESS)
            print(f"streaming: GetFlightInfo {info_s:.2f} s")
            assert info_s < 5, info_s
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 180))
