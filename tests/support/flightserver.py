"""The Flight SQL server alone, for the unit tests that drive it with pyarrow's Flight client:
the API keys its ``verify`` knows, a small table and its IPC messages as a runner cuts them,
call options with a bearer key, a statement descriptor, and ``on`` (run a coroutine on the
server's loop, in its thread, from the test's)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc as ipc

from launcher.controlplane.apikeys import ApiKey
from launcher.errors import ApiKeyError
from launcher.flight import messages as msg
from launcher.protocol import flightsql_pb2 as pb

KEY = "dck1.good"
OTHER_KEY = "dck1.other"
DEADLINE_S = 5.0
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
TABLE = pa.table({"n": pa.array([1, 2, 3], pa.int64()), "s": ["a", "b", None]})


def ipc_messages(table: pa.Table) -> list[bytes]:
    """The IPC stream of ``table`` cut as the runner cuts it: schema, each batch, end marker."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1)
    messages = ipc.MessageReader.open_stream(pa.BufferReader(sink.getvalue()))
    return [message.serialize().to_pybytes() for message in messages] + [END_OF_STREAM]


async def verify(key: str) -> ApiKey:
    if key in (KEY, OTHER_KEY):
        return ApiKey(key_id=key, role="analyst")
    raise ApiKeyError("unknown API key: create one with `duckcell controlplane apikey create`")


def on(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(DEADLINE_S)


def bearer(key: str) -> flight.FlightCallOptions:
    headers = [(b"authorization", f"Bearer {key}".encode())]
    return flight.FlightCallOptions(headers=headers, timeout=DEADLINE_S)


def statement(sql: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(msg.pack(pb.CommandStatementQuery(query=sql)))
