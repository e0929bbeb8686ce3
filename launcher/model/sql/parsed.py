"""What DuckDB's parser says about a SQL text, as plain data that crosses a pipe.

``launcher.model.sql.tables`` fills a ``ParsedSql`` in a parser process; ``launcher.model.sql.pool``
reads it back in the worker or control plane, which never import DuckDB. Every rule that depends on
the SQL (the role's tables, pins, which catalog tables to fetch, whether it writes, whether it
changes data) is a pure function of this value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

# A request or an answer on a parser process's pipes: its length (4 bytes, big-endian), then
# its bytes (the SQL text in UTF-8; the answer in JSON).
HEADER = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Token:
    """One token of DuckDB's tokenizer: its span in the statement, kind and text."""

    start: int
    end: int
    kind: str  # identifier, numeric_const, string_const, operator, keyword, comment
    text: str


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a SQL text.

    ``copy_to`` is set for a ``COPY ... TO``: the tokens after its top-level TO (the
    destination and the options), which ``launcher.data.writes`` checks. ``text`` is the
    statement as DuckDB split it, kept only when the SQL has a ``COPY ... TO`` (a write is
    rewritten from it); otherwise empty, so a large SELECT does not cross the pipe twice.
    """

    kind: str  # DuckDB's statement type: SELECT, INSERT, COPY, EXPLAIN, ...
    copy_to: tuple[Token, ...] | None = None
    text: str = ""


@dataclass(frozen=True, slots=True)
class ParsedSql:
    """The table names a SQL text reads or writes, as written (CTE names left out), and its
    statements in order."""

    tables: frozenset[str]
    statements: tuple[Statement, ...]

    def to_doc(self) -> dict[str, object]:
        """This value as JSON-ready data (``from_doc`` reads it back)."""
        statements = [
            {
                "kind": s.kind,
                "text": s.text,
                "copy_to": None
                if s.copy_to is None
                else [[t.start, t.end, t.kind, t.text] for t in s.copy_to],
            }
            for s in self.statements
        ]
        return {"tables": sorted(self.tables), "statements": statements}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> ParsedSql:
        statements = tuple(
            Statement(
                kind=str(s["kind"]),
                text=str(s["text"]),
                copy_to=None
                if s["copy_to"] is None
                else tuple(Token(int(a), int(b), str(k), str(t)) for a, b, k, t in s["copy_to"]),
            )
            for s in doc["statements"]
        )
        return cls(frozenset(str(name) for name in doc["tables"]), statements)
