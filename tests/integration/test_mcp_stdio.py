"""``duckcell mcp`` in local mode as an agent client runs it: the official MCP client over stdio,
the real sandbox image, one real sandbox per conversation.

Each test starts the server as a process of its own (``tests.support.mcp.stdio_server``) with a
launcher id of its own, so ``docker ps`` filtered by that id shows exactly its sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker
import pyarrow.parquet as pq
import pytest
from mcp import Client

from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX
from tests.support.mcp import stdio_server
from tests.support.waiting import eventually

from .conftest import containers_of, until_no_container

pytestmark = pytest.mark.docker

# A session policy for results bigger than agent-session allows (10M rows) and a statement
# timeout far beyond the tests' waits, so a statement ends only because it was cancelled.
BIG = """\
name: mcp-big
isolation: session
runtime: runc
limits:
  cpus: 1
  memory: 1GiB
  pids: 128
  scratch: 256MiB
  statement_timeout: 10m
  max_result_rows: 20000000
  max_result_bytes: 1GiB
duckdb:
  threads: 1
  memory_limit: 512MiB
  max_temp_directory_size: 128MiB
session:
  idle_ttl: 10m
  max_lifetime: 1h
pool:
  warm: 0
"""
# agent-session with an idle TTL of one second, so a test sees duckcell end a session.
IDLE = BIG.replace("name: mcp-big", "name: mcp-idle").replace("idle_ttl: 10m", "idle_ttl: 1s")
LONG_SQL = "SELECT count(*) FROM range(1000000000000) t(i) WHERE i % 7 = 3"
DEADLINE_S = 60.0


@pytest.fixture
def mcp_env(image: str, policies_dir: Path, tmp_path: Path) -> dict[str, str]:
    policies = tmp_path / "policies"
    policies.mkdir()
    for policy in policies_dir.glob("*.yaml"):
        (policies / policy.name).write_text(policy.read_text())
    (policies / "mcp-big.yaml").write_text(BIG)
    (policies / "mcp-idle.yaml").write_text(IDLE)
    return {
        "DUCKCELL_IMAGE": image,
        "DUCKCELL_POLICIES_DIR": str(policies),
        "DUCKCELL_STATE_DIR": str(tmp_path / "state"),
        "DUCKCELL_LAUNCHER_ID": f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-mcp-{uuid.uuid4().hex[:6]}",
    }


@contextlib.asynccontextmanager
async def _client(env: dict[str, str], *args: str) -> AsyncIterator[Client]:
    async with Client(stdio_server(list(args), env), read_timeout_seconds=120) as client:
        yield client


async def _sql(client: Client, sql: str) -> dict:
    answer = await client.call_tool("run_sql", {"sql": sql})
    assert not answer.is_error, answer.content[0].text
    return answer.structured_content


def test_a_temp_table_lives_across_calls_and_closing_leaves_no_sandbox(
    mcp_env: dict[str, str], engine: docker.DockerClient
) -> None:
    launcher_id = mcp_env["DUCKCELL_LAUNCHER_ID"]

    async def scenario() -> None:
        async with _client(mcp_env) as client:
            await _sql(
                client, "CREATE TEMP TABLE notes AS SELECT i, i * i AS sq FROM range(4) t(i)"
            )
            read = await _sql(client, "SELECT sum(sq) AS total FROM notes")
            assert read["rows"] == [[14]]
            assert (
                read["columns"] == [{"name": "total", "type": "HUGEINT"}]
                or read["columns"][0]["name"] == "total"
            )
            # The sample catalog is there with no flags (plain `duckcell mcp`).
            tables = await client.call_tool("list_tables", {})
            assert [t["name"] for t in tables.structured_content["tables"]] == ["trips"]
            trips = await _sql(client, "SELECT count(*) AS n FROM trips")
            assert trips["rows"][0][0] > 0
            assert len(containers_of(engine, launcher_id)) == 1  # one sandbox: the session's
        await until_no_container(engine, launcher_id, DEADLINE_S)

    asyncio.run(asyncio.wait_for(scenario(), 240))


def test_two_conversations_do_not_share_state_or_sandbox(
    mcp_env: dict[str, str], engine: docker.DockerClient
) -> None:
    launcher_id = mcp_env["DUCKCELL_LAUNCHER_ID"]

    async def scenario() -> None:
        async with _client(mcp_env) as first, _client(mcp_env) as second:
            await _sql(first, "CREATE TEMP TABLE secret AS SELECT 'only mine' AS note")
            await _sql(second, "SET VARIABLE mine = 'second'")
            unseen = await second.call_tool("run_sql", {"sql": "SELECT * FROM secret"})
            assert unseen.is_error and "secret does not exist" in unseen.content[0].text
            no_variable = await _sql(first, "SELECT getvariable('mine') AS v")
            assert no_variable["rows"] == [[None]]
            assert (await _sql(first, "SELECT note FROM secret"))["rows"] == [["only mine"]]
            sandboxes = containers_of(engine, launcher_id)
            assert len(sandboxes) == 2 and len(set(sandboxes)) == 2
        await until_no_container(engine, launcher_id, DEADLINE_S)

    asyncio.run(asyncio.wait_for(scenario(), 240))


@pytest.mark.parametrize(
    ("sql", "says"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "/etc/passwd"),
        ("INSTALL httpfs", ""),
        ("SET enable_external_access = true", ""),
        ("ATTACH '/scratch/x.db' AS x", ""),
    ],
)
def test_a_hostile_statement_is_a_tool_error_and_the_session_goes_on(
    mcp_env: dict[str, str], sql: str, says: str
) -> None:
    async def scenario() -> None:
        async with _client(mcp_env) as client:
            await _sql(client, "CREATE TEMP TABLE kept AS SELECT 1 AS v")
            refused = await client.call_tool("run_sql", {"sql": sql})
            assert refused.is_error
            text = refused.content[0].text
            assert says in text and "Traceback" not in text and "launcher/" not in text
            assert (await _sql(client, "SELECT v FROM kept"))["rows"] == [[1]]

    asyncio.run(asyncio.wait_for(scenario(), 240))


def test_ten_million_rows_are_cut_to_the_bounds_and_the_export_holds_them_all(
    mcp_env: dict[str, str], tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    sql = "SELECT range AS i FROM range(10000000)"

    async def scenario() -> None:
        async with _client(
            mcp_env, "--policy", "mcp-big", "--export-dir", str(exports), "--max-rows", "50"
        ) as client:
            answer = await client.call_tool("run_sql", {"sql": sql})
            assert not answer.is_error, answer.content[0].text
            result = answer.structured_content
            assert result["truncated"] and result["returned_rows"] == 50
            assert result["rows"][:3] == [[0], [1], [2]]
            # Counting gives up at a million rows: the answer says so instead of a total.
            assert result["total_rows"] is None and result["counted_rows"] >= 1_000_000
            size = len(json.dumps(result)) + len(answer.content[0].text)
            assert size < 20_000  # far under the 25,000 tokens agent clients allow
            done = await client.call_tool(
                "export_result", {"sql": sql, "file_name": "all-rows", "format": "parquet"}
            )
            assert not done.is_error, done.content[0].text
            assert done.structured_content["rows"] == 10_000_000
        path = exports / "all-rows.parquet"
        assert pq.ParquetFile(path).metadata.num_rows == 10_000_000

    asyncio.run(asyncio.wait_for(scenario(), 400))


def test_progress_is_reported_and_cancel_stops_the_statement(mcp_env: dict[str, str]) -> None:
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async def scenario() -> None:
        async with _client(mcp_env, "--policy", "mcp-big") as client:
            await _sql(client, "CREATE TEMP TABLE kept AS SELECT 5 AS v")
            long = asyncio.ensure_future(
                client.call_tool("run_sql", {"sql": LONG_SQL}, progress_callback=on_progress)
            )
            await eventually(lambda: bool(progress), "a progress notification", DEADLINE_S)
            assert "running for" in progress[0]
            long.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await long
            # The statement timeout is 10 minutes: the session answers within the deadline
            # only because the long statement was stopped; its state is intact.
            after = await asyncio.wait_for(_sql(client, "SELECT v FROM kept"), DEADLINE_S)
            assert after["rows"] == [[5]]

    asyncio.run(asyncio.wait_for(scenario(), 240))


def test_a_crashed_server_s_sandbox_is_reaped_by_the_next_start(
    mcp_env: dict[str, str], engine: docker.DockerClient
) -> None:
    launcher_id = mcp_env["DUCKCELL_LAUNCHER_ID"]
    instances = Path(mcp_env["DUCKCELL_STATE_DIR"]) / "instances"

    async def scenario() -> None:
        with contextlib.suppress(Exception):
            async with _client(mcp_env) as client:
                await _sql(client, "SELECT 1")
                (orphan,) = containers_of(engine, launcher_id)
                (lock,) = instances.glob("*.lock")
                os.kill(int(lock.read_text()), signal.SIGKILL)  # no cleanup at all
                await eventually(lambda: not lock.exists() or _unlocked(lock), "the crash")
        assert containers_of(engine, launcher_id) == [orphan]
        async with _client(mcp_env) as client:
            assert (await _sql(client, "SELECT 2 AS v"))["rows"] == [[2]]
            assert orphan not in containers_of(engine, launcher_id)

    asyncio.run(asyncio.wait_for(scenario(), 240))


def _unlocked(lock: Path) -> bool:
    with lock.open("rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_a_session_duckcell_ended_is_said_once_then_a_fresh_one_opens(
    mcp_env: dict[str, str], engine: docker.DockerClient
) -> None:
    launcher_id = mcp_env["DUCKCELL_LAUNCHER_ID"]

    async def scenario() -> None:
        async with _client(mcp_env, "--policy", "mcp-idle") as client:
            first = await _sql(client, "CREATE TEMP TABLE kept AS SELECT 1 AS v")
            # The idle TTL ends the session and its sandbox goes.
            await until_no_container(engine, launcher_id, DEADLINE_S)
            told = await client.call_tool("run_sql", {"sql": "SELECT v FROM kept"})
            assert told.is_error
            text = told.content[0].text
            assert "was idle for more than 1 s" in text and "next statement opens" in text
            fresh = await _sql(client, "SELECT 2 AS v")
            assert fresh["rows"] == [[2]] and fresh["session_id"] != first["session_id"]

    asyncio.run(asyncio.wait_for(scenario(), 240))
