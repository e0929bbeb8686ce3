"""A session-mode role through the whole real chain: ADBC (handshake, autocommit off,
adbc_ingest, executemany) -> control plane (Flight SQL, TLS) -> mTLS tunnel -> worker -> one
hardened session sandbox per connection.

The control plane holds the shipped ``agent-session`` policy (``isolation: session``) and a
catalog whose role ``notebook`` runs under it, so each ADBC connection is a session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import adbc_driver_flightsql.dbapi as adbc_flightsql
import docker
import pyarrow as pa
import pytest
from adbc_driver_flightsql import DatabaseOptions

from launcher.config import LauncherConfig
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.policies import apply_policies
from tests.support.flight import in_thread
from tests.support.flightchain import WAIT_S, chain
from tests.support.waiting import eventually

from .conftest import REPO, containers_of

pytestmark = pytest.mark.docker


def test_a_connection_is_one_session_sandbox_with_transactions_and_ingest(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    data = ControlPlaneData(tmp_path / "cp")
    apply_policies(data.root, [REPO / "policies" / "agent-session.yaml"])
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text("roles:\n  notebook: {policy: agent-session}\n")
    apply_catalog(data.root, catalog, policies=["agent-session"])

    async def scenario() -> None:
        async with chain(config, tmp_path) as c:
            key = data.api_keys().create("notebook")

            def work() -> dict[str, object]:
                seen: dict[str, object] = {}
                options = {
                    DatabaseOptions.TLS_ROOT_CERTS.value: data.ca().cert_pem().decode(),
                    "username": "anyone",
                    "password": key,
                }
                location = c.control_plane.location
                with (
                    adbc_flightsql.connect(location, db_kwargs=options, autocommit=False) as conn,
                    conn.cursor() as cursor,
                ):
                    cursor.execute("CREATE TABLE kept (n INTEGER)")
                    cursor.executemany("INSERT INTO kept VALUES (?)", [(1,), (2,)])
                    seen["executemany"] = cursor.rowcount
                    conn.commit()
                    cursor.execute("INSERT INTO kept VALUES (100)")
                    conn.rollback()
                    cursor.execute("SELECT sum(n)::INTEGER FROM kept")
                    seen["sum"] = cursor.fetchall()
                    table = pa.table({"id": [1, 2, 3], "zone": ["a", None, "c"]})
                    seen["ingested"] = cursor.adbc_ingest("loaded", table, mode="create")
                    conn.commit()
                    cursor.execute("SELECT id, zone FROM loaded ORDER BY id")
                    seen["loaded"] = cursor.fetchall()
                    # The session's own tables are listed from its DuckDB, with their schema.
                    seen["schema"] = conn.adbc_get_table_schema("loaded", catalog_filter="memory")
                return seen

            seen = await in_thread(work)
            assert seen == {
                "executemany": 2,
                "sum": [(3,)],
                "ingested": 3,
                "loaded": [(1, "a"), (2, None), (3, "c")],
                "schema": pa.schema([("id", pa.int64()), ("zone", pa.string())]),
            }
            in_sessions = [r for r in c.records if r.session_id is not None]
            assert in_sessions and len({r.session_id for r in in_sessions}) == 1
            await eventually(
                lambda: len(c.launcher.sessions) == 0,
                "the session closed with the connection (CloseSession)",
                WAIT_S,
            )
        assert containers_of(engine, config.launcher_id) == []

    asyncio.run(asyncio.wait_for(scenario(), 240))
