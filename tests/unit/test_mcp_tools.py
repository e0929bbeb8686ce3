"""The MCP tools and a conversation's session lifecycle, with the real MCP client in memory.

The backend is ``DuckdbBackend`` (real DuckDB in this process, one connection per session): the
tools, the bounds and the lifecycle are what is tested here; the sandbox paths are the
integration tier's (``tests/integration/test_mcp_stdio.py``).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mcp import Client

from launcher.mcp.conversation import Conversation
from launcher.mcp.export import Exports
from launcher.mcp.results import Bounds
from launcher.mcp.server import ToolSettings, build_server
from tests.support.mcp import DuckdbBackend
from tests.support.waiting import run


def _server(backend: DuckdbBackend, tmp_path: Path | None = None, **bounds: int):
    conversation = Conversation(backend)
    settings = ToolSettings(
        bounds=Bounds(**bounds), exports=Exports(tmp_path / "exports" if tmp_path else None)
    )
    server = build_server(lambda ctx: conversation, settings, on_close=conversation.close)
    return server, conversation


def test_tools_say_what_they_do_and_which_only_read() -> None:
    server, _ = _server(DuckdbBackend())

    async def scenario() -> None:
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {
            "run_sql",
            "list_tables",
            "describe_table",
            "export_result",
            "reset_session",
        }
        assert all(t.description for t in tools.values())
        read_only = {n for n, t in tools.items() if t.annotations.read_only_hint}
        assert read_only == {"list_tables", "describe_table"}
        assert tools["reset_session"].annotations.destructive_hint

    run(scenario)


def test_a_temp_table_lives_across_calls_and_reset_drops_it() -> None:
    backend = DuckdbBackend()
    server, conversation = _server(backend)

    async def scenario() -> None:
        async with Client(server) as client:
            assert conversation.session_id is None  # nothing opens before a statement
            made = await client.call_tool("run_sql", {"sql": "CREATE TEMP TABLE n AS SELECT 7 v"})
            assert not made.is_error, made.content
            first = conversation.session_id
            read = await client.call_tool("run_sql", {"sql": "SELECT v FROM n"})
            assert read.structured_content["rows"] == [[7]]
            assert read.structured_content["session_id"] == first
            reset = await client.call_tool("reset_session", {})
            assert first in reset.content[0].text and backend.closed == [first]
            gone = await client.call_tool("run_sql", {"sql": "SELECT v FROM n"})
            assert gone.is_error and "n does not exist" in gone.content[0].text
            assert conversation.session_id not in (None, first)
        # The conversation's end closes its session.
        assert backend.sessions == {}

    run(scenario)


def test_an_ended_session_is_said_once_then_a_fresh_one_opens() -> None:
    backend = DuckdbBackend()
    server, conversation = _server(backend)

    async def scenario() -> None:
        async with Client(server) as client:
            await client.call_tool("run_sql", {"sql": "CREATE TEMP TABLE n AS SELECT 1 v"})
            old = conversation.session_id
            assert old is not None
            backend.end(old, "was idle for more than 600 s")
            told = await client.call_tool("run_sql", {"sql": "SELECT v FROM n"})
            assert told.is_error
            text = told.content[0].text
            assert "was idle for more than 600 s" in text and "temp tables" in text
            fresh = await client.call_tool("run_sql", {"sql": "SELECT 2 AS v"})
            assert not fresh.is_error
            assert fresh.structured_content["session_id"] not in (None, old)

    run(scenario)


def test_a_failed_statement_is_a_tool_error_with_duckdbs_message_only() -> None:
    server, _ = _server(DuckdbBackend())

    async def scenario() -> None:
        async with Client(server) as client:
            failed = await client.call_tool("run_sql", {"sql": "SELEC 1"})
        assert failed.is_error
        text = failed.content[0].text
        assert "syntax error" in text and "Traceback" not in text and "File " not in text

    run(scenario)


def test_a_large_result_stays_within_the_bounds() -> None:
    server, _ = _server(DuckdbBackend(), max_rows=20, max_chars=1000)

    async def scenario() -> None:
        async with Client(server) as client:
            answer = await client.call_tool(
                "run_sql", {"sql": "SELECT range AS i, repeat('x', 30) AS s FROM range(100000)"}
            )
        result = answer.structured_content
        assert result["total_rows"] == 100000 and result["truncated"]
        assert result["returned_rows"] <= 20
        assert len(json.dumps(result["rows"])) <= 1000
        assert result["columns"] == [
            {"name": "i", "type": "BIGINT"},
            {"name": "s", "type": "VARCHAR"},
        ]
        assert "of 100000 row(s) shown; truncated" in answer.content[0].text

    run(scenario)


def test_list_and_describe_tables() -> None:
    backend = DuckdbBackend({"trips": pa.table({"id": [1, 2, 3], "zone": ["a", "b", "a"]})})
    server, _ = _server(backend)

    async def scenario() -> None:
        async with Client(server) as client:
            listed = await client.call_tool("list_tables", {})
            described = await client.call_tool("describe_table", {"table": "trips"})
            missing = await client.call_tool("describe_table", {"table": 'no"pe'})
        assert listed.structured_content["tables"] == [
            {"name": "trips", "source": "arrow table (test)"}
        ]
        assert described.structured_content == {
            "table": "trips",
            "columns": [{"name": "id", "type": "BIGINT"}, {"name": "zone", "type": "VARCHAR"}],
            "row_count": 3,
        }
        assert missing.is_error and 'no"pe' in missing.content[0].text

    run(scenario)


def test_export_writes_every_row_under_the_directory_only(tmp_path: Path) -> None:
    server, _ = _server(DuckdbBackend(), tmp_path, max_rows=5)

    async def scenario() -> None:
        async with Client(server) as client:
            sql = "SELECT range AS i FROM range(50000)"
            done = await client.call_tool("export_result", {"sql": sql, "file_name": "all"})
            assert not done.is_error, done.content
            again = await client.call_tool("export_result", {"sql": sql, "file_name": "all"})
            escape = await client.call_tool(
                "export_result", {"sql": sql, "file_name": "../x", "format": "csv"}
            )
            failed = await client.call_tool(
                "export_result", {"sql": "SELECT nope", "file_name": "bad"}
            )
        path = Path(done.structured_content["path"])
        assert path == tmp_path / "exports" / "all.parquet"
        assert pq.read_table(path).column("i").to_pylist() == list(range(50000))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the operator's user reads it only
        assert again.is_error and "exists already" in again.content[0].text
        assert escape.is_error and "not allowed" in escape.content[0].text
        assert failed.is_error and list((tmp_path / "exports").iterdir()) == [path]

    run(scenario)


def test_export_is_off_without_a_directory() -> None:
    server, _ = _server(DuckdbBackend())

    async def scenario() -> None:
        async with Client(server) as client:
            refused = await client.call_tool("export_result", {"sql": "SELECT 1", "file_name": "a"})
        assert refused.is_error and "--export-dir" in refused.content[0].text

    run(scenario)
