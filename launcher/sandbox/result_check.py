"""The worker's check of a runner's result: no byte a runner sends is trusted before it passes.

A runner is DuckDB running SQL a tenant wrote. A query that exploits a bug in that large C++
engine owns the runner, and its "result" is then an attacker's bytes. Everything downstream
decodes them (the CLI, the control plane's Flight SQL edge, clients), and Arrow's IPC reader
trusts a batch's offsets and lengths until the batch is validated: a batch whose binary offsets
ran past its data printed 64 KB of the launcher's heap, a 1 GiB overrun crashed it (issue 16).

``ResultGuard`` stands between the runner client and everything else. It reads the stream's
framing itself, checking every length against the bytes it has and against fixed caps, and hands
each whole message to pyarrow, which verifies the message's flatbuffer and decodes it; every
record batch is then validated in full (offsets, lengths, buffer sizes, UTF-8, dictionary
indices: what Arrow's own fuzzing of its IPC reader checks). Only bytes so checked are passed
on, exactly as the runner sent them. The guard also counts rows and bytes itself and enforces
the policy's result limits, so a runner that ignores them, or lies in its summary, is caught.
It raises ``RunnerInvalidError`` for anything no honest runner sends, ``ResultLimitError`` past
a limit.

The format (Arrow's "IPC Streaming Format"): messages, each a 0xFFFFFFFF continuation marker
(absent in the legacy format), an int32 metadata length (0: end of stream), a ``Message``
flatbuffer whose ``bodyLength`` says how many body bytes follow it. The first message is the
schema, then dictionary batches and record batches, then the end-of-stream marker.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc

from ..errors import ResultLimitError, RunnerInvalidError
from .runner_client import QuerySummary

_MIB = 1024 * 1024
# A message's flatbuffer header: a batch's holds 16 bytes per column and per buffer, a schema's
# a few hundred per field, so 10,000 columns need about 1 MiB. The cap bounds what a bare length
# prefix can make the worker wait for and hold before pyarrow has seen a byte of it.
MAX_METADATA_BYTES = 16 * _MIB
# Bytes held unchecked: the message being received plus the dictionaries a batch waits for. The
# runner writes each batch with its dictionaries into one gRPC message, and the runner client
# accepts none over 64 MiB (``runner_client``), so an honest result never comes near this; a
# hostile one cannot make the worker buffer more.
MAX_UNCHECKED_BYTES = 64 * _MIB
END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"

_U8, _I16, _U16 = struct.Struct("<B"), struct.Struct("<h"), struct.Struct("<H")
_I32, _U32, _I64 = struct.Struct("<i"), struct.Struct("<I"), struct.Struct("<q")
# Field numbers in Arrow's Message.fbs and Schema.fbs (a union takes two: its type, its value).
_MESSAGE_HEADER_TYPE, _MESSAGE_HEADER, _MESSAGE_BODY_LENGTH = 1, 2, 3
_SCHEMA_ENDIANNESS = 0
_BATCH_COMPRESSION = 3
_DICTIONARY_ID, _DICTIONARY_DATA, _DICTIONARY_IS_DELTA = 0, 1, 2
_END, _SCHEMA, _DICTIONARY, _BATCH = 0, 1, 2, 3  # MessageHeader's union types; 0: end of stream
_KINDS = {_SCHEMA: "schema", _DICTIONARY: "dictionary", _BATCH: "record batch"}
# What pyarrow raises for bytes it cannot decode or validate (ArrowInvalid is a ValueError, the
# reader's "expected N bytes" an OSError).
_DECODE_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


def _invalid(detail: str) -> RunnerInvalidError:
    return RunnerInvalidError(
        f"runner sent an invalid result: {detail}; the sandbox was destroyed as possibly "
        "compromised and the worker logged it (tell the worker's operator)"
    )


class ResultGuard:
    """One query's result stream, checked as it arrives. ``feed`` every IPC slice the runner
    sends, in order, then ``finish`` with the runner's summary; a guard is used once."""

    def __init__(self, max_rows: int | None, max_bytes: int | None) -> None:
        self.rows = 0  # in record batches that passed
        self.ipc_bytes = 0  # every byte received, checked or not yet
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._pending = bytearray()  # received, not yet passed on: held dictionaries, a partial
        self._parsed = 0  # where in _pending the next message starts (before it: held ones)
        self._wanted = 0  # _pending is not looked at again until it is this long
        self._schema: pa.Schema | None = None
        self._schema_message = b""
        self._dictionaries: dict[int, bytes] = {}  # the last dictionary batch of each id
        self._held: set[int] = set()  # ids whose dictionary waits for the next record batch
        self._ended = False
        self._claimed: QuerySummary | None = None

    def feed(self, data: bytes) -> bytes:
        """The checked part of the stream so far: every whole message ``data`` completes, as
        sent (``data`` itself when it holds whole messages, as the runner sends them).

        The rest waits for the next call: a message not yet whole, and a dictionary batch,
        which only the validation of the record batch that uses it checks.
        """
        if not data:
            return b""
        if self._ended:
            raise _invalid("bytes after the end-of-stream marker")
        self._count_bytes(len(data))
        if self._pending:
            self._pending += data
            if len(self._pending) < self._wanted:
                return b""
            released = self._scan(self._pending)
            checked = bytes(self._pending[:released])
            del self._pending[:released]
            return checked
        released = self._scan(data)
        if released < len(data):
            self._pending = bytearray(data[released:])
            return data[:released]
        return data

    def finish(self, summary: QuerySummary) -> QuerySummary:
        """The summary as the worker counted it; the runner's ``summary`` must agree."""
        self._claimed = summary
        if not self._ended:
            where = " (it stopped inside a message)" if self._pending else ""
            raise _invalid(f"the stream has no end-of-stream marker{where}")
        if (summary.rows, summary.ipc_bytes) != (self.rows, self.ipc_bytes):
            raise _invalid(
                f"its summary claims {summary.rows} rows in {summary.ipc_bytes} bytes, but it "
                f"sent {self.rows} rows in {self.ipc_bytes} bytes"
            )
        return self.counted()

    def counted(self) -> QuerySummary:
        """What the worker counted so far, with the runner's timing and statement type when its
        summary came (the audit records this, also for a result refused midway)."""
        claimed = self._claimed
        return QuerySummary(
            rows=self.rows,
            ipc_bytes=self.ipc_bytes,
            execute_seconds=claimed.execute_seconds if claimed else 0.0,
            statement_type=claimed.statement_type if claimed else "",
        )

    def _count_bytes(self, size: int) -> None:
        self.ipc_bytes += size
        if self._max_bytes and self.ipc_bytes > self._max_bytes:
            raise ResultLimitError(
                f"result is larger than {self._max_bytes} bytes (policy max_result_bytes)"
            )

    def _scan(self, buffer: bytes | bytearray) -> int:
        """Check the whole messages in ``buffer`` from ``_parsed``; how many bytes of it may be
        passed on (up to the last message not held)."""
        at, released = self._parsed, 0
        while not self._ended:
            frame = _frame(buffer, at)
            if isinstance(frame, int):  # bytes still missing from the message's header
                self._wanted = len(buffer) + frame
                break
            if frame.end - released > MAX_UNCHECKED_BYTES:
                raise _invalid(
                    f"{frame.end - released} bytes would wait unchecked (at most "
                    f"{MAX_UNCHECKED_BYTES}): a message or its dictionaries are too large"
                )
            if frame.end > len(buffer):
                self._wanted = frame.end
                break
            # Out of _pending, a copy: pyarrow may keep the message, and _pending must stay
            # resizable. Bytes are immutable: a view of them is enough.
            if isinstance(buffer, bytearray):
                message = memoryview(bytes(buffer[at : frame.end]))
            else:
                message = memoryview(buffer)[at : frame.end]
            if self._accept(frame, message):
                released = frame.end
            at = frame.end
        if self._ended and at < len(buffer):
            raise _invalid("bytes after the end-of-stream marker")
        self._parsed = at - released
        self._wanted -= released
        return released

    def _accept(self, frame: _Frame, message: memoryview) -> bool:
        """Check one whole message; whether it may be passed on now (a dictionary waits)."""
        if frame.kind == _END:
            if self._schema is None:
                raise _invalid("the stream ended before its schema")
            if self._held:
                raise _invalid("a dictionary batch was not followed by a record batch")
            self._ended = True
            return True
        if self._schema is None:
            if frame.kind != _SCHEMA:
                raise _invalid(f"its first message is a {_KINDS[frame.kind]}, not the schema")
            self._accept_schema(frame, message)
            return True
        if frame.kind == _SCHEMA:
            raise _invalid("a second schema")
        if frame.kind == _DICTIONARY:
            self._hold_dictionary(frame, message)
            return False
        self._accept_batch(frame, message)
        return True

    def _accept_schema(self, frame: _Frame, message: memoryview) -> None:
        # Arrow byte-swaps a big-endian stream's buffers before they are validated; the runner
        # writes the host's order (little-endian), so nothing honest needs that path.
        if frame.header.scalar(_SCHEMA_ENDIANNESS, _I16) != 0:
            raise _invalid("a big-endian schema")
        with _decoding("schema"):
            self._schema = pa.ipc.read_schema(_message(message, _SCHEMA))
        self._schema_message = bytes(message)

    def _hold_dictionary(self, frame: _Frame, message: memoryview) -> None:
        header = frame.header
        # A delta is concatenated to the dictionary before anything validates either; the
        # runner's writer never sends one (pyarrow emits deltas only when asked to).
        if header.scalar(_DICTIONARY_IS_DELTA, _U8):
            raise _invalid("a delta dictionary batch")
        _uncompressed(header.table(_DICTIONARY_DATA))
        key = header.scalar(_DICTIONARY_ID, _I64)
        if key in self._held:
            raise _invalid(f"two dictionaries for id {key} before a record batch used one")
        with _decoding("dictionary batch"):
            _message(message, _DICTIONARY)
        self._dictionaries[key] = bytes(message)
        self._held.add(key)

    def _accept_batch(self, frame: _Frame, message: memoryview) -> None:
        _uncompressed(frame.header)
        with _decoding("record batch"):
            if self._dictionaries:
                batch = self._read_with_dictionaries(message)
            else:
                assert self._schema is not None
                batch = pa.ipc.read_record_batch(_message(message, _BATCH), self._schema)
            batch.validate(full=True)
        self._held.clear()
        self.rows += batch.num_rows
        if self._max_rows and self.rows > self._max_rows:
            raise ResultLimitError(
                f"result has more than {self._max_rows} rows (policy max_result_rows)"
            )

    def _read_with_dictionaries(self, message: memoryview) -> pa.RecordBatch:
        """Decode a batch with the dictionaries it refers to, as a stream of its own: pyarrow
        takes dictionaries only from a stream. Its validation checks them too."""
        parts = [self._schema_message, *self._dictionaries.values(), message, END_OF_STREAM]
        reader = pa.ipc.open_stream(pa.py_buffer(b"".join(parts)))
        batch = reader.read_next_batch()
        try:
            reader.read_next_batch()
        except StopIteration:
            return batch
        raise _invalid("a record batch that decodes as more than one")


@dataclass(frozen=True, slots=True)
class _Frame:
    """Where one message lies in the buffer, and what its flatbuffer header says it is."""

    end: int  # may lie past the bytes received so far
    kind: int  # _SCHEMA, _DICTIONARY, _BATCH; _END for the end-of-stream marker
    header: _Table  # the Schema, DictionaryBatch or RecordBatch table (_NO_FIELDS at the end)


def _frame(buffer: bytes | bytearray, at: int) -> _Frame | int:
    """The message at ``at``, or how many more bytes its prefix and header need."""
    available = len(buffer) - at
    if available < 4:
        return 4 - available
    prefix, length = 4, _I32.unpack_from(buffer, at)[0]
    if length == -1:  # the continuation marker; the length follows
        if available < 8:
            return 8 - available
        prefix, length = 8, _I32.unpack_from(buffer, at + 4)[0]
    if length == 0:
        return _Frame(at + prefix, _END, _NO_FIELDS)
    if not 0 < length <= MAX_METADATA_BYTES:
        raise _invalid(f"a message header of {length} bytes (at most {MAX_METADATA_BYTES})")
    if available < prefix + length:
        return prefix + length - available
    message = _Table.root(bytes(buffer[at + prefix : at + prefix + length]))
    kind = message.scalar(_MESSAGE_HEADER_TYPE, _U8)
    body = message.scalar(_MESSAGE_BODY_LENGTH, _I64)
    header = message.table(_MESSAGE_HEADER)
    if kind not in _KINDS or header is None:
        raise _invalid(f"a message of type {kind} (not a schema, dictionary or record batch)")
    if body < 0 or (kind == _SCHEMA and body != 0):
        raise _invalid(f"a {_KINDS[kind]} with a body of {body} bytes")
    return _Frame(at + prefix + length + body, kind, header)


def _message(data: memoryview, kind: int) -> pa.ipc.Message:
    """pyarrow's reading of one whole message (it verifies the flatbuffer), of the kind the
    guard's own reading found."""
    message = pa.ipc.read_message(pa.py_buffer(data))
    if message.type != _KINDS[kind]:
        raise _invalid(f"a message that is a {_KINDS[kind]} or a {message.type}")
    return message


def _uncompressed(batch: _Table | None) -> None:
    # A compressed buffer declares its own decompressed size, which Arrow allocates before
    # anything checks it; the runner never compresses.
    if batch is None:
        raise _invalid("a batch message without its batch")
    if batch.table(_BATCH_COMPRESSION) is not None:
        raise _invalid("a compressed batch")


@contextmanager
def _decoding(what: str) -> Iterator[None]:
    """pyarrow's refusal of a message, as the runner's invalid result."""
    try:
        yield
    except _DECODE_ERRORS as error:
        raise _invalid(f"a {what} that does not decode ({error})") from None


class _Table:
    """One table of a flatbuffer, every read checked against the buffer's end.

    Only the few fields the guard needs before pyarrow (which verifies the whole flatbuffer)
    reads the message: a bad offset here is an invalid result, never a read out of range.
    """

    __slots__ = ("_at", "_data", "_vtable", "_vtable_size")

    def __init__(self, data: bytes, at: int, *, empty: bool = False) -> None:
        self._data, self._at, self._vtable, self._vtable_size = data, at, 0, 0
        if empty:
            return
        _within(data, at, 4)
        self._vtable = at - _I32.unpack_from(data, at)[0]
        _within(data, self._vtable, 4)
        self._vtable_size = _U16.unpack_from(data, self._vtable)[0]
        _within(data, self._vtable, self._vtable_size)

    @classmethod
    def root(cls, data: bytes) -> _Table:
        _within(data, 0, 4)
        return cls(data, _U32.unpack_from(data, 0)[0])

    def scalar(self, field: int, kind: struct.Struct) -> int:
        at = self._field(field, kind.size)
        return 0 if at is None else kind.unpack_from(self._data, at)[0]

    def table(self, field: int) -> _Table | None:
        at = self._field(field, 4)
        return None if at is None else _Table(self._data, at + _U32.unpack_from(self._data, at)[0])

    def _field(self, field: int, size: int) -> int | None:
        slot = 4 + 2 * field
        if slot + 2 > self._vtable_size:
            return None  # a field the writer left out: its default
        offset = _U16.unpack_from(self._data, self._vtable + slot)[0]
        if offset == 0:
            return None
        _within(self._data, self._at + offset, size)
        return self._at + offset


def _within(data: bytes, at: int, size: int) -> None:
    if at < 0 or size < 0 or at + size > len(data):
        raise _invalid("a message header that points outside itself")


_NO_FIELDS = _Table(b"", 0, empty=True)  # every field at its default
