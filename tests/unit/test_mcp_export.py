"""An export's cap holds for the file as it is written, not only for the result streamed in."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from launcher.mcp.export import ExportError, Exports


def _chunks(table: pa.Table) -> AsyncIterator[bytes]:
    async def stream() -> AsyncIterator[bytes]:
        sink = pa.BufferOutputStream()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=1000)
        yield sink.getvalue().to_pybytes()

    return stream()


def test_a_csv_much_larger_than_its_result_stops_at_the_cap_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    """100,000 rows of one dictionary value of 1,000 characters: ~100 kB of IPC, ~100 MB as
    CSV. With a 1 MiB cap the export stops once the file passes it (not at 100 MB)."""
    label = pa.array(["x" * 1000]).dictionary_encode()
    table = pa.table(
        {"v": pa.DictionaryArray.from_arrays(pa.array([0] * 100_000), label.dictionary)}
    )
    exports = Exports(tmp_path, max_bytes=1 << 20)
    target = exports.target("big", "csv")
    with pytest.raises(ExportError, match="more than the 1 MiB an export may hold") as refused:
        asyncio.run(exports.write(_chunks(table), target, "csv"))
    written = re.search(r"passed ([0-9.]+) MiB", str(refused.value))
    assert written is not None and float(written.group(1)) < 2  # stopped near the cap
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial
