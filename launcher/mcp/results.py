"""A query result cut to fit a model's context: bounded rows and characters, typed columns.

An agent client reads a tool's whole answer into the model's context, and common clients
refuse one of more than 25,000 tokens. ``ResultBuilder`` keeps the first rows that fit both
bounds (``Bounds.max_rows`` and ``Bounds.max_chars`` of row JSON; a long cell is cut at
``max_cell_chars``), goes on counting the rest up to ``count_limit`` rows so the agent learns
how big the result really is, and says whether and why it was cut. The defaults keep an
answer near 5,000 tokens: the structured rows plus a short text table of the first of them.

Column types are DuckDB's names for the Arrow types the sandbox sent (``duckdb_type``): what
an agent writes back in SQL (``BIGINT``, ``DECIMAL(18,3)``, ``VARCHAR[]``).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.types as pat

# One JSON-safe value (what a cell becomes).
Json = Any


DEFAULT_MAX_ROWS = 100
DEFAULT_MAX_CHARS = 12_000


@dataclass(frozen=True, slots=True)
class Bounds:
    """What one answer may hold. ``max_chars`` counts the rows' JSON; ``text_chars`` the text
    table; ``count_limit`` how many rows are counted before the count gives up."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_chars: int = DEFAULT_MAX_CHARS
    max_cell_chars: int = 200
    text_chars: int = 3_000
    count_limit: int = 1_000_000

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_chars", "max_cell_chars", "text_chars", "count_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(slots=True)
class ResultBuilder:
    """Feed decoded batches in order (``add``); ``result`` is the answer. ``add`` returns
    False once nothing more is needed (the count passed ``count_limit``): stop reading."""

    bounds: Bounds
    schema: pa.Schema | None = None
    rows: list[list[Json]] = field(default_factory=list)
    total_rows: int = 0
    _chars: int = 0
    _cut: str | None = None
    _cells_cut: bool = False

    def add(self, batch: pa.RecordBatch) -> bool:
        if self.schema is None:
            self.schema = batch.schema
        if self._cut is None:
            self._keep(batch)
        self.total_rows += batch.num_rows
        # Past the limit, not at it: a result of exactly ``count_limit`` rows is read to its
        # end and counted whole.
        return self.total_rows <= self.bounds.count_limit

    def _keep(self, batch: pa.RecordBatch) -> None:
        bounds = self.bounds
        room = bounds.max_rows - len(self.rows)
        for row in batch.slice(0, room).to_pylist():
            values = [self._json(value) for value in row.values()]
            size = len(json.dumps(values, ensure_ascii=False)) + 2  # and ", "
            if self._chars + size > bounds.max_chars:
                self._cut = f"the rows passed {bounds.max_chars} characters"
                return
            self.rows.append(values)
            self._chars += size
        if batch.num_rows > room:
            self._cut = f"only the first {bounds.max_rows} rows are returned"

    def _json(self, value: object) -> Json:
        cut = self.bounds.max_cell_chars
        converted = to_json(value)
        if isinstance(converted, str) and len(converted) > cut:
            self._cells_cut = True
            return converted[:cut] + "…"
        if isinstance(converted, list | dict):
            text = json.dumps(converted, ensure_ascii=False)
            if len(text) > cut:
                self._cells_cut = True
                return text[:cut] + "…"
        return converted

    def result(self, elapsed_s: float, *, stopped: str | None = None) -> dict[str, Json]:
        """The structured answer. ``stopped`` says why reading ended before the result did
        (the count limit, or the policy's result limit): the total is then unknown."""
        schema = self.schema if self.schema is not None else pa.schema([])
        complete = stopped is None
        reasons = [r for r in (self._cut, stopped) if r]
        if self._cells_cut:
            reasons.append(f"cells longer than {self.bounds.max_cell_chars} characters are cut")
        return {
            "columns": [{"name": f.name, "type": duckdb_type(f.type)} for f in schema],
            "rows": self.rows,
            "returned_rows": len(self.rows),
            "total_rows": self.total_rows if complete else None,
            "counted_rows": self.total_rows,
            "truncated": bool(reasons),
            "truncation": "; ".join(reasons) or None,
            "elapsed_s": round(elapsed_s, 3),
        }


def text_table(result: dict[str, Json], max_chars: int) -> str:
    """A short text rendering of a structured answer, at most about ``max_chars``."""
    names = [column["name"] for column in result["columns"]]
    lines = [" | ".join(names)] if names else []
    shown = 0
    used = len(lines[0]) if lines else 0
    for row in result["rows"]:
        line = " | ".join("NULL" if v is None else _plain(v) for v in row)
        if used + len(line) + 1 > max_chars:
            break
        lines.append(line)
        used += len(line) + 1
        shown += 1
    total = result["total_rows"]
    of = f"{total}" if total is not None else f"at least {result['counted_rows']}"
    summary = f"({shown} of {of} row(s) shown"
    if result["truncation"]:
        summary += f"; truncated: {result['truncation']}"
    elif shown < result["returned_rows"]:
        summary += "; the structured result has them all"
    lines.append(summary + f"; {result['elapsed_s']} s)")
    return "\n".join(lines)


def _plain(value: Json) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def to_json(value: object) -> Json:
    """A cell as JSON: exact numbers stay numbers, others become their SQL-ish text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        # A whole DECIMAL (HUGEINT and sums of integers arrive so) stays a number.
        return int(value) if value.as_tuple().exponent == 0 else str(value)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return "base64:" + base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        # A MAP arrives as a list of (key, value) pairs.
        return [to_json(v) for v in value]
    return str(value)


_SIMPLE: dict[pa.DataType, str] = {
    pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.uint8(): "UTINYINT",
    pa.uint16(): "USMALLINT",
    pa.uint32(): "UINTEGER",
    pa.uint64(): "UBIGINT",
    pa.float16(): "FLOAT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.binary(): "BLOB",
    pa.large_binary(): "BLOB",
    pa.date32(): "DATE",
    pa.date64(): "DATE",
    pa.null(): "NULL",
    pa.month_day_nano_interval(): "INTERVAL",
}
_TIMESTAMPS = {"s": "TIMESTAMP_S", "ms": "TIMESTAMP_MS", "us": "TIMESTAMP", "ns": "TIMESTAMP_NS"}


def duckdb_type(arrow: pa.DataType) -> str:
    """DuckDB's name for the type its Arrow export produced (HUGEINT arrives as DECIMAL(38,0)
    and is named so; an unknown type keeps Arrow's name)."""
    if arrow in _SIMPLE:
        return _SIMPLE[arrow]
    if pat.is_timestamp(arrow):
        return "TIMESTAMP WITH TIME ZONE" if arrow.tz else _TIMESTAMPS[arrow.unit]
    if pat.is_time(arrow):
        return "TIME"
    if pat.is_decimal(arrow):
        return f"DECIMAL({arrow.precision},{arrow.scale})"
    if pat.is_dictionary(arrow):
        return duckdb_type(arrow.value_type)
    if pat.is_fixed_size_list(arrow):
        return f"{duckdb_type(arrow.value_type)}[{arrow.list_size}]"
    if pat.is_list(arrow) or pat.is_large_list(arrow):
        return f"{duckdb_type(arrow.value_type)}[]"
    if pat.is_map(arrow):
        return f"MAP({duckdb_type(arrow.key_type)}, {duckdb_type(arrow.item_type)})"
    if pat.is_struct(arrow):
        inner = ", ".join(f"{_quoted(f.name)} {duckdb_type(f.type)}" for f in arrow)
        return f"STRUCT({inner})"
    if pat.is_fixed_size_binary(arrow) and arrow.byte_width == 16:
        return "UUID"
    if isinstance(arrow, pa.ExtensionType):
        return duckdb_type(arrow.storage_type)
    return str(arrow).upper()


def _quoted(name: str) -> str:
    return name if name.isidentifier() else '"' + name.replace('"', '""') + '"'
