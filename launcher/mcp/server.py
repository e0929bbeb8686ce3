"""The MCP tools: run SQL, list and describe tables, export a result, reset the session.

Each tool works on the caller's ``Conversation`` (``conversation_for`` picks it: over stdio
there is one per process). A refused or failed statement is a tool error whose text is
duckcell's one-line message (DuckDB's own for SQL, the refusal's reason for a policy), never a
stack trace; anything unexpected is logged on the server and the agent gets a short line.

While a statement runs longer than ``progress_after_s`` the caller gets a progress notification
every ``progress_every_s`` (when it asked for them with a progress token), which keeps agent
clients with a 60 s tool timeout waiting. A client's ``notifications/cancelled`` cancels the
tool call's task: leaving the result stream stops the statement (``Executor.run_query``;
through a control plane, the ``Query`` call's cancel), and the session stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Annotated, Literal, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from .. import __version__
from ..errors import DuckcellError, ResultLimitError
from .backend import TableInfo
from .conversation import Conversation
from .export import Exports
from .results import Bounds, ResultBuilder, text_table
from .stream import IpcDecoder

log = logging.getLogger(__name__)
T = TypeVar("T")

INSTRUCTIONS = """\
duckcell runs your SQL (DuckDB dialect) in a hardened sandbox of your own for this
conversation: temp tables, views, macros and variables persist between calls and vanish when
the conversation ends. Catalog tables (list_tables) are read-only views; extensions, file access
and settings are locked. Results are cut to fit your context (see `truncated`): aggregate in
SQL, or export a large result to a file (export_result)."""


@dataclass(frozen=True, slots=True)
class ToolSettings:
    bounds: Bounds = field(default_factory=Bounds)
    exports: Exports = field(default_factory=lambda: Exports(None))
    progress_after_s: float = 3.0
    progress_every_s: float = 5.0


def build_server(
    conversation_for: Callable[[Context], Conversation],
    settings: ToolSettings,
    *,
    on_close: Callable[[], Awaitable[None]] | None = None,
    resources: bool = False,
) -> MCPServer:
    """The MCP server with duckcell's tools; the caller picks the transport. ``on_close`` runs
    when the server's lifespan ends (stdio closed, the in-memory client left): it ends the
    conversations' sessions. With ``resources`` an export is also an MCP resource
    (``duckcell://exports/NAME``) of the conversation that wrote it, for clients on another
    host than the server (the HTTP endpoint)."""
    tools = _Tools(conversation_for, settings, resources=resources)

    @contextlib.asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[dict[str, object]]:
        try:
            yield {}
        finally:
            if on_close is not None:
                await on_close()

    server = MCPServer(
        "duckcell", version=__version__, instructions=INSTRUCTIONS, lifespan=lifespan
    )
    _add_tools(server, tools)
    if resources:
        server.resource(
            EXPORT_URI,
            name="export",
            description="A file export_result wrote in this conversation (Parquet or CSV).",
        )(tools.read_export)
    return server


def _add_tools(server: MCPServer, tools: _Tools) -> None:
    server.add_tool(
        tools.run_sql,
        title="Run SQL",
        description=(
            "Run one SQL statement (DuckDB dialect) in this conversation's sandboxed session and "
            "return a bounded result: columns with DuckDB types, rows, total row count, and "
            "`truncated` with the reason when rows or characters were cut. State (temp tables, "
            "views, variables) persists between calls."
        ),
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False),
    )
    server.add_tool(
        tools.list_tables,
        title="List tables",
        description="List the catalog tables you may read (query them by name).",
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True),
    )
    server.add_tool(
        tools.describe_table,
        title="Describe a table",
        description=(
            "Columns and DuckDB types of a catalog table or one you created in this session, "
            "and its row count when counting is cheap (not for CSV files)."
        ),
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True),
    )
    server.add_tool(
        tools.export_result,
        title="Export a result",
        description=(
            "Run a statement and write its whole result (not cut for the context) to a Parquet "
            "or CSV file: a path in the operator's export directory, or, over HTTP, an MCP "
            "resource (duckcell://exports/NAME) of this conversation."
        ),
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False),
    )
    server.add_tool(
        tools.reset_session,
        title="Reset the session",
        description=(
            "End this conversation's session and destroy its sandbox with its temp tables and "
            "variables; the next statement starts a fresh one."
        ),
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True),
    )


EXPORT_URI = "duckcell://exports/{name}"
_MIME = {".parquet": "application/vnd.apache.parquet", ".csv": "text/csv"}


class _Tools:
    def __init__(
        self,
        conversation_for: Callable[[Context], Conversation],
        settings: ToolSettings,
        *,
        resources: bool = False,
    ) -> None:
        self._conversation_for = conversation_for
        self._settings = settings
        self._resources = resources

    async def read_export(self, name: str, ctx: Context) -> bytes:
        conversation = self._conversation_for(ctx)
        exports = conversation.exports or self._settings.exports
        try:
            path = exports.existing(name)
        except DuckcellError as error:
            raise ResourceError(str(error)) from None
        return await asyncio.to_thread(path.read_bytes)

    async def run_sql(
        self,
        sql: Annotated[str, Field(description="one SQL statement", max_length=1_000_000)],
        ctx: Context,
        max_rows: Annotated[
            int | None, Field(ge=1, le=10_000, description="return at most this many rows")
        ] = None,
    ) -> CallToolResult:
        bounds = self._settings.bounds
        if max_rows is not None:
            bounds = replace(bounds, max_rows=min(max_rows, bounds.max_rows * 10))
        conversation = self._conversation_for(ctx)
        builder = ResultBuilder(bounds)
        started = time.monotonic()

        async def read() -> str | None:
            return await _bounded(conversation.chunks(sql), builder, bounds)

        stopped = await self._guarded(ctx, read(), lambda: builder.total_rows)
        result = builder.result(time.monotonic() - started, stopped=stopped)
        result["session_id"] = conversation.session_id
        text = text_table(result, bounds.text_chars)
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=result
        )

    async def list_tables(self, ctx: Context) -> CallToolResult:
        conversation = self._conversation_for(ctx)
        tables = await self._guarded(ctx, conversation.backend.tables(), lambda: 0)
        listed = [{"name": t.name, "source": t.source} for t in tables]
        lines = [f"{t.name}  ({t.source})" if t.source else t.name for t in tables]
        text = "\n".join(lines) if lines else "no catalog tables (create your own with SQL)"
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content={"tables": listed, "where": conversation.backend.where},
        )

    async def describe_table(
        self,
        table: Annotated[str, Field(description="table name", min_length=1, max_length=255)],
        ctx: Context,
    ) -> CallToolResult:
        conversation = self._conversation_for(ctx)
        quoted = '"' + table.replace('"', '""') + '"'
        bounds = Bounds(max_rows=1)

        async def describe() -> tuple[ResultBuilder, int | None]:
            shape = ResultBuilder(bounds)
            await _bounded(conversation.chunks(f"SELECT * FROM {quoted} LIMIT 0"), shape, bounds)
            catalog = {t.name: t for t in await _tables_or_none(conversation)}
            if table in catalog and "csv" in catalog[table].source:
                return shape, None
            count = ResultBuilder(bounds)
            await _bounded(conversation.chunks(f"SELECT count(*) FROM {quoted}"), count, bounds)
            counted = count.rows[0][0] if count.rows else None
            # What the sandbox answered is not trusted to be the count it was asked for.
            return shape, counted if isinstance(counted, int) and counted >= 0 else None

        shape, rows = await self._guarded(ctx, describe(), lambda: 0)
        columns = shape.result(0.0)["columns"]
        lines = [f"{c['name']}  {c['type']}" for c in columns]
        lines.append(f"({rows} rows)" if rows is not None else "(rows not counted)")
        return CallToolResult(
            content=[TextContent(type="text", text="\n".join(lines))],
            structured_content={"table": table, "columns": columns, "row_count": rows},
        )

    async def export_result(
        self,
        sql: Annotated[
            str, Field(description="the statement whose result to write", max_length=1_000_000)
        ],
        file_name: Annotated[str, Field(description="a plain file name, no directories")],
        ctx: Context,
        format: Literal["parquet", "csv"] = "parquet",  # the tool's word
        overwrite: bool = False,
    ) -> CallToolResult:
        conversation = self._conversation_for(ctx)
        exports = conversation.exports or self._settings.exports
        try:
            path = exports.target(file_name, format, overwrite=overwrite)
        except DuckcellError as error:
            raise ToolError(str(error)) from None
        started = time.monotonic()
        done = await self._guarded(
            ctx, exports.write(conversation.chunks(sql), path, format), lambda: 0
        )
        summary = {
            "path": str(done.path),
            "format": format,
            "rows": done.rows,
            "bytes": done.bytes,
            "columns": done.columns,
            "elapsed_s": round(time.monotonic() - started, 3),
        }
        text = f"wrote {done.rows} row(s), {done.bytes} bytes, to {done.path}"
        if self._resources:
            summary["uri"] = EXPORT_URI.format(name=done.path.name)
            summary["mime_type"] = _MIME[done.path.suffix]
            del summary["path"]  # the server's own path means nothing to the caller
            text = f"wrote {done.rows} row(s), {done.bytes} bytes; read it as {summary['uri']}"
        return CallToolResult(
            content=[TextContent(type="text", text=text)], structured_content=summary
        )

    async def reset_session(self, ctx: Context) -> CallToolResult:
        conversation = self._conversation_for(ctx)
        ended = await self._guarded(ctx, conversation.reset(), lambda: 0)
        text = (
            f"session {ended} closed and its sandbox destroyed; the next statement opens a new one"
            if ended
            else "no session was open; the next statement opens one"
        )
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content={"closed_session": ended},
        )

    async def _guarded(self, ctx: Context, work: Awaitable[T], rows: Callable[[], int]) -> T:
        """Run ``work`` with progress reports while it lasts; duckcell's errors become tool
        errors with their one-line message, anything else a short line (logged here)."""
        ticker = asyncio.ensure_future(self._report_progress(ctx, rows))
        try:
            return await work
        except DuckcellError as error:
            raise ToolError(str(error)) from None
        except ToolError:
            raise
        except Exception:
            log.exception("MCP tool failed")
            raise ToolError(
                "duckcell's MCP server failed unexpectedly; its log has the details"
            ) from None
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    async def _report_progress(self, ctx: Context, rows: Callable[[], int]) -> None:
        settings = self._settings
        started = time.monotonic()
        await asyncio.sleep(settings.progress_after_s)
        while True:
            elapsed = time.monotonic() - started
            message = f"statement running for {elapsed:.0f} s; {rows()} row(s) read"
            with contextlib.suppress(Exception):  # a client that went away: nothing to tell
                await ctx.report_progress(elapsed, None, message)
            await asyncio.sleep(settings.progress_every_s)


async def _bounded(
    chunks: AsyncIterator[bytes], builder: ResultBuilder, bounds: Bounds
) -> str | None:
    """Read a statement's result into ``builder``; returns why reading stopped early (None:
    it read to the end). Leaving early stops the statement."""
    decoder = IpcDecoder()
    async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
        try:
            async for chunk in stream:
                for batch in decoder.feed(chunk):
                    if not builder.add(batch):
                        return f"counting stopped after more than {bounds.count_limit} rows"
        except ResultLimitError as error:
            if builder.schema is None:
                raise
            return str(error)
    decoder.finish()
    if builder.schema is None:
        builder.schema = decoder.schema
    return None


async def _tables_or_none(conversation: Conversation) -> list[TableInfo]:
    with contextlib.suppress(DuckcellError):
        return await conversation.backend.tables()
    return []
