"""ResultGuard: valid results pass byte for byte, however sliced; malformed ones never do.

Streams are written as the runner writes them (``ipc_chunks``: pyarrow's stream writer, one
slice per batch, from DuckDB's Arrow reader where the types come from DuckDB). The malformed
cases are seeded: each corrupts a valid stream in a way no decoder may accept (offsets out of
order or past the data, lengths past the body, cut messages, bad UTF-8, ...), and every one
must end in ``RunnerInvalidError``, never in a crash or in bytes passed on unchecked.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable

import duckdb
import pyarrow as pa
import pyarrow.ipc
import pytest

from launcher.errors import ResultLimitError, RunnerInvalidError
from launcher.sandbox.result_check import END_OF_STREAM, MAX_METADATA_BYTES, ResultGuard
from launcher.sandbox.runner_client import QuerySummary

SEED = 16


class _Sink:
    """The runner's ``_ChunkSink``: what the writer wrote since the last ``take``."""

    closed = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def ipc_chunks(
    batches: Iterable[pa.RecordBatch],
    schema: pa.Schema,
    options: pa.ipc.IpcWriteOptions | None = None,
) -> list[bytes]:
    """A result as the runner slices it: (empty) schema slice, one per batch, end of stream."""
    sink = _Sink()
    chunks = []
    with pa.ipc.new_stream(sink, schema, options=options) as writer:
        chunks.append(sink.take())
        for batch in batches:
            writer.write_batch(batch)
            chunks.append(sink.take())
    chunks.append(sink.take())
    return chunks


def duckdb_chunks(sql: str, batch_rows: int = 1000) -> list[bytes]:
    con = duckdb.connect()
    con.execute("CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')")
    reader = con.sql(sql).to_arrow_reader(batch_rows)
    return ipc_chunks(reader, reader.schema)


def table_chunks(table: pa.Table, **options: object) -> list[bytes]:
    write = pa.ipc.IpcWriteOptions(**options) if options else None
    return ipc_chunks(table.to_batches(max_chunksize=50), table.schema, write)


def check(
    chunks: Iterable[bytes],
    *,
    max_rows: int | None = None,
    rows: int | None = None,
    ipc_bytes: int | None = None,
) -> bytes:
    """Feed every chunk, finish with a truthful summary (or the claims given); the bytes passed
    on."""
    guard = ResultGuard(max_rows, None)
    passed = b"".join(guard.feed(chunk) for chunk in chunks)
    claimed_rows = guard.rows if rows is None else rows
    claimed_bytes = guard.ipc_bytes if ipc_bytes is None else ipc_bytes
    counted = guard.finish(QuerySummary(claimed_rows, claimed_bytes, 0.5, "SELECT"))
    assert (counted.rows, counted.ipc_bytes) == (guard.rows, guard.ipc_bytes)
    return passed


VALID_SQL = {
    "ints": "SELECT (range % 100)::TINYINT a, range b, range::HUGEINT c FROM range(3000)",
    "strings": "SELECT range::VARCHAR s, 'ü' || repeat('x', range % 7) t, "
    "CASE WHEN range % 3 = 0 THEN NULL ELSE 'n' END n FROM range(3000)",
    "nested_lists": "SELECT [range, NULL, 2] a, [[range::VARCHAR], []] b FROM range(2500)",
    "structs": "SELECT {'a': range, 'b': {'c': range::VARCHAR, 'd': [1.5]}} s FROM range(2500)",
    "map_blob_decimal_time": "SELECT MAP {range: 'v'} m, '\\xAA'::BLOB b, 1.25::DECIMAL(18,3) d, "
    "TIMESTAMP '2024-01-01' + INTERVAL (range) SECOND t, range % 2 = 0 f FROM range(2000)",
    "enum": "SELECT (['sad', 'ok', 'happy'])[range % 3 + 1]::mood m, range i FROM range(3000)",
    "empty": "SELECT 1 AS x, 'a' AS s WHERE false",
}


@pytest.mark.parametrize("name", sorted(VALID_SQL))
def test_a_valid_result_passes_exactly_as_sent(name: str) -> None:
    chunks = duckdb_chunks(VALID_SQL[name])
    guard = ResultGuard(None, None)
    # Chunk for chunk: each whole slice is passed on as it came.
    assert [guard.feed(chunk) for chunk in chunks] == chunks
    assert guard.rows == pa.ipc.open_stream(b"".join(chunks)).read_all().num_rows
    assert guard.ipc_bytes == sum(map(len, chunks))


@pytest.mark.parametrize("name", ["strings", "enum", "structs"])
def test_any_slicing_of_a_valid_result_passes_the_same_bytes(name: str) -> None:
    whole = b"".join(duckdb_chunks(VALID_SQL[name], batch_rows=700))
    rng = random.Random(SEED)
    small = b"".join(duckdb_chunks(VALID_SQL[name].replace("3000", "5").replace("2500", "5")))
    assert check(small[i : i + 1] for i in range(len(small))) == small  # byte by byte
    assert check([whole]) == whole  # all in one
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(whole)), rng.randint(1, 60)))
        pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
        assert check(pieces) == whole


def test_changed_dictionaries_and_the_legacy_format_pass() -> None:
    moods = pa.array(["sad", "ok", "sad"]).dictionary_encode()
    other = pa.array(["happy", "meh", "happy"]).dictionary_encode()
    schema = pa.schema([("m", moods.type)])
    batches = [pa.record_batch([moods], schema=schema), pa.record_batch([other], schema=schema)]
    replaced = ipc_chunks(batches, schema)  # a replacement dictionary before the second batch
    assert check(replaced) == b"".join(replaced)
    legacy = table_chunks(pa.table({"s": ["a", "bc"] * 60}), use_legacy_format=True)
    assert check(legacy) == b"".join(legacy)


def test_limits_are_counted_by_the_guard() -> None:
    chunks = duckdb_chunks("SELECT range FROM range(5000)")
    size = sum(map(len, chunks))
    check(chunks, max_rows=5000)
    with pytest.raises(ResultLimitError, match=r"more than 4999 rows \(policy max_result_rows\)"):
        check(chunks, max_rows=4999)
    whole = ResultGuard(None, size)
    for chunk in chunks:
        whole.feed(chunk)
    guard = ResultGuard(None, size - 1)
    with pytest.raises(ResultLimitError, match=rf"larger than {size - 1} bytes \(policy max_"):
        for chunk in chunks:
            guard.feed(chunk)


def test_a_summary_that_disagrees_with_what_was_sent_is_invalid() -> None:
    chunks = duckdb_chunks("SELECT range FROM range(5000)")
    with pytest.raises(RunnerInvalidError, match=r"claims 1 rows .* but it sent 5000 rows"):
        check(chunks, rows=1)
    with pytest.raises(RunnerInvalidError, match="runner sent an invalid result"):
        check(chunks, ipc_bytes=10)


# --- malformed results ----------------------------------------------------------------------


def messages(chunks: list[bytes]) -> list[bytes]:
    """The stream's messages, one each (the runner's slices may hold a dictionary too)."""
    whole, found, at = b"".join(chunks), [], 0
    reader = pa.BufferReader(whole)
    while at < len(whole) - len(END_OF_STREAM):
        pa.ipc.read_message(reader)
        found.append(whole[at : reader.tell()])
        at = reader.tell()
    return [*found, END_OF_STREAM]


def body_start(message: bytes) -> int:
    return len(message) - pa.ipc.read_message(pa.py_buffer(message)).body.size


def refused(pieces: Iterable[bytes]) -> RunnerInvalidError:
    """The error the guard ends ``pieces`` with; it must never let them all pass."""
    guard = ResultGuard(None, None)
    with pytest.raises(RunnerInvalidError, match=r"^runner sent an invalid result: ") as caught:
        for piece in pieces:
            guard.feed(piece)
        guard.finish(QuerySummary(guard.rows, guard.ipc_bytes, 0.0, "SELECT"))
    return caught.value


def single_column(values: pa.Array, rows: int = 40) -> list[bytes]:
    """schema, one batch, end: a one-column stream with no nulls (so the offsets come first)."""
    table = pa.table({"c": values})
    return messages(ipc_chunks(table.to_batches(max_chunksize=rows)[:1], table.schema))


def with_int32(message: bytes, at: int, value: int) -> bytes:
    changed = bytearray(message)
    struct.pack_into("<i", changed, at, value)
    return bytes(changed)


@pytest.mark.parametrize("kind", [pa.string(), pa.binary()])
def test_offsets_out_of_order_or_past_the_data_are_refused(kind: pa.DataType) -> None:
    rng = random.Random(SEED)
    schema, batch, end = single_column(pa.array([f"v{i}" * (i % 5) for i in range(40)], kind))
    start = body_start(batch)
    last = struct.unpack_from("<i", batch, start + 4 * 40)[0]
    for _ in range(60):
        index = rng.randrange(41)
        bad = rng.choice([last + rng.randint(1, 1 << 30), -rng.randint(1, 1 << 30), 1 << 30])
        refused([schema, with_int32(batch, start + 4 * index, bad), end])


def test_lengths_past_the_body_are_refused() -> None:
    rng = random.Random(SEED)
    values = pa.array(["abcdefgh" * (i % 3) for i in range(12345)])
    schema, batch, end = single_column(values, rows=12345)
    body = pa.ipc.read_message(pa.py_buffer(batch)).body.size
    header = batch[: body_start(batch)]
    rows_at = [
        i for i in range(0, len(header) - 7) if header[i : i + 8] == struct.pack("<q", 12345)
    ]
    offsets, data = (buffer.size for buffer in values.buffers()[1:])
    data_at = header.find(struct.pack("<qq", offsets, data))  # the data buffer: offset, length
    assert rows_at and data_at > 0
    for _ in range(60):
        changed = bytearray(batch)
        at, base = rng.choice([(r, 12345) for r in rows_at] + [(data_at, 0), (data_at + 8, 0)])
        struct.pack_into("<q", changed, at, base + body + rng.randint(1, 1 << 40))
        refused([schema, bytes(changed), end])


def test_invalid_utf8_in_a_string_column_or_dictionary_is_refused() -> None:
    rng = random.Random(SEED)
    schema, batch, end = single_column(pa.array(["héllo wörld"] * 40))
    dictionary = messages(duckdb_chunks(VALID_SQL["enum"]))
    data = body_start(batch) + 8 * 21  # past the 41 offsets, padded
    for _ in range(30):
        changed = bytearray(batch)
        changed[data + rng.randrange(40 * 13)] = rng.choice([0xFF, 0xC0, 0xF8])  # never UTF-8
        refused([schema, bytes(changed), end])
        word = bytearray(dictionary[1])
        word[dictionary[1].find(b"sadokhappy") + rng.randrange(10)] = 0xFF
        refused([dictionary[0], bytes(word), *dictionary[2:]])


def test_dictionary_indices_past_the_dictionary_are_refused() -> None:
    sent = messages(duckdb_chunks(VALID_SQL["enum"]))
    batch = bytearray(sent[2])
    batch[sent[2].find(bytes([0, 1, 2, 0, 1, 2, 0, 1])) + 7] = 3  # 8th row's mood: of 0..2
    refused([*sent[:2], bytes(batch), *sent[3:]])


def test_cut_and_misplaced_messages_are_refused() -> None:
    rng = random.Random(SEED)
    sent = messages(duckdb_chunks(VALID_SQL["strings"]))
    whole = b"".join(sent)
    bounds = {sum(map(len, sent[:i])) for i in range(len(sent) + 1)}
    for _ in range(40):
        cut = rng.choice([c for c in range(1, len(whole)) if c not in bounds])
        refused([whole[:cut]])  # no end of stream
        refused([whole[:cut], END_OF_STREAM])  # the marker read as part of the cut message
    refused(sent[1:])  # no schema
    refused([END_OF_STREAM])
    refused([sent[0], sent[0], *sent[1:]])
    refused([sent[0], sent[1], sent[0], *sent[2:]])
    enum = messages(duckdb_chunks(VALID_SQL["enum"]))
    refused([enum[1], enum[0], *enum[2:]])  # a dictionary before the schema
    refused([enum[0], enum[1], END_OF_STREAM])  # a dictionary no batch used
    refused([enum[0], enum[1], enum[1], *enum[2:]])  # two before a batch


def test_bytes_after_the_end_are_refused() -> None:
    rng = random.Random(SEED)
    sent = duckdb_chunks(VALID_SQL["ints"])
    for _ in range(20):
        extra = rng.randbytes(rng.randint(1, 64))
        refused([*sent[:-1], sent[-1] + extra])
        refused([*sent, extra])
        refused([*sent, END_OF_STREAM])


def test_impossible_lengths_are_refused_before_anything_is_buffered() -> None:
    for length in (MAX_METADATA_BYTES + 8, 0x7FFFFFF8, -8):
        prefix = b"\xff\xff\xff\xff" + struct.pack("<i", length)
        refused([prefix])
        refused([struct.pack("<i", length)])  # the legacy format's prefix
    schema, batch, _ = single_column(pa.array(range(40)))
    header = bytearray(batch[: body_start(batch)])
    length_at = bytes(header).find(struct.pack("<q", len(batch) - len(header)))
    struct.pack_into("<q", header, length_at, 1 << 40)  # the body's length in the header
    refused([schema, bytes(header) + batch[len(header) :]])


def test_batches_that_do_not_match_the_schema_are_refused() -> None:
    rows = range(100)
    cases = [
        ({"a": pa.array(rows)}, {"a": pa.array([str(i) for i in rows])}),
        ({"a": pa.array(rows), "b": pa.array(rows)}, {"a": pa.array(rows)}),
        ({"a": pa.array([[i] for i in rows])}, {"a": pa.array(rows, pa.int8())}),
        ({"a": pa.array([str(i) for i in rows])}, {"a": pa.array(rows, pa.int8())}),
    ]
    for expected, actual in cases:
        schema = columns_stream(expected)[0]
        batch = columns_stream(actual)[1]
        refused([schema, batch, END_OF_STREAM])


def columns_stream(columns: dict[str, pa.Array]) -> list[bytes]:
    table = pa.table(columns)
    return messages(ipc_chunks(table.to_batches(), table.schema))


def test_compressed_and_delta_batches_are_refused() -> None:
    table = pa.table({"a": list(range(1000))})
    refused(table_chunks(table, compression="zstd"))
    grown = [pa.array(["a", "b"]), pa.array(["a", "b", "c"])]
    schema = pa.schema([("m", pa.dictionary(pa.int32(), pa.string()))])
    batches = [pa.record_batch([v.dictionary_encode()], schema=schema) for v in grown]
    delta = pa.ipc.IpcWriteOptions(emit_dictionary_deltas=True)
    refused(ipc_chunks(batches, schema, delta))


def test_random_corruption_never_passes_a_batch_that_does_not_validate() -> None:
    """Flip bytes anywhere: the guard may accept what still happens to be valid, but whatever
    it passes on must decode and validate in full, and anything else is RunnerInvalidError."""
    rng = random.Random(SEED)
    for name in ("enum", "structs", "strings"):
        source = b"".join(duckdb_chunks(VALID_SQL[name].replace("00", "0"), batch_rows=100))
        for _ in range(40):
            changed = bytearray(source)
            for _ in range(rng.randint(1, 6)):
                changed[rng.randrange(len(changed))] = rng.randrange(256)
            guard = ResultGuard(None, None)
            try:
                passed = guard.feed(bytes(changed))
            except RunnerInvalidError:
                continue
            for batch in pa.ipc.open_stream(passed) if passed else ():
                batch.validate(full=True)
    garbage = rng.randbytes(4096)
    refused([garbage])
