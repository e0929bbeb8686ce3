"""The control plane's MCP endpoint (``duckcell controlplane serve --mcp-listen``) with the official
MCP client over streamable HTTP, a real worker with real sandboxes behind it.

The control plane is the real command in a process of its own (so the command's wiring is
what is tested); the worker runs in the test's loop, enrolled with a token from the control
plane's data directory as ``duckcell controlplane token create`` makes one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import httpx2
import pyarrow.parquet as pq
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from launcher.config import LauncherConfig
from launcher.controlplane.datadir import ControlPlaneData
from launcher.worker.daemon import Worker
from launcher.worker.enroll import enroll
from tests.support.controlplane import FAST
from tests.support.mcp import REPO

from .conftest import containers_of, until_no_container

pytestmark = pytest.mark.docker
DEADLINE_S = 60.0
_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}
_STARTED = re.compile(r"listening on (\S+), tunnel on \S+, MCP on (\S+) ")


@contextlib.asynccontextmanager
async def _control_plane(data: Path, *flags: str) -> AsyncIterator[tuple[str, str]]:
    """``controlplane serve`` until the block ends; yields its query address and MCP URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "launcher.cli",
        "controlplane",
        "serve",
        "--data",
        str(data),
        "--listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "127.0.0.1:0",
        *flags,
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), DEADLINE_S)).decode()
        found = _STARTED.search(line)
        assert found, line
        yield found.group(1), found.group(2)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), DEADLINE_S)


@contextlib.asynccontextmanager
async def _worker(address: str, data: Path, config: LauncherConfig, state: Path):
    identity = await enroll(address, ControlPlaneData(data).tokens().create(), state, "w1")
    async with Worker(identity, config, backoff=FAST, warm_override=0) as worker:
        worker.start()
        await worker.connected(DEADLINE_S)
        yield worker


def _client(url: str, key: str, ca: Path | None = None) -> Client:
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"}, timeout=120, verify=verify
    )
    return Client(streamable_http_client(url, http_client=http), read_timeout_seconds=120)


async def _sql(client: Client, sql: str) -> dict:
    answer = await client.call_tool("run_sql", {"sql": sql})
    assert not answer.is_error, answer.content[0].text
    return answer.structured_content


def test_each_mcp_session_is_a_session_of_its_own_and_ends_with_it(
    config: LauncherConfig, engine: docker.DockerClient, tmp_path: Path
) -> None:
    data = tmp_path / "cp"

    async def scenario() -> None:
        flags = ("--mcp-listen", "127.0.0.1:0", "--mcp-plaintext")
        async with (
            _control_plane(data, *flags) as (address, url),
            _worker(address, data, config, tmp_path / "w"),
        ):
            key = ControlPlaneData(data).api_keys().create("analyst")
            async with _client(url, key) as first, _client(url, key) as second:
                await _sql(first, "CREATE TEMP TABLE notes AS SELECT 'mine' AS note")
                assert (await _sql(first, "SELECT note FROM notes"))["rows"] == [["mine"]]
                unseen = await second.call_tool("run_sql", {"sql": "SELECT note FROM notes"})
                assert unseen.is_error and "notes does not exist" in unseen.content[0].text
                sandboxes = containers_of(engine, config.launcher_id)
                assert len(sandboxes) == 2 and len(set(sandboxes)) == 2
                hostile = await first.call_tool("run_sql", {"sql": "INSTALL httpfs"})
                assert hostile.is_error and "Traceback" not in hostile.content[0].text
                listed = await first.call_tool("list_tables", {})
                assert not listed.is_error and listed.structured_content["tables"] == []
                # An export is a resource of the conversation that wrote it, and only of it.
                sql = "SELECT range AS i FROM range(100000)"
                done = await first.call_tool("export_result", {"sql": sql, "file_name": "all"})
                assert not done.is_error, done.content[0].text
                uri = done.structured_content["uri"]
                assert uri == "duckcell://exports/all.parquet"
                (content,) = (await first.read_resource(uri)).contents
                table = pq.read_table(io.BytesIO(base64.b64decode(content.blob)))
                assert table.column("i").to_pylist() == list(range(100000))
                with pytest.raises(MCPError, match="no export named"):
                    await second.read_resource(uri)
            # Leaving the clients deletes their MCP sessions: their sandboxes go too.
            await until_no_container(engine, config.launcher_id, DEADLINE_S)
            async with httpx2.AsyncClient() as raw:
                for header in ({"Authorization": "Bearer dck_wrong_key"}, {}):
                    reply = await raw.post(url, headers=header, json=_INITIALIZE)
                    assert reply.status_code == 401
                    assert "API key" in reply.json()["error"]

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_the_endpoint_serves_tls_with_the_control_plane_s_certificate(
    config: LauncherConfig, tmp_path: Path
) -> None:
    data = tmp_path / "cp"
    ca = tmp_path / "ca.pem"

    async def scenario() -> None:
        async with (
            _control_plane(data, "--mcp-listen", "127.0.0.1:0") as (address, url),
            _worker(address, data, config, tmp_path / "w"),
        ):
            assert url.startswith("https://")
            ca.write_bytes(ControlPlaneData(data).ca().cert_pem())
            key = ControlPlaneData(data).api_keys().create("analyst")
            async with _client(url, key, ca) as client:
                assert (await _sql(client, "SELECT 6 * 7 AS answer"))["rows"] == [[42]]

    asyncio.run(asyncio.wait_for(scenario(), 300))


def test_plaintext_mcp_off_loopback_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "controlplane",
            "serve",
            "--data",
            str(tmp_path / "cp"),
            "--listen",
            "127.0.0.1:0",
            "--mcp-listen",
            "0.0.0.0:0",
            "--mcp-plaintext",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "plaintext MCP is allowed on loopback only" in done.stderr
