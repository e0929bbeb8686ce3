"""A runner that speaks the protocol but lies: what a DuckDB exploit could make of the runner.

It is built into a test image on top of the real sandbox image (``hostile_image`` in
``tests/integration/test_hostile_runner.py``) and started by the launcher like any runner. Its
``Ready`` is honest, so the pool takes it; ``Execute`` answers the SQL text with one attack:

- ``offsets``: a string batch whose offsets run 64 KiB past its data (read unchecked, the
  decoder prints the reader's heap);
- ``limits``: 7,000 rows under any row/byte limit, and a summary claiming 1 row;
- ``lie``: 5 rows within every limit, and a summary claiming 1 row;
- ``trailing``: a valid stream, then bytes after its end-of-stream marker;
- ``truncated``: a record batch cut short, then a summary;
- anything else: one honest row, ``x = 1``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pyarrow as pa
import pyarrow.ipc as ipc

from launcher.protocol import runner_pb2 as pb
from launcher.protocol import runner_pb2_grpc as pb_grpc

SOCKET = "/run/duckcell/runner.sock"


def _messages(batch: pa.RecordBatch) -> list[bytes]:
    """The IPC stream of one batch, one message per item: schema, batch, end of stream."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema) as writer:
        schema_end = sink.tell()
        writer.write_batch(batch)
        batch_end = sink.tell()
    data = sink.getvalue().to_pybytes()
    return [data[:schema_end], data[schema_end:batch_end], data[batch_end:]]


def _bad_offsets() -> list[bytes]:
    batch = pa.record_batch([pa.array(["abc", "def"])], names=["s"])
    schema, body, end = _messages(batch)
    good = (0).to_bytes(4, "little") + (3).to_bytes(4, "little") + (6).to_bytes(4, "little")
    bad = (0).to_bytes(4, "little") + (3).to_bytes(4, "little") + (65536).to_bytes(4, "little")
    assert good in body
    return [schema, body.replace(good, bad, 1), end]


def _rows(n: int) -> list[bytes]:
    return _messages(pa.record_batch([pa.array(range(n), pa.int64())], names=["x"]))


def _summary(rows: int, sent: int) -> pb.ExecuteChunk:
    return pb.ExecuteChunk(
        summary=pb.Summary(
            rows=rows, ipc_bytes=sent, execute_seconds=0.001, statement_type="SELECT"
        )
    )


class HostileRunner(pb_grpc.RunnerServicer):
    def Ready(self, request: pb.ReadyRequest, context: grpc.ServicerContext) -> pb.ReadyReply:
        return pb.ReadyReply(
            runner_version="hostile", duckdb_version="none", warmup_ipc=b"".join(_rows(1))
        )

    def Cancel(self, request: pb.CancelRequest, context: grpc.ServicerContext) -> pb.CancelReply:
        return pb.CancelReply(interrupted=False)

    def Execute(
        self, request: pb.ExecuteRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ExecuteChunk]:
        attack = request.sql.strip()
        rows = 1
        if attack == "offsets":
            messages = _bad_offsets()
        elif attack == "limits":
            messages, rows = _rows(7000), 1
        elif attack == "lie":
            messages, rows = _rows(5), 1
        elif attack == "trailing":
            messages = [*_rows(1), b"\x00" * 64]
        elif attack == "truncated":
            schema, body, _ = _rows(100)
            messages = [schema, body[: len(body) // 2]]
        else:
            messages = _rows(1)
        for message in messages:
            yield pb.ExecuteChunk(ipc=message)
        yield _summary(rows, sum(len(message) for message in messages))


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_RunnerServicer_to_server(HostileRunner(), server)
    old_umask = os.umask(0)
    try:
        server.add_insecure_port(f"unix://{SOCKET}")
        server.start()
    finally:
        os.umask(old_umask)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.wait_for_termination()


if __name__ == "__main__":
    main()
