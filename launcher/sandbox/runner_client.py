"""The launcher's side of the runner protocol (grpc.aio over the sandbox's unix socket).

Protobuf types stop here: callers get bytes of Arrow IPC, an OutputChunk (a slice of the file a
writing query wrote), a QuerySummary, or a QueryError.

Strings a runner sends are untrusted too: a failure's message is cut to ``MAX_MESSAGE_CHARS``
and loses its control characters (it becomes the query's error, crosses the control plane's
tunnel and lands in both audits), and a summary's statement type must look like one of
DuckDB's (``StatementType`` names).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import pyarrow as pa
import pyarrow.ipc

from ..errors import (
    MemoryLimitError,
    QueryCancelledError,
    QueryError,
    QueryTimeoutError,
    ResultLimitError,
    SandboxLostError,
    SandboxStartError,
    SqlError,
    runner_invalid,
)
from ..model.catalog import Binding
from ..protocol import runner_pb2 as pb
from ..protocol import runner_pb2_grpc as pb_grpc

_MAX_MESSAGE = 64 * 1024 * 1024
# Rows per record batch the launcher asks for (ExecuteRequest.batch_rows; the runner's own
# default, ``RunnerConfig.batch_rows``, is the same): the result check holds the runner to it.
BATCH_ROWS = 65_536
# A failure message longer than this is cut. DuckDB's own can be long (a parser error quotes the
# statement's line), so a long one is truncated, never taken for a lie.
MAX_MESSAGE_CHARS = 4096
TRUNCATED = "… (truncated)"
# Control characters (C0, DEL, C1) but newline and tab: a terminal or log reader acts on them.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# DuckDB's StatementType names (the runner sends ``str(statement.type)``'s last part).
_STATEMENT_TYPE = re.compile("[A-Z][A-Z_]{0,31}")

_FAILURES: dict[int, type[QueryError]] = {
    pb.FAILURE_REASON_SQL: SqlError,
    pb.FAILURE_REASON_DENIED: SqlError,
    pb.FAILURE_REASON_TIMEOUT: QueryTimeoutError,
    pb.FAILURE_REASON_MEMORY: MemoryLimitError,
    pb.FAILURE_REASON_RESULT_LIMIT: ResultLimitError,
    pb.FAILURE_REASON_CANCELLED: QueryCancelledError,
}


@dataclass(frozen=True, slots=True)
class QuerySummary:
    rows: int
    ipc_bytes: int
    execute_seconds: float
    statement_type: str


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """A slice of the output file of a writing query, in order (see ``launcher.data.writes``)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class RunnerInfo:
    runner_version: str
    duckdb_version: str
    startup_seconds: float


def runner_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A string from the runner made safe to show and log: at most ``limit`` characters (then
    marked truncated), without control characters but newline and tab. Cut first: the work
    stays bounded whatever the runner sent."""
    cut = len(text) > limit
    text = _CONTROL.sub("", text[:limit])
    return text + TRUNCATED if cut else text


class StreamBroken(Exception):
    """The gRPC stream to the runner broke; the caller looks at the container to say why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# HTTP/2 flow control of the result stream; the runner's server sets the same (see
# ``duckcell_runner.__main__.FLOW_CONTROL`` for why).
FLOW_CONTROL = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024))


class RunnerClient:
    """One channel to one sandbox's runner."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE),
                ("grpc.max_send_message_length", _MAX_MESSAGE),
                *FLOW_CONTROL,
                # The first dial usually comes before the runner's socket exists; gRPC's
                # default 1 s reconnect backoff then added ~0.9 s to every sandbox start.
                ("grpc.initial_reconnect_backoff_ms", 10),
                ("grpc.min_reconnect_backoff_ms", 10),
                ("grpc.max_reconnect_backoff_ms", 50),
            ],
        )
        self._stub = pb_grpc.RunnerStub(self._channel)

    async def wait_ready(self, timeout_s: float) -> RunnerInfo:
        """Connect and exchange one real RPC, decoding the warm-up IPC on our side too."""
        deadline = time.monotonic() + timeout_s
        try:
            reply = await self._stub.Ready(
                pb.ReadyRequest(), timeout=timeout_s, wait_for_ready=True
            )
        except grpc.aio.AioRpcError as error:
            waited = timeout_s - max(0.0, deadline - time.monotonic())
            raise SandboxStartError(
                f"runner did not become ready in {waited:.1f} s ({error.code().name}: "
                f"{error.details()})"
            ) from None
        pa.ipc.open_stream(reply.warmup_ipc).read_all()
        return RunnerInfo(reply.runner_version, reply.duckdb_version, reply.startup_seconds)

    async def execute(
        self,
        *,
        query_id: str,
        sql: str,
        timeout_s: float,
        max_rows: int | None,
        max_bytes: int | None,
        tables: Sequence[Binding] = (),
        output_path: str = "",
        parameters: bytes = b"",
        batch_rows: int = BATCH_ROWS,
    ) -> AsyncIterator[bytes | OutputChunk | QuerySummary]:
        """Yield IPC slices, then (with ``output_path``) OutputChunks, then one QuerySummary.
        Raises QueryError or StreamBroken.

        ``tables`` become temp views in the sandbox; a per-query sandbox's first query also
        limits its file access to their files for the rest of its life (a session sandbox is
        locked to its directory instead, see ``launcher.sandbox.files``). ``output_path`` is
        the /scratch file the SQL writes; the runner sends it back once the query succeeded.
        ``parameters`` (an Arrow IPC stream of one row) are bound to the SQL's placeholders.
        ``batch_rows`` is sent explicitly, so the result check knows the runner's batch size.
        A failure's message is bounded (``runner_text``); a summary whose statement type is not
        a DuckDB statement type name raises RunnerInvalidError.
        """
        request = pb.ExecuteRequest(
            query_id=query_id,
            sql=sql,
            timeout_seconds=timeout_s,
            max_rows=max_rows or 0,
            max_bytes=max_bytes or 0,
            tables=[
                pb.TableBinding(name=t.name, format=t.format, paths=list(t.paths)) for t in tables
            ],
            output_path=output_path,
            parameters=parameters,
            batch_rows=batch_rows,
        )
        call = self._stub.Execute(request)
        try:
            async for chunk in call:
                kind = chunk.WhichOneof("kind")
                if kind == "ipc":
                    yield chunk.ipc
                elif kind == "output":
                    yield OutputChunk(chunk.output)
                elif kind == "summary":
                    s = chunk.summary
                    statement = s.statement_type
                    if statement and not _STATEMENT_TYPE.fullmatch(statement):
                        raise runner_invalid(f"a statement type of {runner_text(statement, 40)!r}")
                    yield QuerySummary(s.rows, s.ipc_bytes, s.execute_seconds, statement)
                    return
                elif kind == "failure":
                    error_type = _FAILURES.get(chunk.failure.reason, SandboxLostError)
                    raise error_type(runner_text(chunk.failure.message))
        except grpc.aio.AioRpcError as error:
            raise StreamBroken(f"{error.code().name}: {error.details()}") from None
        except grpc.aio.UsageError as error:
            raise StreamBroken(f"channel closed: {error}") from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is being cancelled: let it through
            # Closing the channel (sandbox destroyed under us) cancels its calls.
            raise StreamBroken("the sandbox's channel was closed during the query") from None
        finally:
            call.cancel()
        raise StreamBroken("runner closed the stream without a summary")

    async def cancel(self, query_id: str) -> bool:
        try:
            reply = await self._stub.Cancel(pb.CancelRequest(query_id=query_id), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.interrupted)

    async def close(self) -> None:
        await self._channel.close(grace=None)
