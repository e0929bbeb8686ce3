"""Arrow's IPC stream format, read without trusting the writer.

The pieces ``result_check`` builds its guard from: the framing of one message (continuation
marker, metadata length, the ``Message`` flatbuffer and its body length), a flatbuffer table
whose every read is checked against the buffer's end, the few field numbers of Arrow's
``Message.fbs`` and ``Schema.fbs`` the guard reads before pyarrow does, a file-like queue of
message parts pyarrow reads from without copies, and two messages written by hand (a dictionary
batch seen as the record batch it holds; a dictionary batch of nulls). Any bad offset or length
raises the runner's invalid result (``runner_invalid``), never a read out of range.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc

from ..errors import runner_invalid

END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"
CONTINUATION = b"\xff\xff\xff\xff"

U8, I16, U16 = struct.Struct("<B"), struct.Struct("<h"), struct.Struct("<H")
I32, U32, I64 = struct.Struct("<i"), struct.Struct("<I"), struct.Struct("<q")
# Field numbers in Arrow's Message.fbs and Schema.fbs (a union takes two: its type, its value).
MESSAGE_HEADER_TYPE, MESSAGE_HEADER, MESSAGE_BODY_LENGTH = 1, 2, 3
SCHEMA_ENDIANNESS, SCHEMA_FIELDS = 0, 1
FIELD_TYPE_TYPE, FIELD_DICTIONARY, FIELD_CHILDREN = 2, 4, 5
ENCODING_ID = 0
BATCH_LENGTH, BATCH_COMPRESSION = 0, 3
DICTIONARY_ID, DICTIONARY_DATA, DICTIONARY_IS_DELTA = 0, 1, 2
END, SCHEMA, DICTIONARY, BATCH = 0, 1, 2, 3  # MessageHeader's union types; 0: end of stream
NULL_TYPE = 1  # Type's union type for Null
KINDS = {SCHEMA: "schema", DICTIONARY: "dictionary", BATCH: "record batch"}
# What pyarrow raises for bytes it cannot decode or validate (ArrowInvalid is a ValueError, the
# reader's "expected N bytes" an OSError).
DECODE_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)


class Parts:
    """A file pyarrow reads IPC messages from: the parts queued, handed out without copies
    (pyarrow asks for a message's prefix, metadata and body, which the parts line up with)."""

    closed = False

    def __init__(self) -> None:
        self._parts: deque[memoryview] = deque()
        self._position = 0

    def __len__(self) -> int:
        return len(self._parts)

    def append(self, part: bytes | memoryview) -> None:
        if len(part):
            self._parts.append(memoryview(part))

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes | memoryview:
        taken: list[memoryview] = []
        while self._parts and (size < 0 or size > 0):
            head = self._parts[0]
            if 0 <= size < len(head):
                taken.append(head[:size])
                self._parts[0] = head[size:]
                size = 0
            else:
                taken.append(self._parts.popleft())
                size -= len(head)
        self._position += sum(map(len, taken))
        return taken[0] if len(taken) == 1 else b"".join(taken)


def as_record_batch(frame: Frame, data: FlatTable) -> bytes:
    """A dictionary batch's prefix and metadata, its header made the record batch it holds."""
    root = frame.message
    kind_at = root.position(MESSAGE_HEADER_TYPE, 1)
    header_at = root.position(MESSAGE_HEADER, 4)
    assert kind_at is not None and header_at is not None  # the frame found both
    metadata = bytearray(root.data)
    metadata[kind_at] = BATCH
    if data.at <= header_at:  # a flatbuffer's offsets point forward
        raise runner_invalid("a dictionary batch whose header points backwards")
    U32.pack_into(metadata, header_at, data.at - header_at)
    return CONTINUATION + I32.pack(len(metadata)) + bytes(metadata)


def null_dictionary(key: int, length: int) -> bytes:
    """The IPC message of a dictionary batch for ``key``: ``length`` nulls (no body).

    Written by hand (pyarrow's writer numbers dictionaries itself): a Message table (version V5,
    header DictionaryBatch, body length 0), its DictionaryBatch (id, data) and RecordBatch
    (length, one FieldNode of ``length`` nulls, no buffers), each field aligned to its size.
    """
    fb = bytearray(136)
    U32.pack_into(fb, 0, 16)  # the root: the Message table at 16
    struct.pack_into("<6H", fb, 4, 12, 24, 4, 6, 8, 16)  # its vtable: 4 fields, table of 24
    I32.pack_into(fb, 16, 16 - 4)
    I16.pack_into(fb, 20, 4)  # version: V5
    fb[22] = DICTIONARY
    U32.pack_into(fb, 24, 48 - 24)  # header: the DictionaryBatch at 48
    I64.pack_into(fb, 32, 0)  # bodyLength
    struct.pack_into("<4H", fb, 40, 8, 16, 8, 4)  # vtable: id at 8, data at 4
    I32.pack_into(fb, 48, 48 - 40)
    U32.pack_into(fb, 52, 80 - 52)  # data: the RecordBatch at 80
    I64.pack_into(fb, 56, key)
    struct.pack_into("<5H", fb, 64, 10, 24, 8, 4, 16)  # vtable: length, nodes, buffers
    I32.pack_into(fb, 80, 80 - 64)
    U32.pack_into(fb, 84, 108 - 84)  # nodes: the vector at 108
    I64.pack_into(fb, 88, length)
    U32.pack_into(fb, 96, 128 - 96)  # buffers: the (empty) vector at 128
    struct.pack_into("<Iqq", fb, 108, 1, length, length)  # one FieldNode: length, null count
    return CONTINUATION + I32.pack(len(fb)) + bytes(fb)


@dataclass(frozen=True, slots=True)
class Frame:
    """Where one message lies in the buffer, and what its flatbuffer header says it is."""

    end: int  # may lie past the bytes received so far
    kind: int  # SCHEMA, DICTIONARY, BATCH; END for the end-of-stream marker
    header: FlatTable  # the Schema, DictionaryBatch or RecordBatch table (NO_FIELDS at the end)
    message: FlatTable  # the Message table (its data: the whole flatbuffer)
    body_at: int  # where the body starts, from the message's start
    metadata: int  # the flatbuffer's size


def read_frame(buffer: bytes | bytearray, at: int, max_metadata: int) -> Frame | int:
    """The message at ``at``, or how many more bytes its prefix and header need. A header of
    more than ``max_metadata`` bytes is refused before any of it is awaited."""
    available = len(buffer) - at
    if available < 4:
        return 4 - available
    prefix, length = 4, I32.unpack_from(buffer, at)[0]
    if length == -1:  # the continuation marker; the length follows
        if available < 8:
            return 8 - available
        prefix, length = 8, I32.unpack_from(buffer, at + 4)[0]
    if length == 0:
        return Frame(at + prefix, END, NO_FIELDS, NO_FIELDS, prefix, 0)
    if not 0 < length <= max_metadata:
        raise runner_invalid(f"a message header of {length} bytes (at most {max_metadata})")
    if available < prefix + length:
        return prefix + length - available
    message = FlatTable.root(bytes(buffer[at + prefix : at + prefix + length]))
    kind = message.scalar(MESSAGE_HEADER_TYPE, U8)
    body = message.scalar(MESSAGE_BODY_LENGTH, I64)
    header = message.table(MESSAGE_HEADER)
    if kind not in KINDS or header is None:
        raise runner_invalid(f"a message of type {kind} (not a schema, dictionary or record batch)")
    if body < 0 or (kind == SCHEMA and body != 0):
        raise runner_invalid(f"a {KINDS[kind]} with a body of {body} bytes")
    return Frame(at + prefix + length + body, kind, header, message, prefix + length, length)


def read_message(data: memoryview, kind: int) -> pa.ipc.Message:
    """pyarrow's reading of one whole message (it verifies the flatbuffer), of the kind the
    guard's own reading found."""
    message = pa.ipc.read_message(pa.py_buffer(data))
    if message.type != KINDS[kind]:
        raise runner_invalid(f"a message that is a {KINDS[kind]} or a {message.type}")
    return message


def check_uncompressed(batch: FlatTable | None) -> None:
    # A compressed buffer declares its own decompressed size, which Arrow allocates before
    # anything checks it; the runner never compresses.
    if batch is None:
        raise runner_invalid("a batch message without its batch")
    if batch.table(BATCH_COMPRESSION) is not None:
        raise runner_invalid("a compressed batch")


@contextmanager
def decoding(what: str) -> Iterator[None]:
    """pyarrow's refusal of a message, as the runner's invalid result."""
    try:
        yield
    except DECODE_ERRORS as error:
        raise runner_invalid(f"a {what} that does not decode ({error})") from None


class FlatTable:
    """One table of a flatbuffer, every read checked against the buffer's end.

    Only the few fields the guard needs before pyarrow (which verifies the whole flatbuffer)
    reads the message: a bad offset here is an invalid result, never a read out of range.
    """

    __slots__ = ("_vtable", "_vtable_size", "at", "data")

    def __init__(self, data: bytes, at: int, *, empty: bool = False) -> None:
        self.data, self.at, self._vtable, self._vtable_size = data, at, 0, 0
        if empty:
            return
        within(data, at, 4)
        self._vtable = at - I32.unpack_from(data, at)[0]
        within(data, self._vtable, 4)
        self._vtable_size = U16.unpack_from(data, self._vtable)[0]
        within(data, self._vtable, self._vtable_size)

    @classmethod
    def root(cls, data: bytes) -> FlatTable:
        within(data, 0, 4)
        return cls(data, U32.unpack_from(data, 0)[0])

    def scalar(self, field: int, kind: struct.Struct) -> int:
        at = self.position(field, kind.size)
        return 0 if at is None else kind.unpack_from(self.data, at)[0]

    def table(self, field: int) -> FlatTable | None:
        at = self.position(field, 4)
        return None if at is None else FlatTable(self.data, at + U32.unpack_from(self.data, at)[0])

    def tables(self, field: int) -> list[FlatTable]:
        """A vector of tables (empty when left out)."""
        at = self.position(field, 4)
        if at is None:
            return []
        start = at + U32.unpack_from(self.data, at)[0]
        within(self.data, start, 4)
        count = U32.unpack_from(self.data, start)[0]
        within(self.data, start + 4, 4 * count)
        items = range(start + 4, start + 4 + 4 * count, 4)
        return [FlatTable(self.data, item + U32.unpack_from(self.data, item)[0]) for item in items]

    def position(self, field: int, size: int) -> int | None:
        """Where a field's value lies in the flatbuffer; None if the writer left it out."""
        slot = 4 + 2 * field
        if slot + 2 > self._vtable_size:
            return None  # a field the writer left out: its default
        offset = U16.unpack_from(self.data, self._vtable + slot)[0]
        if offset == 0:
            return None
        within(self.data, self.at + offset, size)
        return self.at + offset


def within(data: bytes, at: int, size: int) -> None:
    if at < 0 or size < 0 or at + size > len(data):
        raise runner_invalid("a message header that points outside itself")


NO_FIELDS = FlatTable(b"", 0, empty=True)  # every field at its default
