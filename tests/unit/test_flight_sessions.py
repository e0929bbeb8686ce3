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
import pytest

from launcher.controlplane.datadir import ControlPlaneData
from tests.support.flight import FlightControlPlane, adbc_connect
from tests.support.flightstack import SESSION_OPTION
from tests.support.sessions import CREATE, READ, sessions_stack
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
