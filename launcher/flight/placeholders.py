"""A statement's parameter placeholders, found without running or parsing it in DuckDB.

Flight SQL clients bind parameters by position (ADBC: columns "0", "1", ...) or by name (the
Altertable client's ``prepare(...).query(parameters={"id": 42})``: a column ``id`` for a
``$id`` placeholder). The sandbox binds one row of values by position, so a statement with
named placeholders is rewritten here: each ``$name`` becomes ``$k`` (the position of the
name's first use), and the bound columns are put in that order (``Placeholders.order``).
Only placeholder tokens change; the text between them is kept byte for byte.

The scan skips string literals ('...', E'...'), quoted identifiers ("..."), dollar-quoted
strings ($tag$...$tag$) and comments (-- and /* */), so a ``?`` or ``$x`` inside them is not a
placeholder. ``count`` (how many values the statement takes) also tells ``GetFlightInfo``
whether an unbound prepared statement must wait for its parameters (``service.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_NAMED = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_NUMBERED = re.compile(r"\$([0-9]+)")
_IDENTIFIER_CHAR = re.compile(r"[A-Za-z0-9_]")


@dataclass(frozen=True, slots=True)
class Placeholders:
    """``sql`` with named placeholders made positional; ``names`` in position order (empty:
    the statement binds by position), ``count`` the number of values it takes."""

    sql: str
    names: tuple[str, ...] = ()
    count: int = 0

    def order(self, columns: list[str]) -> list[int] | None:
        """The column index of each value in position order for bound ``columns`` (``None``:
        take them as they come); raises ``KeyError`` naming a placeholder no column binds."""
        if not self.names:
            return None
        index = {name: i for i, name in enumerate(columns)}
        missing = [name for name in self.names if name not in index]
        if missing:
            raise KeyError(missing[0])
        return [index[name] for name in self.names]


def scan(sql: str) -> Placeholders:
    """The placeholders of ``sql`` (see the module docstring)."""
    positional = 0
    numbers: set[int] = set()
    names: list[str] = []
    pieces: list[str] = []
    start = i = 0
    length = len(sql)
    while i < length:
        char = sql[i]
        if char == "'" or char == '"':
            # E'...' takes backslash escapes (\' is a quote inside it), unless E ends a word.
            escapes = (
                char == "'"
                and i > 0
                and sql[i - 1] in "eE"
                and not (i > 1 and _IDENTIFIER_CHAR.match(sql[i - 2]))
            )
            i = _closing(sql, i + 1, char, backslash=escapes)
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = length if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = length if end < 0 else end + 2
        elif char == "?":
            positional += 1
            i += 1
        elif char == "$" and not (i and _IDENTIFIER_CHAR.match(sql[i - 1])):
            quote = _DOLLAR_QUOTE.match(sql, i)
            numbered = _NUMBERED.match(sql, i)
            named = _NAMED.match(sql, i)
            if quote is not None:
                end = sql.find(quote.group(0), quote.end())
                i = length if end < 0 else end + len(quote.group(0))
            elif numbered is not None:
                numbers.add(int(numbered.group(1)))
                i = numbered.end()
            elif named is not None:
                name = named.group(1)
                if name not in names:
                    names.append(name)
                pieces.append(sql[start:i] + f"${names.index(name) + 1}")
                i = start = named.end()
            else:
                i += 1
        else:
            i += 1
    if not names:
        return Placeholders(sql, (), positional + max(numbers, default=0))
    if positional or numbers:  # mixed: leave it to DuckDB, which refuses it with its message
        return Placeholders(sql, (), positional + max(numbers, default=0) + len(names))
    return Placeholders("".join(pieces) + sql[start:], tuple(names), len(names))


def _closing(sql: str, i: int, quote: str, *, backslash: bool = False) -> int:
    """The index after the quote that closes a literal opened before ``i`` (doubled quotes
    are part of it; with ``backslash``, so is any character after a backslash)."""
    escape = -1  # the next backslash at or after i; len(sql) when there is none
    while True:
        end = sql.find(quote, i)
        if backslash:
            if escape < i:  # searched again only once passed: linear in the literal
                found = sql.find("\\", i)
                escape = len(sql) if found < 0 else found
            if escape < len(sql) and (end < 0 or escape < end):
                i = escape + 2
                continue
        if end < 0:
            return len(sql)
        if sql.startswith(quote * 2, end):
            i = end + 2
            continue
        return end + 1
