"""A statement's whole result written to a Parquet or CSV file under the operator's directory.

The result is not bounded for the model (only by the policy's result limits, as any query):
it streams from the session to a hidden partial file that is renamed into place when the
statement succeeded, so a reader never sees half a file and a failed export leaves nothing.
The agent names the file; the name is one plain file name, never a path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq

from ..errors import DuckcellError
from .stream import IpcDecoder

Format = Literal["parquet", "csv"]
# With ``max_bytes``, the result (Arrow IPC) may be this many times the file's cap before the
# export stops while it is written, not after: Parquet and CSV rarely shrink a result further.
_RESULT_PER_FILE_BYTE = 8
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ExportError(DuckcellError):
    """The export cannot be written where asked (no directory, a bad name, a file there)."""


@dataclass(frozen=True, slots=True)
class Exported:
    path: Path
    rows: int
    bytes: int
    columns: list[str]


class Exports:
    """Files under ``directory`` (None: exports are off; the error says how to turn them on).
    ``max_bytes`` bounds a file (the HTTP endpoint hands files over as MCP resources, whole
    and base64-encoded in one message)."""

    def __init__(self, directory: Path | None, *, max_bytes: int | None = None) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    def existing(self, name: str) -> Path:
        """The exported file ``name`` (as ``write`` named it); raises ``ExportError``."""
        if self.directory is None or not _NAME.fullmatch(name) or ".." in name:
            raise ExportError(f"no export named {name[:140]!r}")
        path = self.directory / name
        if not path.is_file():
            raise ExportError(f"no export named {name!r} in this conversation")
        return path

    def target(self, name: str, fmt: Format, *, overwrite: bool = False) -> Path:
        if self.directory is None:
            raise ExportError(
                "exports are off: the operator starts `duckcell mcp --export-dir DIR` to allow them"
            )
        suffix = f".{fmt}"
        if not name.endswith(suffix):
            name += suffix
        if not _NAME.fullmatch(name) or ".." in name:
            raise ExportError(
                f"file name {name[:140]!r} is not allowed: use letters, digits, '.', '_' and "
                "'-' (at most 128), no directories"
            )
        path = self.directory / name
        if path.exists() and not overwrite:
            raise ExportError(f"{name} exists already: choose another name or set overwrite")
        return path

    def _check_size(self, partial: Path) -> None:
        size = partial.stat().st_size
        if self.max_bytes is not None and size > self.max_bytes:
            cap = self.max_bytes / 2**20
            raise ExportError(
                f"the export passed {size / 2**20:.1f} MiB, more than the {cap:.0f} MiB an "
                "export may hold here: filter or aggregate it in SQL"
            )

    async def write(self, chunks: AsyncIterator[bytes], path: Path, fmt: Format) -> Exported:
        """Stream ``chunks`` (one statement's IPC bytes) into ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        decoder = IpcDecoder()
        writer: _Writer | None = None
        rows = received = 0
        # Readable by the operator's user only, from its first byte (the writer opens it again
        # and keeps the mode): the results of a conversation are not every local user's.
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        try:
            async with contextlib.aclosing(chunks) as stream:  # type: ignore[type-var]
                async for chunk in stream:
                    received += len(chunk)
                    if (
                        self.max_bytes is not None
                        and received > _RESULT_PER_FILE_BYTE * self.max_bytes
                    ):
                        raise ExportError(
                            f"the result passed {received / 2**20:.0f} MiB, more than an export of "
                            f"at most {self.max_bytes / 2**20:.0f} MiB may hold here: filter or "
                            "aggregate it in SQL"
                        )
                    for batch in decoder.feed(chunk):
                        if writer is None:
                            writer = _Writer(partial, batch.schema, fmt)
                        await asyncio.to_thread(writer.write, batch)
                        rows += batch.num_rows
                        # The file itself, too: a CSV of dictionary-encoded text can be a
                        # thousand times its IPC (each row writes the whole label).
                        self._check_size(partial)
            decoder.finish()
            if writer is None:  # no batch: the file still has the columns
                assert decoder.schema is not None  # finish() checked it
                writer = _Writer(partial, decoder.schema, fmt)
            await asyncio.to_thread(writer.close)
            self._check_size(partial)
            os.replace(partial, path)
        except BaseException:
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            partial.unlink(missing_ok=True)
            raise
        schema = decoder.schema
        names = schema.names if schema is not None else []
        return Exported(path, rows, path.stat().st_size, names)


class _Writer:
    def __init__(self, path: Path, schema: pa.Schema, fmt: Format) -> None:
        self._parquet = pq.ParquetWriter(path, schema) if fmt == "parquet" else None
        self._csv = pa.csv.CSVWriter(str(path), schema) if fmt == "csv" else None

    def write(self, batch: pa.RecordBatch) -> None:
        if self._parquet is not None:
            self._parquet.write_batch(batch)
        elif self._csv is not None:
            self._csv.write_batch(batch)

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()
