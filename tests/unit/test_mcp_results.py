"""Result bounds, DuckDB type names and the piecewise IPC decoder of the MCP server (pure)."""

from __future__ import annotations

import datetime
import decimal
import json

import pyarrow as pa
import pyarrow.ipc
import pytest

from launcher.mcp.results import Bounds, ResultBuilder, duckdb_type, text_table
from launcher.mcp.stream import IpcDecoder


def _stream(table: pa.Table, batch_rows: int = 1000) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("piece", [1, 7, 4096, 10**8])
def test_decoder_reads_a_stream_cut_anywhere_with_dictionaries(piece: int) -> None:
    table = pa.table(
        {"i": list(range(5000)), "zone": pa.array(["a", "b"] * 2500).dictionary_encode()}
    )
    data = _stream(table)
    decoder = IpcDecoder()
    batches = []
    for at in range(0, len(data), piece):
        batches += decoder.feed(data[at : at + piece])
    decoder.finish()
    assert decoder.ended
    assert pa.Table.from_batches(batches).to_pydict() == {
        "i": list(range(5000)),
        "zone": ["a", "b"] * 2500,
    }


def test_decoder_says_a_stream_that_stopped_inside_a_message() -> None:
    data = _stream(pa.table({"i": list(range(100))}))
    decoder = IpcDecoder()
    decoder.feed(data[: len(data) // 2])
    with pytest.raises(Exception, match="ended inside a message"):
        decoder.finish()


def _built(table: pa.Table, bounds: Bounds) -> ResultBuilder:
    builder = ResultBuilder(bounds)
    for batch in table.to_batches(max_chunksize=100):
        if not builder.add(batch):
            break
    return builder


def test_rows_are_cut_at_max_rows_and_counted_to_the_end() -> None:
    result = _built(pa.table({"i": list(range(1000))}), Bounds(max_rows=10)).result(0.5)
    assert result["rows"] == [[i] for i in range(10)]
    assert result["total_rows"] == 1000 and result["truncated"]
    assert "first 10 rows" in result["truncation"]
    assert result["columns"] == [{"name": "i", "type": "BIGINT"}]


def test_rows_are_cut_at_max_chars_and_long_cells_are_shortened() -> None:
    table = pa.table({"s": ["x" * 1000] * 500})
    bounds = Bounds(max_rows=500, max_chars=2000, max_cell_chars=50)
    result = _built(table, bounds).result(0.0)
    assert len(json.dumps(result["rows"], ensure_ascii=False)) <= 2000
    assert all(len(row[0]) == 51 for row in result["rows"])  # 50 and the ellipsis
    assert "2000 characters" in result["truncation"]
    assert "longer than 50" in result["truncation"]


def test_a_whole_small_result_is_not_truncated() -> None:
    result = _built(pa.table({"i": [1, 2]}), Bounds()).result(0.1)
    assert not result["truncated"] and result["truncation"] is None
    assert result["total_rows"] == 2
    assert text_table(result, 1000).splitlines() == ["i", "1", "2", "(2 of 2 row(s) shown; 0.1 s)"]


def test_counting_stops_at_the_count_limit_and_the_total_is_unknown() -> None:
    builder = _built(pa.table({"i": list(range(10_000))}), Bounds(max_rows=5, count_limit=1000))
    result = builder.result(0.0, stopped="counting stopped after more than 1000 rows")
    assert result["total_rows"] is None and result["counted_rows"] == 1100  # one batch past
    assert "at least 1100" in text_table(result, 500)


def test_a_result_of_exactly_the_count_limit_is_counted_whole() -> None:
    builder = _built(pa.table({"i": list(range(1000))}), Bounds(max_rows=5, count_limit=1000))
    result = builder.result(0.0)
    assert result["total_rows"] == 1000 and result["truncated"]


def test_cells_become_json() -> None:
    table = pa.table(
        {
            "d": pa.array([decimal.Decimal("1.50")], pa.decimal128(18, 2)),
            "t": [datetime.datetime(2024, 1, 2, 3, 4, 5)],
            "b": [b"\x00\x01"],
            "f": [float("nan")],
            "l": [[1, 2]],
        }
    )
    (row,) = _built(table, Bounds()).result(0.0)["rows"]
    assert row == ["1.50", "2024-01-02T03:04:05", "base64:AAE=", "nan", [1, 2]]
    json.dumps(row)


@pytest.mark.parametrize(
    ("arrow", "name"),
    [
        (pa.int32(), "INTEGER"),
        (pa.int64(), "BIGINT"),
        (pa.uint8(), "UTINYINT"),
        (pa.float64(), "DOUBLE"),
        (pa.string(), "VARCHAR"),
        (pa.large_string(), "VARCHAR"),
        (pa.binary(), "BLOB"),
        (pa.date32(), "DATE"),
        (pa.timestamp("us"), "TIMESTAMP"),
        (pa.timestamp("us", tz="UTC"), "TIMESTAMP WITH TIME ZONE"),
        (pa.timestamp("ns"), "TIMESTAMP_NS"),
        (pa.time64("us"), "TIME"),
        (pa.decimal128(18, 3), "DECIMAL(18,3)"),
        (pa.list_(pa.int32()), "INTEGER[]"),
        (pa.list_(pa.float64(), 3), "DOUBLE[3]"),
        (pa.struct([("a", pa.int8()), ("b c", pa.string())]), 'STRUCT(a TINYINT, "b c" VARCHAR)'),
        (pa.map_(pa.string(), pa.int64()), "MAP(VARCHAR, BIGINT)"),
        (pa.dictionary(pa.int8(), pa.string()), "VARCHAR"),
        (pa.month_day_nano_interval(), "INTERVAL"),
        (pa.bool_(), "BOOLEAN"),
    ],
)
def test_duckdb_type_names(arrow: pa.DataType, name: str) -> None:
    assert duckdb_type(arrow) == name


def test_bounds_refuse_zero() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        Bounds(max_rows=0)
