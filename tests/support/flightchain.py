"""The whole real chain for Flight SQL clients: control plane (Flight SQL, TLS) on its thread ->
mTLS tunnel -> a ``Worker`` over the Docker engine -> warm pool -> hardened sandbox.

Integration tier only (it starts containers). ``WAIT_S`` bounds a wait on the worker's state:
real sandboxes on a loaded machine are slower than the unit tier's in-process runners.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from launcher.config import LauncherConfig
from launcher.controlplane.datadir import ControlPlaneData
from launcher.executor import QueryRecord
from launcher.host import LocalLauncher
from launcher.worker.daemon import Worker

from .controlplane import DEADLINE_S, FAST
from .flight import FlightControlPlane, adbc_connect

WAIT_S = 30.0


@dataclass
class Chain:
    control_plane: FlightControlPlane
    launcher: LocalLauncher
    api_key: str
    records: list[QueryRecord]

    def fetch(self, sql: str) -> pa.Table:
        """Run ``sql`` through ADBC (blocking: call it in a thread)."""
        with adbc_connect(self.control_plane, self.api_key) as conn, conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetch_arrow_table()


@contextlib.asynccontextmanager
async def chain(config: LauncherConfig, tmp_path: Path, *, warm: int = 1) -> AsyncIterator[Chain]:
    control_plane = FlightControlPlane(ControlPlaneData(tmp_path / "cp"))
    try:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        records: list[QueryRecord] = []
        async with Worker(
            identity, config, backoff=FAST, warm_override=warm, on_finished=records.append
        ) as worker:
            worker.start()
            await worker.connected(DEADLINE_S)
            api_key = control_plane.data.api_keys().create("analyst")
            yield Chain(control_plane, worker.host, api_key, records)
    finally:
        control_plane.close()
