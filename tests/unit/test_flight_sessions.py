"""Flight SQL sessions through the whole chain: ADBC with an ``x-duckcell-session`` header ->
Flight SQL server -> router's sessions -> tunnel -> the worker's session sandbox.

The stack is ``tests.support.sessions``' (a worker knowing the ``agent-session`` policy, real
runners over FakeBackend) with the Flight SQL endpoint on; a temp table witnesses where each
statement ran: it exists only in the sandbox that created it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import adbc_driver_manager
import pyarrow.flight as flight
import pytest

from launcher.controlplane.audit import AuditLog
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.policies import apply_policies
from launcher.flight import messages as msg
from launcher.protocol import flightsql_pb2 as pb
from tests.support.flight import FlightControlPlane, adbc_connect
from tests.support.flightstack import SESSION_OPTION
from tests.support.sessions import CREATE, READ, SESSION_POLICY, sessions_stack
from tests.support.waiting import eventually, run


def test_a_named_session_shares_one_sandbox_until_the_client_closes(tmp_path: Path) -> None:
    cp = FlightControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> None:
        async with sessions_stack(cp, tmp_path) as s:
            key = cp.data.api_keys().create("analyst")

            def in_session() -> list[tuple[object, ...]]:
                with (
                    adbc_connect(cp, key, **{SESSION_OPTION: "notebook"}) as conn,
                    conn.cursor() as cursor,
                ):
                    cursor.execute(CREATE.format(n=42))
                    cursor.execute(READ)
                    return cursor.fetchall()

            def without_session() -> None:
                with adbc_connect(cp, key) as conn, conn.cursor() as cursor:
                    cursor.execute(READ)

            assert await asyncio.to_thread(in_session) == [(42,)]
            in_sessions = [r for r in s.records if r.session_id is not None]
            assert len(in_sessions) == 2 and len({r.sandbox for r in in_sessions}) == 1
            assert in_sessions[0].policy == "agent-session"
            # conn.close() sent CloseSession: the worker destroyed the session's sandbox.
            await eventually(lambda: len(s.host.sessions) == 0, "the worker closed it")
            with pytest.raises(adbc_driver_manager.Error, match="notes"):
                await asyncio.to_thread(without_session)

    try:
        run(scenario)
    finally:
        cp.close()


def test_a_session_mode_role_gets_one_session_per_connection(tmp_path: Path) -> None:
    """The role's policy, as the control plane holds it, has ``isolation: session``: an ADBC
    connection that handshakes (username/password) runs all its statements in one session,
    one that only sends its key is told how to get one."""
    data = ControlPlaneData(tmp_path / "cp")
    policy_file = tmp_path / "agent-session.yaml"
    policy_file.write_text(SESSION_POLICY)
    apply_policies(data.root, [policy_file])
    catalog_file = tmp_path / "catalog.yaml"
    catalog_file.write_text("roles:\n  notebook: {policy: agent-session}\n")
    apply_catalog(data.root, catalog_file, policies=["agent-session"])
    cp = FlightControlPlane(data)

    async def scenario() -> None:
        async with sessions_stack(cp, tmp_path) as s:
            key = cp.data.api_keys().create("notebook")
            handshake = {"username": "anyone", "password": key}

            def in_connection() -> list[tuple[object, ...]]:
                with adbc_connect(cp, None, **handshake) as conn, conn.cursor() as cursor:
                    cursor.execute(CREATE.format(n=7))
                    cursor.execute(READ)
                    return cursor.fetchall()

            def without_connection() -> None:
                with adbc_connect(cp, key) as conn, conn.cursor() as cursor:
                    cursor.execute("SELECT 1")

            assert await asyncio.to_thread(in_connection) == [(7,)]
            in_sessions = [r for r in s.records if r.session_id is not None]
            assert len(in_sessions) == 2 and len({r.sandbox for r in in_sessions}) == 1
            await eventually(lambda: len(s.host.sessions) == 0, "closed with the connection")
            with pytest.raises(adbc_driver_manager.ProgrammingError, match="names no connection"):
                await asyncio.to_thread(without_connection)

            def guessed_token() -> None:
                with flight.connect(cp.location, tls_root_certs=cp.data.ca().cert_pem()) as client:
                    headers = [(b"authorization", b"Bearer dcs1." + b"A" * 43)]
                    command = msg.pack(pb.CommandStatementQuery(query=READ))
                    client.get_flight_info(
                        flight.FlightDescriptor.for_command(command),
                        flight.FlightCallOptions(headers=headers),
                    )

            with pytest.raises(flight.FlightUnauthenticatedError, match="unknown or expired"):
                await asyncio.to_thread(guessed_token)

            def refused() -> list[tuple[str, str, str]]:
                records = AuditLog(cp.data.database()).recent()
                return [(r.outcome, r.reason, r.message) for r in records if r.outcome == "refused"]

            # Recorded in the control plane's audit log (`duckcell controlplane audit`).
            await eventually(lambda: len(refused()) == 1, "the refusal audited")
            assert "unknown session token" in refused()[0][2]

    try:
        run(scenario)
    finally:
        cp.close()
