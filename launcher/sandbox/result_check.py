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
indices: what Arrow's own fuzzing of its IPC reader checks). A dictionary is validated in full
once, when it arrives; a record batch is validated against stand-ins of the dictionaries in
force (null arrays of the same lengths, whose validation costs nothing), so its indices are
checked against the right lengths without validating every dictionary again for every batch.
Only bytes so checked are passed on, exactly as the runner sent them. The guard also counts
rows and bytes itself and enforces the policy's result limits, so a runner that ignores them,
or lies in its summary, is caught.

It also refuses what no honest runner sends and would only cost or endanger the worker and
its clients: a batch of more rows than the runner's batch size, more than one batch without
rows (DuckDB sends none), dictionaries of more than ``MAX_DICTIONARY_BYTES`` at once, an
extension type DuckDB does not emit (pyarrow before 14.0.1 unpickles
``arrow.py_extension_type``: CVE-2023-47248), metadata DuckDB does not write, control
characters in metadata. It raises ``RunnerInvalidError`` for all of these, ``ResultLimitError``
past a limit, and ``SqlError`` for a column name holding a control character (DuckDB lets a
query name a column so; nothing downstream should print it) or a result of more than
``MAX_FIELDS`` fields.

The work is done in bounded steps: ``start`` a slice, then ``step`` until it returns the
checked bytes; a step checks at most ``STEP_MESSAGES`` messages or ``STEP_BYTES`` of their
cost, so the executor can serve other queries and watch its deadline between steps. A message
costing more than a step (``heavy_next``) gets a step of its own, which the executor runs in a
worker thread. ``feed`` checks a whole slice at once.

The format (Arrow's "IPC Streaming Format"): messages, each a 0xFFFFFFFF continuation marker
(absent in the legacy format), an int32 metadata length (0: end of stream), a ``Message``
flatbuffer whose ``bodyLength`` says how many body bytes follow it. The first message is the
schema, then dictionary batches and record batches, then the end-of-stream marker.
"""

from __future__ import annotations

import re

import pyarrow as pa

from ..errors import ResultLimitError, SqlError, runner_invalid
from .ipc_stream import (
    BATCH,
    BATCH_LENGTH,
    CONTINUATION,
    DICTIONARY,
    DICTIONARY_DATA,
    DICTIONARY_ID,
    DICTIONARY_IS_DELTA,
    ENCODING_ID,
    END,
    FIELD_CHILDREN,
    FIELD_DICTIONARY,
    FIELD_TYPE_TYPE,
    I16,
    I32,
    I64,
    KINDS,
    NULL_TYPE,
    SCHEMA,
    SCHEMA_ENDIANNESS,
    SCHEMA_FIELDS,
    U8,
    FlatTable,
    Frame,
    Parts,
    as_record_batch,
    check_uncompressed,
    decoding,
    null_dictionary,
    read_frame,
    read_message,
)
from .runner_client import BATCH_ROWS, QuerySummary

_MIB = 1024 * 1024
# A message's flatbuffer header: a batch's holds 16 bytes per column and per buffer, a schema's
# a few hundred per field, so 10,000 columns need about 1 MiB. The cap bounds what a bare length
# prefix can make the worker wait for and hold before pyarrow has seen a byte of it.
MAX_METADATA_BYTES = 16 * _MIB
# One message, held until it is whole. The runner writes each batch (with the dictionaries it
# changed) into one gRPC message, and the runner client accepts none over 64 MiB
# (``runner_client``), so an honest message never comes near this.
MAX_UNCHECKED_BYTES = 64 * _MIB
# The dictionaries in force at once (the last one of each id), which every reader of the result
# holds: DuckDB's are its ENUM types' values.
MAX_DICTIONARY_BYTES = 64 * _MIB
# DuckDB's Arrow reader yields no empty batch (measured with duckdb 2.0.1: an empty result is a
# stream with no batch at all); one is tolerated.
MAX_EMPTY_BATCHES = 1
# The runner reads a result that is not a SELECT or EXPLAIN (EXECUTE of a prepared statement,
# CALL, INSERT ... RETURNING) with DuckDB's default batch size, not ExecuteRequest.batch_rows
# (``duckcell_runner.service``): batches of up to 131,072 rows with duckdb 2.0.1.
UNREQUESTED_BATCH_ROWS = 131_072
# Fields in a schema, nested ones included. pyarrow holds the GIL while it builds a schema or
# decodes a batch, even in a worker thread: 20,000 fields stall the event loop ~6 ms, 50,000
# ~70 ms, 250,000 ~250 ms. A result this wide is the query's error (DuckDB can produce one).
MAX_FIELDS = 20_000
# One step of work: this many messages, or messages costing this many bytes (128 one-row
# batches take about 1 ms). A message costs its size plus METADATA_WEIGHT - 1 times its
# flatbuffer header's: a schema takes 5-7 us a field, a batch about 1.4 us a column (tens
# of ns a header byte), its data a few ns a byte at most (UTF-8, offsets, views). A message
# that costs more than a step (a 256 KiB header, a 4 MiB body) is heavy: checked in a step of
# its own, which the executor runs in a worker thread (``heavy_next``). The weight is low on
# purpose: a header is read by Python and by pyarrow holding the GIL, so a thread helps little
# there (its GIL hand-overs stalled the loop 40 ms for a 3,000-field schema checked in 13 ms);
# a body is validated by Arrow without the GIL.
STEP_MESSAGES = 128
STEP_BYTES = 4 * _MIB
METADATA_WEIGHT = 16
# The extension types DuckDB emits (duckdb 2.0.1, every arrow_* setting): BIGNUM, HUGEINT,
# TIMETZ, BIT as arrow.opaque; GEOMETRY and VARIANT; UUID, JSON and BOOLEAN with
# arrow_lossless_conversion.
EXTENSIONS = frozenset(
    {
        "arrow.opaque",
        "geoarrow.wkb",
        "arrow.parquet.variant",
        "arrow.uuid",
        "arrow.json",
        "arrow.bool8",
    }
)
_EXTENSION_NAME = b"ARROW:extension:name"
_FIELD_METADATA = frozenset({_EXTENSION_NAME, b"ARROW:extension:metadata"})
_CONTROL = re.compile("[\\x00-\\x1f\\x7f-\\x9f]")  # C0, DEL, C1
_VALUE_CONTROL = re.compile("[\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f]")  # but \t \n \r

_invalid = runner_invalid


class ResultGuard:
    """One query's result stream, checked as it arrives. ``feed`` every IPC slice the runner
    sends, in order (or ``start`` it and ``step`` until done), then ``finish`` with the runner's
    summary; a guard is used once.

    ``batch_rows`` is what the launcher asked the runner for (ExecuteRequest.batch_rows): no
    honest batch has more rows (or more than ``UNREQUESTED_BATCH_ROWS``, see there).
    """

    def __init__(
        self, max_rows: int | None, max_bytes: int | None, *, batch_rows: int = BATCH_ROWS
    ) -> None:
        self.rows = 0  # in record batches that passed
        self.ipc_bytes = 0  # every byte received, checked or not yet
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._max_batch_rows = max(batch_rows, UNREQUESTED_BATCH_ROWS)
        self._pending = bytearray()  # the start of a message not yet whole
        self._wanted = 0  # _pending is not looked at again until it is this long
        self._slice: bytes | None = None  # being checked by step()
        self._at = 0  # where in _slice the next message starts
        self._schema: pa.Schema | None = None
        self._dictionaries: _Dictionaries | None = None  # when the schema has any
        self._empty_batches = 0
        self._ended = False
        self._claimed: QuerySummary | None = None
        # The last step stopped before a message that costs more than a step: run the next
        # off the event loop (``step(heavy=True)``).
        self.heavy_next = False

    @property
    def ended(self) -> bool:
        """Whether the end-of-stream marker came (and everything before it passed)."""
        return self._ended

    def feed(self, data: bytes) -> bytes:
        """The checked part of the stream so far: every whole message ``data`` completes, as
        sent (``data`` itself when it holds whole messages, as the runner sends them). A
        message not yet whole waits for the next call."""
        self.start(data)
        while (checked := self.step(heavy=True)) is None:
            pass
        return checked

    def start(self, data: bytes) -> None:
        """Take the next slice; ``step`` checks it."""
        if self._slice is not None:
            raise RuntimeError("the previous slice is not checked yet")
        self._slice, self._at = b"", 0
        if not data:
            return
        if self._ended:
            raise _invalid("bytes after the end-of-stream marker")
        self._count_bytes(len(data))
        if not self._pending:
            self._slice = data
            return
        if len(self._pending) + len(data) < self._wanted:
            self._pending += data
            return
        # The message completed: one copy of it, which is checked and then passed on as is.
        self._slice, self._pending = b"".join((self._pending, data)), bytearray()

    def step(self, *, heavy: bool = False) -> bytes | None:
        """Check some of the slice: None while there is more to check, then the checked bytes
        (raises RunnerInvalidError, ResultLimitError or SqlError). Without ``heavy``, the step
        stops before a message that costs more than a step, and sets ``heavy_next``."""
        buffer = self._slice
        if buffer is None:
            raise RuntimeError("no slice was started")
        self.heavy_next = False
        if not buffer:  # nothing new, or a message still not whole
            self._slice = None
            return b""
        messages = work = 0
        while not self._ended:
            if (messages >= STEP_MESSAGES or work >= STEP_BYTES) and self._at < len(buffer):
                return None
            frame = read_frame(buffer, self._at, MAX_METADATA_BYTES)
            if isinstance(frame, int):  # bytes still missing from the message's header
                self._wanted = len(buffer) - self._at + frame
                break
            if frame.end - self._at > MAX_UNCHECKED_BYTES:
                raise _invalid(
                    f"a message of {frame.end - self._at} bytes (at most {MAX_UNCHECKED_BYTES})"
                )
            if frame.end > len(buffer):
                self._wanted = frame.end - self._at
                break
            cost = frame.end - self._at + (METADATA_WEIGHT - 1) * frame.metadata
            if cost > STEP_BYTES and not heavy:
                self.heavy_next = True
                return None
            self._accept(frame, memoryview(buffer)[self._at : frame.end])
            messages += 1
            work += cost
            self._at = frame.end
        return self._checked(buffer)

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

    def _checked(self, buffer: bytes) -> bytes:
        """The slice's whole messages, as sent; a message not yet whole waits in _pending."""
        at, self._slice = self._at, None
        if at < len(buffer):
            if self._ended:
                raise _invalid("bytes after the end-of-stream marker")
            self._pending = bytearray(memoryview(buffer)[at:])
        if at == len(buffer):
            return buffer  # whole messages (as the runner sends them): passed on without a copy
        return bytes(memoryview(buffer)[:at])

    def _accept(self, frame: Frame, message: memoryview) -> None:
        """Check one whole message."""
        if frame.kind == END:
            if self._schema is None:
                raise _invalid("the stream ended before its schema")
            if self._dictionaries is not None and self._dictionaries.held:
                raise _invalid("a dictionary batch was not followed by a record batch")
            self._ended = True
            return
        if self._schema is None:
            if frame.kind != SCHEMA:
                raise _invalid(f"its first message is a {KINDS[frame.kind]}, not the schema")
            self._accept_schema(frame, message)
            return
        if frame.kind == SCHEMA:
            raise _invalid("a second schema")
        if frame.kind == DICTIONARY:
            if self._dictionaries is None:
                raise _invalid("a dictionary batch for a schema without dictionaries")
            self._dictionaries.accept(frame, message)
            return
        self._accept_batch(frame, message)

    def _accept_schema(self, frame: Frame, message: memoryview) -> None:
        # Arrow byte-swaps a big-endian stream's buffers before they are validated; the runner
        # writes the host's order (little-endian), so nothing honest needs that path.
        if frame.header.scalar(SCHEMA_ENDIANNESS, I16) != 0:
            raise _invalid("a big-endian schema")
        # Counted before pyarrow builds the schema: a flatbuffer may list one table many times.
        encoded = _encoded_fields(frame.header)
        with decoding("schema"):
            schema = pa.ipc.read_schema(read_message(message, SCHEMA))
            fields = _arrow_fields(schema)
            _check_schema(schema, fields)
        if len(encoded) != len(fields) or any(
            (key is not None) != isinstance(kind, pa.DictionaryType)
            for (_, key), (_, kind) in zip(encoded, fields, strict=True)
        ):
            raise _invalid("a schema whose fields pyarrow reads differently")
        if any(key is not None for _, key in encoded):
            self._dictionaries = _Dictionaries(frame, encoded, fields)
        self._schema = schema

    def _accept_batch(self, frame: Frame, message: memoryview) -> None:
        check_uncompressed(frame.header)
        assert self._schema is not None
        length = frame.header.scalar(BATCH_LENGTH, I64)
        if not 0 <= length <= self._max_batch_rows:
            raise _invalid(
                f"a record batch of {length} rows (the runner sends at most "
                f"{self._max_batch_rows} per batch)"
            )
        if length == 0:
            self._empty_batches += 1
            if self._empty_batches > MAX_EMPTY_BATCHES:
                raise _invalid(f"more than {MAX_EMPTY_BATCHES} record batch without rows")
        with decoding("record batch"):
            if self._dictionaries is not None:
                batch = self._dictionaries.read_batch(frame, message)
            else:
                batch = pa.ipc.read_record_batch(read_message(message, BATCH), self._schema)
            batch.validate(full=True)
        self.rows += batch.num_rows
        if self._max_rows and self.rows > self._max_rows:
            raise ResultLimitError(
                f"result has more than {self._max_rows} rows (policy max_result_rows)"
            )


class _Dictionaries:
    """The dictionaries of one stream: each validated once as it arrives; record batches are
    read against null stand-ins of the same lengths (``read_batch``).

    The stand-ins come from a pyarrow stream reader of its own, fed without copies: the schema
    with every dictionary's value type made Null, null dictionary batches the guard writes
    whenever a dictionary changed, then the runner's record batch. A record batch's body does
    not depend on its dictionaries' value types, so pyarrow decodes and validates it exactly as
    every reader of the real stream will, but for the dictionaries' values, checked already.
    """

    def __init__(
        self,
        schema: Frame,
        encoded: list[tuple[FlatTable, int | None]],
        fields: list[tuple[pa.Field, pa.DataType]],
    ) -> None:
        self._types: dict[int, pa.Schema] = {}  # id: a one-field schema of the value type
        self._lengths: dict[int, int] = {}  # id: the length of the dictionary in force
        self._sizes: dict[int, int] = {}  # id: its message's size
        self._size = 0  # of them all
        self._changed: set[int] = set()  # ids the stand-in reader has an old length of
        self.held: set[int] = set()  # ids whose dictionary came after the last record batch
        stand_in = bytearray(schema.header.data)
        for (table, key), (field, kind) in zip(encoded, fields, strict=True):
            if key is None:
                continue
            value = kind.value_type
            if value.num_fields or isinstance(value, pa.BaseExtensionType | pa.DictionaryType):
                raise _invalid(f"a dictionary of {value} (column {field.name!r})")
            if key in self._types:
                raise _invalid(f"two fields with dictionary id {key}")
            self._types[key] = pa.schema([pa.field("dictionary", value)])
            at = table.position(FIELD_TYPE_TYPE, 1)
            if at is None:
                raise _invalid("a dictionary field without a type")
            stand_in[at] = NULL_TYPE
        self._parts = Parts()
        self._parts.append(CONTINUATION + I32.pack(len(stand_in)) + bytes(stand_in))
        with decoding("schema"):
            self._reader = pa.ipc.open_stream(pa.PythonFile(self._parts, mode="r"))

    def accept(self, frame: Frame, message: memoryview) -> None:
        """Check one dictionary batch in full, once."""
        header = frame.header
        # A delta is concatenated to the dictionary before anything validates either; the
        # runner's writer never sends one (pyarrow emits deltas only when asked to).
        if header.scalar(DICTIONARY_IS_DELTA, U8):
            raise _invalid("a delta dictionary batch")
        data = header.table(DICTIONARY_DATA)
        check_uncompressed(data)
        assert data is not None
        key = header.scalar(DICTIONARY_ID, I64)
        schema = self._types.get(key)
        if schema is None:
            raise _invalid(f"a dictionary for id {key}, which no field of the schema has")
        if key in self.held:
            raise _invalid(f"two dictionaries for id {key} before a record batch used one")
        self._size += len(message) - self._sizes.get(key, 0)
        self._sizes[key] = len(message)
        if self._size > MAX_DICTIONARY_BYTES:
            raise _invalid(
                f"dictionaries of {self._size} bytes in force at once (at most "
                f"{MAX_DICTIONARY_BYTES})"
            )
        with decoding("dictionary batch"):
            read_message(message, DICTIONARY)  # pyarrow verifies the whole flatbuffer
            # Arrow reads a dictionary as a record batch of one column of its value type: so
            # does the guard, from the same bytes with the message's header pointed at it.
            parts = Parts()
            parts.append(as_record_batch(frame, data))
            parts.append(message[frame.body_at :])
            read = pa.ipc.read_message(pa.PythonFile(parts, mode="r"))
            batch = pa.ipc.read_record_batch(read, schema)
            batch.validate(full=True)
        self._lengths[key] = batch.num_rows
        self._changed.add(key)
        self.held.add(key)

    def read_batch(self, frame: Frame, message: memoryview) -> pa.RecordBatch:
        """The record batch, decoded against null stand-ins of the dictionaries in force."""
        missing = self._types.keys() - self._lengths.keys()
        if missing:
            raise _invalid(f"a record batch before the dictionary with id {min(missing)}")
        for key in sorted(self._changed):
            self._parts.append(null_dictionary(key, self._lengths[key]))
        self._changed.clear()
        self.held.clear()
        read_message(message, BATCH)  # pyarrow verifies the whole flatbuffer
        self._parts.append(CONTINUATION + I32.pack(len(frame.header.data)) + frame.header.data)
        self._parts.append(message[frame.body_at :])
        batch = self._reader.read_next_batch()
        if self._parts:
            raise _invalid("a record batch that pyarrow reads in fewer bytes than it has")
        return batch


def _arrow_fields(schema: pa.Schema) -> list[tuple[pa.Field, pa.DataType]]:
    """Every field, nested ones too, in the order of the schema's flatbuffer (depth first, a
    field before its children; an extension type's children are its storage's)."""
    found: list[tuple[pa.Field, pa.DataType]] = []
    waiting = [schema.field(i) for i in reversed(range(len(schema)))]
    while waiting:
        field = waiting.pop()
        kind = field.type
        found.append((field, kind))
        if isinstance(kind, pa.DictionaryType):
            kind = kind.value_type
        if isinstance(kind, pa.BaseExtensionType):
            kind = kind.storage_type
        waiting.extend(kind.field(i) for i in reversed(range(kind.num_fields)))
    return found


def _encoded_fields(schema: FlatTable) -> list[tuple[FlatTable, int | None]]:
    """The schema flatbuffer's Field tables, in the same order, each with its dictionary id."""
    found: list[tuple[FlatTable, int | None]] = []
    waiting = list(reversed(schema.tables(SCHEMA_FIELDS)))
    while waiting:
        if len(found) + len(waiting) > MAX_FIELDS:
            raise SqlError(
                f"the result has more than {MAX_FIELDS} columns (nested fields counted); "
                "select fewer"
            )
        field = waiting.pop()
        encoding = field.table(FIELD_DICTIONARY)
        found.append((field, None if encoding is None else encoding.scalar(ENCODING_ID, I64)))
        waiting.extend(reversed(field.tables(FIELD_CHILDREN)))
    return found


def _check_schema(schema: pa.Schema, fields: list[tuple[pa.Field, pa.DataType]]) -> None:
    if schema.metadata:
        raise _invalid("schema metadata (DuckDB writes none)")
    for field, kind in fields:
        name = field.name
        if _CONTROL.search(name):
            raise SqlError(
                f"the result has a column named {name!r}, with a control character; "
                "name it without one (AS ...)"
            )
        metadata = field.metadata or {}
        extension = metadata.get(_EXTENSION_NAME)
        if isinstance(kind, pa.BaseExtensionType):
            extension = kind.extension_name.encode()
        if extension is not None and extension.decode(errors="replace") not in EXTENSIONS:
            raise _invalid(f"an extension type {extension[:100]!r} (DuckDB emits none such)")
        for key, value in metadata.items():
            if key not in _FIELD_METADATA:
                raise _invalid(f"field metadata {key[:100]!r} (DuckDB writes none such)")
            try:
                text = value.decode()
            except UnicodeDecodeError:
                raise _invalid(f"field metadata {key!r} that is not UTF-8") from None
            if _VALUE_CONTROL.search(text):
                raise _invalid(f"field metadata {key!r} with a control character")
