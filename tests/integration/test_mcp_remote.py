"""``duckcell mcp --control-plane``: the official MCP client over stdio, the server a client of a
real control plane whose worker runs real sandboxes (``remote_stack``).

The control plane authenticates the API key, routes the conversation's session to the worker
and audits every statement; a wrong key stops the server at start with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import docker
import pytest
from mcp import Client

from launcher.config import LauncherConfig
from launcher.controlplane.audit import AuditLog
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from tests.support.controlplane import ControlPlane
from tests.support.mcp import REPO, stdio_server
from tests.support.waiting import eventually

from .conftest import containers_of, until_no_container
from .remote_stack import remote_stack

pytestmark = pytest.mark.docker
DEADLINE_S = 60.0
CATALOG = """
connections:
  files: {kind: local}
tables:
  trips: {connection: files, path: trips.parquet, format: parquet}
  salaries: {connection: files, path: salaries.parquet, format: parquet}
roles:
  analyst: {tables: [trips]}
"""
LONG_SQL = "SELECT count(*) FROM range(1000000000000) t(i) WHERE i % 7 = 3"


def _args(control_plane: ControlPlane, tmp_path: Path, key: str) -> list[str]:
    assert control_plane.server is not None
    (tmp_path / "key").write_text(key + "\n")
    (tmp_path / "ca.pem").write_bytes(control_plane.data.ca().cert_pem())
    return [
        "--control-plane",
        control_plane.server.address,
        "--api-key-file",
        str(tmp_path / "key"),
        "--ca-file",
        str(tmp_path / "ca.pem"),
    ]


def test_a_conversation_keeps_its_session_on_the_worker_and_is_audited(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    (tmp_path / "catalog.yaml").write_text(CATALOG)
    apply_catalog(control_plane.data.root, tmp_path / "catalog.yaml")

    async def scenario() -> None:
        async with remote_stack(control_plane, config, tmp_path):
            key = control_plane.data.api_keys().create("analyst")
            params = stdio_server(_args(control_plane, tmp_path, key), {})
            async with Client(params, read_timeout_seconds=120) as client:
                listed = await client.call_tool("list_tables", {})
                assert listed.structured_content["tables"] == [
                    {"name": "trips", "source": "parquet on connection files"}
                ]  # not salaries: the role may not read it
                made = await client.call_tool(
                    "run_sql", {"sql": "CREATE TEMP TABLE notes AS SELECT 6 * 7 AS answer"}
                )
                assert not made.is_error, made.content[0].text
                read = await client.call_tool("run_sql", {"sql": "SELECT answer FROM notes"})
                assert read.structured_content["rows"] == [[42]]
                session_id = read.structured_content["session_id"]
                (sandbox,) = containers_of(engine, config.launcher_id)
                hostile = await client.call_tool(
                    "run_sql", {"sql": "SELECT * FROM read_text('/etc/passwd')"}
                )
                assert hostile.is_error and "Traceback" not in hostile.content[0].text
                reset = await client.call_tool("reset_session", {})
                assert "closed" in reset.content[0].text
                gone = await client.call_tool("run_sql", {"sql": "SELECT answer FROM notes"})
                assert gone.is_error and "notes does not exist" in gone.content[0].text
                assert sandbox not in containers_of(engine, config.launcher_id)
            await until_no_container(engine, config.launcher_id, DEADLINE_S)
            records = AuditLog(control_plane.data.database()).recent(50)
            # Every statement of the conversation's session is audited with the session's id.
            in_session = [r.sql for r in records if r.session_id == session_id]
            assert in_session[::-1][:2] == [
                "CREATE TEMP TABLE notes AS SELECT 6 * 7 AS answer",
                "SELECT answer FROM notes",
            ]
            assert all(r.caller.endswith("/analyst") for r in records)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 240))
    finally:
        control_plane.close()


def test_cancel_stops_a_statement_on_the_worker_and_the_session_goes_on(
    config: LauncherConfig, tmp_path: Path
) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async def scenario() -> None:
        async with remote_stack(control_plane, config, tmp_path):
            key = control_plane.data.api_keys().create("analyst")
            params = stdio_server(_args(control_plane, tmp_path, key), {})
            async with Client(params, read_timeout_seconds=120) as client:
                made = await client.call_tool(
                    "run_sql", {"sql": "CREATE TEMP TABLE k AS SELECT 3 v"}
                )
                assert not made.is_error, made.content[0].text
                long = asyncio.ensure_future(
                    client.call_tool("run_sql", {"sql": LONG_SQL}, progress_callback=on_progress)
                )
                await eventually(lambda: bool(progress), "a progress notification", DEADLINE_S)
                long.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await long
                # agent-session's statement timeout is 60 s: an answer within 30 s means the
                # long statement was stopped on the worker, not left to time out.
                after = await asyncio.wait_for(
                    client.call_tool("run_sql", {"sql": "SELECT v FROM k"}), 30
                )
                assert after.structured_content["rows"] == [[3]]

    try:
        asyncio.run(asyncio.wait_for(scenario(), 240))
    finally:
        control_plane.close()


def test_a_wrong_api_key_stops_the_server_at_start(tmp_path: Path) -> None:
    control_plane = ControlPlane(ControlPlaneData(tmp_path / "cp"))

    async def scenario() -> tuple[int, str]:
        await control_plane.start()
        args = _args(control_plane, tmp_path, "dck_nope_0000000000000000")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "launcher.cli",
            "mcp",
            *args,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await process.communicate()
        return process.returncode or 0, stderr.decode()

    try:
        code, stderr = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        control_plane.close()
    assert code == 2
    (line,) = stderr.strip().splitlines()
    assert line.startswith("duckcell: error:") and "key" in line.lower()
