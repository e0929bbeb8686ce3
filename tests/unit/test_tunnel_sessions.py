"""Sessions through the control plane: client -> control plane -> tunnel -> worker's sessions.

The same loopback path as ``test_query_tunnel`` (real TLS, real mutual TLS for the tunnel, the
real executor over FakeBackend with real runners and DuckDB), with a worker that knows a query
policy and two session policies. A temp table is the witness of where a query ran: it exists
only in the DuckDB of the sandbox that created it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc import aio

from launcher.controlplane.routing import QueryRouter
from launcher.controlplane.sessions import (
    MAX_SESSIONS_PER_OWNER,
    Outbox,
    RoutedSession,
    SessionTable,
)
from launcher.errors import SessionError, SqlError
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc
from tests.support.controlplane import DEADLINE_S, ControlPlane
from tests.support.sessions import (
    CREATE,
    READ,
    Sessions,
    sessions_stack,
)
from tests.support.waiting import eventually, run


def test_a_temp_table_lives_in_its_session_and_nowhere_else(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path) as s:
            session_id = await s.client.open_session("agent-session")
            await s.client.table(CREATE.format(n=42), session_id=session_id)
            assert await s.read(session_id) == [42]
            with pytest.raises(SqlError, match="notes"):
                await s.client.table(READ)  # a per-query sandbox: no such table
            in_session = [r for r in s.records if r.session_id is not None]
            assert len(in_session) == 2 and len({r.sandbox for r in in_session}) == 1
            assert in_session[0].policy == "agent-session"

    run(scenario)


def test_two_sessions_are_isolated_from_each_other(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path) as s:
            first, second = await asyncio.gather(
                s.client.open_session("agent-session"), s.client.open_session("agent-session")
            )
            assert first != second
            await s.client.table(CREATE.format(n=1), session_id=first)
            with pytest.raises(SqlError, match="notes"):
                await s.read(second)
            await s.client.table(CREATE.format(n=2), session_id=second)
            assert (await s.read(first), await s.read(second)) == ([1], [2])
            assert len(s.host.sessions) == 2

    run(scenario)


def test_closing_a_session_ends_it_on_the_worker_and_for_the_client(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path) as s:
            session_id = await s.client.open_session()
            await s.client.table(CREATE.format(n=7), session_id=session_id)
            await s.client.close_session(session_id)
            assert not s.router.has_session(session_id)
            with pytest.raises(SessionError, match=f"session {session_id} has ended.*closed"):
                await s.read(session_id)
            await eventually(lambda: len(s.host.sessions) == 0, "the worker closed it")
            await eventually(lambda: s.backend.live() == 0, "its sandbox is gone")
            await s.client.close_session(session_id)  # closing twice is not an error

    run(scenario)


def test_another_api_key_cannot_use_or_close_the_session(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path) as s:
            session_id = await s.client.open_session()
            await s.client.table(CREATE.format(n=3), session_id=session_id)
            async with s.other_client() as intruder:
                with pytest.raises(SessionError, match="unknown session"):
                    await intruder.table(READ, session_id=session_id)
                with pytest.raises(SessionError, match="unknown session"):
                    await intruder.close_session(session_id)
            error = await _raw_run(s, session_id)
            assert error.code() == grpc.StatusCode.NOT_FOUND
            assert await s.read(session_id) == [3]  # the owner's session is untouched

    run(scenario)


def test_a_worker_disconnect_ends_its_sessions_with_a_clear_error(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path) as s:
            session_id = await s.client.open_session()
            await s.client.table(CREATE.format(n=5), session_id=session_id)
            s.workers[0].tunnel.stop()
            await asyncio.wait_for(s.workers[0].running, DEADLINE_S)
            await eventually(lambda: not s.router.online(), "the control plane saw it leave")
            assert not s.router.has_session(session_id)
            with pytest.raises(SessionError, match=r"lost its worker wkr-\w+, which disconnected"):
                await s.read(session_id)
            assert len(s.host.sessions) == 0  # the worker closed it as its stream ended

    run(scenario)


def test_an_idle_session_ended_by_the_worker_is_reported_to_the_control_plane(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path) as s:
            session_id = await s.client.open_session("brief")
            await s.client.table(CREATE.format(n=9), session_id=session_id)
            # No query meanwhile: only the worker's SessionEnded can tell the control plane.
            await eventually(lambda: not s.router.has_session(session_id), "it was reported")
            assert len(s.host.sessions) == 0
            with pytest.raises(SessionError, match="has ended: it was idle for more than 1 s"):
                await s.read(session_id)

    run(scenario)


def test_a_query_policy_cannot_open_a_session(control_plane: ControlPlane, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path) as s:
            with pytest.raises(SessionError, match="isolation: session"):
                await s.client.open_session("default")
            with pytest.raises(SessionError, match="unknown policy"):
                await s.client.open_session("no-such-policy")
            assert len(s.host.sessions) == 0

    run(scenario)


def test_a_sessions_queries_all_go_to_its_worker_and_others_are_spread(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with sessions_stack(control_plane, tmp_path, workers=2) as s:
            session_id = await s.client.open_session()
            await s.client.table(CREATE.format(n=4), session_id=session_id)
            for _ in range(6):  # round robin would put half of these on the other worker
                assert await s.read(session_id) == [4]
                await s.client.table("SELECT 1")
            holder, other = sorted(s.workers, key=lambda w: -len(w.host.sessions))
            assert len(holder.host.sessions) == 1 and len(other.host.sessions) == 0
            assert sum(r.session_id is not None for r in holder.records) == 7
            assert all(r.session_id is None for r in other.records)
            assert len(other.records) >= 2  # the outside queries did go round

    run(scenario)


def test_an_open_given_up_while_the_worker_opens_it_closes_the_session() -> None:
    """The client left during OpenSession: the router forgets it and tells the worker to
    close it, so the sandbox it was getting is not kept for nobody."""

    async def scenario() -> None:
        router = QueryRouter()
        outbox = router.worker_connected("wkr-1")
        opening = asyncio.create_task(router.open_session("agent-session", owner="key/analyst"))
        sent = await asyncio.wait_for(outbox.get(), DEADLINE_S)
        session_id = sent.session_open.session_id
        assert sent.session_open.policy == "agent-session" and router.has_session(session_id)
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        close = await asyncio.wait_for(outbox.get(), DEADLINE_S)
        assert close.session_close.session_id == session_id
        assert not router.has_session(session_id)
        late = pb.SessionOpened(session_id=session_id, ok=True, policy="agent-session")
        router.session_opened("wkr-1", outbox, late)  # a late answer changes nothing
        with pytest.raises(SessionError, match="has ended: it was never opened"):
            await anext(router.run("SELECT 1", "", caller="key/analyst", session_id=session_id))

    run(scenario)


async def _raw_run(s: Sessions, session_id: str) -> aio.AioRpcError:
    """Query.Run in another key's name without the client class; the status it ends with."""
    server = s.control_plane.server
    assert server is not None
    key = s.control_plane.data.api_keys().create("analyst")
    credentials = grpc.ssl_channel_credentials(s.control_plane.data.ca().cert_pem())
    async with aio.secure_channel(server.address, credentials) as channel:
        request = pb.QueryRequest(sql=READ, session_id=session_id)
        call = pb_grpc.QueryStub(channel).Run(
            request, metadata=(("authorization", f"Bearer {key}"),)
        )
        with pytest.raises(aio.AioRpcError) as failed:
            async for _ in call:
                pass
    return failed.value


def test_one_api_key_holds_at_most_a_fixed_number_of_sessions() -> None:
    """Opening or open, one key's sessions are capped (each is a sandbox on a worker); another
    key still opens, and a session that ends frees its place."""

    async def scenario() -> None:
        table = SessionTable()
        outbox: Outbox = asyncio.Queue()

        def session(n: int, owner: str) -> RoutedSession:
            return RoutedSession(f"ses-{owner}-{n}", "w1", outbox, owner)

        for n in range(MAX_SESSIONS_PER_OWNER):
            table.add(session(n, "key-a"))
        with pytest.raises(SessionError, match="already holds 16 sessions"):
            table.add(session(99, "key-a"))
        table.add(session(0, "key-b"))
        table.forget("ses-key-a-0", "was closed by its client")
        table.add(session(99, "key-a"))
        assert len(table) == MAX_SESSIONS_PER_OWNER + 1

    run(scenario)
