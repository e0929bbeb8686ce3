"""Render an Arrow table for a person or a program: table, csv, json or parquet."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import DuckcellError

FORMATS = ("table", "csv", "json", "parquet")
_CELL_WIDTH = 40
_TABLE_ROWS = 1000


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    text = value.hex() if isinstance(value, bytes) else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def render_table(table: pa.Table) -> str:
    """A boxed text table like DuckDB's CLI prints; long results show their first rows."""
    names = table.column_names
    rows = table.slice(0, _TABLE_ROWS).to_pylist()
    cells = [[_cell(row[name]) for name in names] for row in rows]
    types = [str(field.type) for field in table.schema]
    widths = [
        max([len(name), len(kind), *(len(r[i]) for r in cells)])
        for i, (name, kind) in enumerate(zip(names, types, strict=True))
    ]

    def line(values: Iterable[str], left: str, mid: str, right: str) -> str:
        return left + mid.join(f" {v:<{w}} " for v, w in zip(values, widths, strict=True)) + right

    bar = "─"
    out = [
        "┌" + "┬".join(bar * (w + 2) for w in widths) + "┐",
        line(names, "│", "│", "│"),
        line(types, "│", "│", "│"),
        "├" + "┼".join(bar * (w + 2) for w in widths) + "┤",
        *(line(r, "│", "│", "│") for r in cells),
        "└" + "┴".join(bar * (w + 2) for w in widths) + "┘",
    ]
    shown = f"{len(rows)} of {table.num_rows}" if table.num_rows > len(rows) else table.num_rows
    out.append(f"({shown} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(out) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def check_output(output: Path | None) -> None:
    """Refuse an ``--output`` that cannot be written, before the query runs (DuckcellError)."""
    if output is None:
        return
    folder = output.parent  # Path("x").parent is Path(".")
    if output.is_dir():
        raise DuckcellError(f"--output {output}: is a directory; name a file")
    if not folder.is_dir():
        raise DuckcellError(f"--output {output}: directory {folder} does not exist")
    # An existing file is truncated in place (no new entry in its folder): only it must be
    # writable, as /dev/null is.
    writable = (
        os.access(output, os.W_OK) if output.exists() else os.access(folder, os.W_OK | os.X_OK)
    )
    if not writable:
        raise DuckcellError(f"--output {output}: not writable by this user")


def write_result(
    table: pa.Table, fmt: str, output: Path | None, stdout: IO[str] | None = None
) -> None:
    stdout = stdout or sys.stdout
    if fmt == "parquet":
        if output is None:
            raise ValueError("--format parquet needs --output FILE")
        try:
            pq.write_table(table, output)
        except OSError as error:
            raise DuckcellError(f"--output {output}: cannot write it ({error})") from None
        return
    if fmt == "table":
        text = render_table(table)
    elif fmt == "csv":
        buffer = io.BytesIO()
        pacsv.write_csv(table, buffer)
        text = buffer.getvalue().decode()
    elif fmt == "json":
        text = json.dumps(table.to_pylist(), default=_json_default, ensure_ascii=False) + "\n"
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if output is None:
        stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as error:
        raise DuckcellError(f"--output {output}: cannot write it ({error.strerror})") from None
