"""How every benchmark path times a result: from the call to the last Arrow IPC chunk decoded.

The same consumer for the local path (in the bench's process) and for a control-plane client
(in ``client_process``), so two paths differ only in how the chunks arrive.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc

from bench.stats import MachineCpu

NO_CPU = MachineCpu(0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Transfer:
    seconds: float
    first_chunk: float
    bytes: int
    rows: int
    chunks: int
    cpu: MachineCpu = NO_CPU  # what the whole machine spent meanwhile


async def consume(chunks: AsyncIterator[bytes]) -> Transfer:
    """Collect a result's IPC chunks, decode them with pyarrow, and count bytes and rows."""
    started = time.perf_counter()
    parts: list[bytes] = []
    first = started
    async for chunk in chunks:
        if not parts:
            first = time.perf_counter()
        parts.append(chunk)
    rows = pa.ipc.open_stream(b"".join(parts)).read_all().num_rows
    size = sum(len(part) for part in parts)
    return Transfer(time.perf_counter() - started, first - started, size, rows, len(parts))
