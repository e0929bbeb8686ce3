"""Decode an Arrow IPC stream that arrives in pieces, batch by batch, without holding it whole.

The bytes come from the executor or the control plane, which checked every message before it
left the worker (``launcher.sandbox.result_check``), so this only frames and decodes them.
A message is taken once all of it has arrived (pyarrow's ``read_message`` says when a prefix
is short); a record batch is decoded as a small stream of its own (the schema, the
dictionaries seen so far, the batch), so dictionary-encoded columns decode too.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc

from ..errors import RemoteQueryError

_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"
_LEGACY_END = b"\x00\x00\x00\x00"


class IpcDecoder:
    """``feed`` pieces in order; it returns the record batches they completed."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._schema_bytes: bytes | None = None
        self._dictionaries: list[bytes] = []
        self.schema: pa.Schema | None = None
        self.ended = False

    def feed(self, piece: bytes) -> list[pa.RecordBatch]:
        # One immutable copy per piece: the decoded batches may keep pointing into it.
        data = pa.py_buffer(bytes(self._buffer) + piece if self._buffer else piece)
        batches: list[pa.RecordBatch] = []
        at = 0
        while not self.ended:
            taken = self._next_message(data, at, batches)
            if taken == 0:
                break
            at += taken
        self._buffer = bytearray(data[at:].to_pybytes()) if at < data.size else bytearray()
        return batches

    def finish(self) -> None:
        """The stream is over: raises ``RemoteQueryError`` if it stopped inside a message."""
        if not self.ended and (self._buffer or self.schema is None):
            raise RemoteQueryError("the result stream ended inside a message: run it again")

    def _next_message(self, data: pa.Buffer, at: int, batches: list[pa.RecordBatch]) -> int:
        left = data.size - at
        head = data[at : at + 8].to_pybytes()
        if left < 8:
            if head == _LEGACY_END:
                self.ended = True
            return 0
        if head == _END:
            self.ended = True
            return 8
        reader = pa.BufferReader(data[at:])
        try:
            message = pa.ipc.read_message(reader)
        except (pa.ArrowInvalid, OSError, EOFError):
            return 0  # not all of it has arrived yet
        size = reader.tell()
        if message.type == "schema":
            self._schema_bytes = data[at : at + size].to_pybytes()
            self.schema = pa.ipc.read_schema(message)
        elif message.type == "dictionary":
            self._dictionaries.append(data[at : at + size].to_pybytes())
        elif message.type == "record batch" and self._schema_bytes is not None:
            raw = data[at : at + size].to_pybytes()
            stream = b"".join([self._schema_bytes, *self._dictionaries, raw, _END])
            batches.extend(pa.ipc.open_stream(stream))
        return size
