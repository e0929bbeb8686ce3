"""ResultGuard: valid results pass byte for byte, however sliced; malformed ones never do.

Streams are written as the runner writes them (``ipc_chunks``: pyarrow's stream writer, one
slice per batch, from DuckDB's Arrow reader where the types come from DuckDB). The malformed
cases are seeded: each corrupts a valid stream in a way no decoder may accept (offsets out of
order or past the data, lengths past the body, cut messages, bad UTF-8, ...), and every one
must end in ``RunnerInvalidError``, never in a crash or in bytes passed on unchecked.

The last part holds results that validate but that no honest runner sends and that would cost
the worker or endanger a client: dictionaries re-validated for every batch, empty batches by the
hundred thousand, billions of rows in a few bytes, extension types DuckDB never emits, control
characters in names and metadata; and the check's steps, which bound its work per call.
"""

from __future__ import annotations

import inspect
import random
import struct
import time
from collections.abc import Iterable

import duckdb
import pyarrow as pa
import pyarrow.ipc
import pytest

from launcher.errors import ResultLimitError, RunnerInvalidError, SqlError
from launcher.sandbox import result_check
from launcher.sandbox.ipc_stream import END_OF_STREAM
from launcher.sandbox.result_check import (
    MAX_FIELDS,
    MAX_METADATA_BYTES,
    METADATA_WEIGHT,
    STEP_BYTES,
    STEP_MESSAGES,
    UNREQUESTED_BATCH_ROWS,
    ResultGuard,
)
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


def duckdb_chunks(sql: str, batch_rows: int = 1000, setting: str | None = None) -> list[bytes]:
    con = duckdb.connect()
    if setting:
        con.execute(f"SET {setting}")
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
    "nested_enum": "SELECT [{'m': (['sad', 'ok', 'happy'])[range % 3 + 1]::mood}, NULL] l, "
    "MAP {(['sad', 'ok'])[range % 2 + 1]::mood: range} p, "
    "{'a': (['ok', 'happy'])[range % 2 + 1]::mood, 'b': 'ok'::mood} s FROM range(3000)",
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
    for name in ("enum", "nested_enum", "structs", "strings"):
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


# --- what no honest runner sends, and bounded work ------------------------------------------


def dictionary_stream(values: pa.Array, batches: int) -> list[bytes]:
    """schema, one dictionary, ``batches`` one-row record batches that use it, end."""
    column = pa.DictionaryArray.from_arrays(pa.array([len(values) - 1], pa.int32()), values)
    schema = pa.schema([("d", column.type)])
    return messages(ipc_chunks([pa.record_batch([column], schema=schema)] * batches, schema))


def test_a_dictionary_is_validated_once_not_for_every_batch() -> None:
    """A 50 MB dictionary once made every 120-byte batch after it cost 30 ms (it was joined and
    validated again with each): a batch now costs what it would without one."""
    sent = dictionary_stream(pa.array([f"value-{i:010d}" for i in range(1_000_000)]), 200)
    guard = ResultGuard(None, None)
    guard.feed(sent[0])
    started = time.perf_counter()
    assert guard.feed(sent[1]) == sent[1]  # validated, so passed on at once
    dictionary_s = time.perf_counter() - started
    started = time.perf_counter()
    for batch in sent[2:-1]:
        guard.feed(batch)
    batches_s = time.perf_counter() - started
    guard.feed(sent[-1])
    assert guard.rows == 200
    # Validating the dictionary again for each batch would cost 200 times this.
    assert batches_s < 10 * dictionary_s, (batches_s, dictionary_s)


def test_dictionaries_in_force_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    words = [pa.array([f"{word}{i:05d}" for i in range(150)]) for word in ("a", "b")]
    columns = [pa.DictionaryArray.from_arrays(pa.array([0], pa.int8()), w) for w in words]
    two = pa.schema([("a", columns[0].type), ("b", columns[0].type)])
    size = len(messages(ipc_chunks([pa.record_batch(columns, schema=two)], two))[1])
    monkeypatch.setattr(result_check, "MAX_DICTIONARY_BYTES", size * 5 // 2)
    # Two in force at once fit; replacing one does not add to them, however often.
    alternating = [pa.record_batch([columns[i % 2], columns[0]], schema=two) for i in range(6)]
    sent = ipc_chunks(alternating, two)
    assert sum(b"\xff\xff\xff\xff" in chunk for chunk in sent) > 6  # replacements were sent
    assert check(sent) == b"".join(sent)
    three = pa.schema([*two, pa.field("c", columns[0].type)])
    error = refused(ipc_chunks([pa.record_batch([*columns, columns[1]], schema=three)], three))
    assert "dictionaries of" in str(error) and "in force at once" in str(error)


def test_a_replaced_shorter_dictionary_bounds_the_next_batch() -> None:
    first = pa.DictionaryArray.from_arrays(pa.array([0, 2], pa.int32()), pa.array(["a", "b", "c"]))
    second = pa.DictionaryArray.from_arrays(pa.array([0, 1], pa.int32()), pa.array(["x", "y"]))
    schema = pa.schema([("m", first.type)])
    sent = messages(
        ipc_chunks([pa.record_batch([v], schema=schema) for v in (first, second)], schema)
    )
    assert len(sent) == 6  # schema, dictionary, batch, replacement, batch, end
    assert check(sent) == b"".join(sent)
    batch = bytearray(sent[4])
    at = bytes(batch).rfind(struct.pack("<ii", 0, 1))
    struct.pack_into("<i", batch, at + 4, 2)  # in the first dictionary, past the second
    refused([*sent[:4], bytes(batch), sent[5]])


def test_a_dictionary_for_an_id_no_field_has_is_refused() -> None:
    values = pa.array(["p", "q", "r"])
    columns = [pa.DictionaryArray.from_arrays(pa.array([1], pa.int32()), values)] * 2
    schema = pa.schema([("a", columns[0].type), ("b", columns[0].type)])
    sent = messages(ipc_chunks([pa.record_batch(columns, schema=schema)], schema))
    second = sent[2]  # the dictionary with id 1
    header = second[: body_start(second)]
    assert header.count(struct.pack("<q", 1)) == 1
    changed = header.replace(struct.pack("<q", 1), struct.pack("<q", 5)) + second[len(header) :]
    error = refused([*sent[:2], changed, *sent[3:]])
    assert "dictionary for id 5, which no field" in str(error)


def test_more_than_one_batch_without_rows_is_refused() -> None:
    assert len(messages(duckdb_chunks(VALID_SQL["empty"]))) == 2  # DuckDB: no batch at all
    empty = pa.record_batch([pa.array([], pa.int64())], names=["x"])
    check(ipc_chunks([empty], empty.schema))
    error = refused(ipc_chunks([empty] * 3, empty.schema))
    assert "more than 1 record batch without rows" in str(error)


def test_a_batch_of_more_rows_than_the_runner_sends_is_refused() -> None:
    """A 96-byte batch of a null column once claimed 2^31-1 rows, and passed."""
    schema = pa.schema([("n", pa.null())])

    def nulls(rows: int) -> list[bytes]:
        return ipc_chunks([pa.record_batch([pa.nulls(rows)], schema=schema)], schema)

    check(nulls(UNREQUESTED_BATCH_ROWS))
    error = refused(nulls(UNREQUESTED_BATCH_ROWS + 1))
    assert f"of {UNREQUESTED_BATCH_ROWS + 1} rows" in str(error)
    larger = ResultGuard(None, None, batch_rows=UNREQUESTED_BATCH_ROWS + 1)
    assert larger.feed(b"".join(nulls(UNREQUESTED_BATCH_ROWS + 1)))
    schema_message, batch, end = messages(nulls(5))
    claimed = batch.replace(struct.pack("<q", 5), struct.pack("<q", 2**31 - 1))
    assert claimed != batch and len(claimed) < 256
    refused([schema_message, claimed, end])


@pytest.mark.filterwarnings("ignore:Arrow output on a DB-API result")
def test_the_bound_for_results_read_without_the_batch_size_is_duckdbs_default() -> None:
    """The runner reads a non-SELECT result (EXECUTE, CALL, ... RETURNING) with DuckDB's default
    batch size: the bound must follow DuckDB's (the image pins the launcher's DuckDB)."""
    parameters = inspect.signature(duckdb.DuckDBPyConnection.to_arrow_reader).parameters
    assert parameters["batch_size"].default == UNREQUESTED_BATCH_ROWS
    con = duckdb.connect()
    con.execute("PREPARE p AS SELECT * FROM range(500000)")
    reader = con.execute("EXECUTE p").to_arrow_reader()
    assert 65_536 < max(batch.num_rows for batch in reader) <= UNREQUESTED_BATCH_ROWS


EVERY_TYPE = (
    "SELECT uuid() u, '{}'::JSON j, 1::HUGEINT h, 1::UHUGEINT uh, '101'::BIT b, "
    "'12:00:00+01'::TIMETZ tz, 1::BIGNUM v, union_value(a := 1)::UNION(a INT, b VARCHAR) un, "
    "INTERVAL 1 DAY i, true t, 'POINT(1 2)'::GEOMETRY g, 1::VARIANT var, [1, 2] l, "
    "{'a': 1} s, MAP {1: 2} m, [1]::INT[1] a, 'x'::BLOB bl, 'x' st, NULL n, 1.5::DECIMAL(38, 2) d, "
    "TIMESTAMPTZ '2020-01-01' ts, 'ok'::mood e FROM range(3)"
)


@pytest.mark.parametrize(
    "setting",
    [
        None,
        "arrow_lossless_conversion = true",
        "arrow_large_buffer_size = true",
        "arrow_output_version = '1.5'",
        "arrow_output_list_view = true",
    ],
)
def test_every_type_duckdb_emits_passes(setting: str | None) -> None:
    """The extension and metadata allowlists cover what DuckDB writes, whatever its settings."""
    chunks = duckdb_chunks(EVERY_TYPE, setting=setting)
    assert check(chunks) == b"".join(chunks)


@pytest.mark.parametrize("name", [b"arrow.py_extension_type", b"duckdb.evil", b"arrow.opaque\x00"])
def test_extension_types_duckdb_does_not_emit_are_refused(name: bytes) -> None:
    """pyarrow before 14.0.1 unpickled ``arrow.py_extension_type`` metadata (CVE-2023-47248)."""
    metadata = {b"ARROW:extension:name": name, b"ARROW:extension:metadata": b"cos\nsystem\n"}
    inner = pa.field("x", pa.binary(), metadata=metadata)
    for field in (inner, pa.field("s", pa.struct([inner]))):
        schema = pa.schema([field])
        values = pa.array([b"a"]) if field is inner else pa.array([{"x": b"a"}], field.type)
        refused(ipc_chunks([pa.record_batch([values], schema=schema)], schema))


@pytest.mark.parametrize(
    "sql",
    ['SELECT 1 AS "a\x1b[31mred"', "SELECT {'k\x07': 1} AS s", 'SELECT 1 AS "c1\x9bx"'],
)
def test_a_column_name_with_a_control_character_is_the_querys_error(sql: str) -> None:
    """DuckDB lets a query name a column so (not a lie), but nothing downstream should print
    it: refused as the query's own error, the sandbox kept."""
    guard = ResultGuard(None, None)
    with pytest.raises(SqlError, match="control character; name it without one"):
        for chunk in duckdb_chunks(sql):
            guard.feed(chunk)


def test_metadata_duckdb_does_not_write_is_refused() -> None:
    def stream(field: pa.Field, schema_metadata: dict[bytes, bytes] | None = None) -> list[bytes]:
        schema = pa.schema([field], metadata=schema_metadata)
        return ipc_chunks([pa.record_batch([pa.array([b"a"])], schema=schema)], schema)

    plain = pa.field("x", pa.binary())
    check(stream(plain))
    wkb = {b"ARROW:extension:name": b"geoarrow.wkb", b"ARROW:extension:metadata": b'{"a":\n1}'}
    check(stream(plain.with_metadata(wkb)))
    for field, schema_metadata, words in [
        (plain, {b"pandas": b"{}"}, "schema metadata"),
        (plain.with_metadata({b"note": b"x"}), None, "field metadata b'note'"),
        (plain.with_metadata({b"ARROW:extension:name\x1b": b"x"}), None, "field metadata"),
        (plain.with_metadata({**wkb, b"ARROW:extension:metadata": b"\x1b[2J"}), None, "control"),
        (plain.with_metadata({**wkb, b"ARROW:extension:metadata": b"\xff"}), None, "not UTF-8"),
    ]:
        assert words in str(refused(stream(field, schema_metadata)))


def test_a_slice_is_checked_in_bounded_steps() -> None:
    """11 MiB of empty batches once held the event loop 1.2 s in one call; a slice is now
    checked a step at a time, each at most STEP_MESSAGES messages."""
    one_row = pa.record_batch([pa.array([1], pa.int64())], names=["x"])
    sent = messages(ipc_chunks([one_row] * 1000, one_row.schema))
    body = b"".join(sent[1:-1])
    guard = ResultGuard(None, None)
    guard.feed(sent[0])
    guard.start(body)
    steps = 1
    while (checked := guard.step()) is None:
        steps += 1
    assert checked == body and guard.rows == 1000
    assert steps == -(-1000 // STEP_MESSAGES)
    assert guard.feed(sent[-1]) == sent[-1] and guard.ended


def test_a_message_that_costs_more_than_a_step_gets_a_step_of_its_own() -> None:
    """A wide schema, a wide batch or a large one cannot be checked in parts: the step before
    it stops and says so (``heavy_next``), and the executor runs the next one in a thread."""
    wide = pa.schema([(f"c{i}", pa.int8()) for i in range(8000)])
    columns = [pa.array([1], pa.int8())] * 8000
    sent = messages(ipc_chunks([pa.record_batch(columns, schema=wide)] * 2, wide))
    assert min(map(len, sent[:2])) * METADATA_WEIGHT > STEP_BYTES  # headers over 256 KiB
    guard = ResultGuard(None, None)
    guard.start(sent[0])
    assert guard.step() is None and guard.heavy_next and guard.rows == 0
    assert guard.step(heavy=True) == sent[0] and not guard.heavy_next
    guard.start(b"".join(sent[1:]))  # two heavy batches and the end
    for rows in (1, 2):  # each in a heavy step of its own
        assert guard.step() is None and guard.heavy_next
        assert guard.step(heavy=True) is None and guard.rows == rows
    assert guard.step() == b"".join(sent[1:]) and guard.ended
    light = messages(duckdb_chunks(VALID_SQL["ints"]))
    guard = ResultGuard(None, None)
    guard.start(b"".join(light))
    assert guard.step() == b"".join(light) and not guard.heavy_next


def test_a_result_too_wide_to_decode_off_the_loop_is_the_querys_error() -> None:
    """pyarrow holds the GIL while it builds a schema: 249,000 fields stalled the event loop
    250 ms even from a worker thread. Counted from the flatbuffer, before pyarrow reads it."""
    nested = pa.struct([(f"f{i}", pa.int8()) for i in range(MAX_FIELDS // 2)])
    schema = pa.schema([("a", nested), ("b", nested)])  # MAX_FIELDS + 2 fields
    guard = ResultGuard(None, None)
    with pytest.raises(SqlError, match=f"more than {MAX_FIELDS} columns"):
        guard.feed(messages(ipc_chunks([], schema))[0])
    fits = pa.schema([("a", nested), ("b", pa.int8())])
    assert ResultGuard(None, None).feed(messages(ipc_chunks([], fits))[0])


def test_a_split_message_is_joined_once_and_passed_on_without_another_copy() -> None:
    sent = messages(duckdb_chunks(VALID_SQL["strings"]))
    guard = ResultGuard(None, None)
    guard.feed(sent[0])
    half = len(sent[1]) // 2
    assert guard.feed(sent[1][:half]) == b""
    assert guard.feed(sent[1][half:]) == sent[1]
