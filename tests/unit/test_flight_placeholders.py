"""Parameter placeholders found by ``launcher.flight.placeholders.scan`` (pure logic)."""

from __future__ import annotations

import pytest

from launcher.flight.placeholders import Placeholders, scan


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT 1", Placeholders("SELECT 1", (), 0)),
        ("SELECT ?, ?", Placeholders("SELECT ?, ?", (), 2)),
        ("SELECT $1, $2, $1", Placeholders("SELECT $1, $2, $1", (), 2)),
        ("SELECT $id + $x, $id", Placeholders("SELECT $1 + $2, $1", ("id", "x"), 2)),
        # Not placeholders: literals, quoted identifiers, dollar quotes, comments, a$b.
        ("SELECT '?', \"$a\", $$ ? $x $$, a$b -- ?\n, /* $y */ ?", None),
        ("SELECT $tag$ $x $tag$, $y", Placeholders("SELECT $tag$ $x $tag$, $1", ("y",), 1)),
        ("SELECT 'it''s ?', ?", Placeholders("SELECT 'it''s ?', ?", (), 1)),
        # Mixed: left as written for DuckDB to refuse.
        ("SELECT $a, ?", Placeholders("SELECT $a, ?", (), 2)),
    ],
)
def test_placeholders(sql: str, expected: Placeholders | None) -> None:
    found = scan(sql)
    if expected is None:
        assert found == Placeholders(sql, (), 1)
    else:
        assert found == expected


def test_named_values_are_taken_by_name() -> None:
    placeholders = scan("SELECT $b - $a")
    assert placeholders.order(["a", "b"]) == [1, 0]
    with pytest.raises(KeyError, match="b"):
        placeholders.order(["a"])
    assert scan("SELECT ?").order(["whatever"]) is None


@pytest.mark.parametrize(
    ("sql", "count"),
    [
        ("SELECT E'\\'', ?", 1),  # \' inside E'...' is a quote, not the end
        ("SELECT e'a\\\\', ?", 1),  # an escaped backslash, then the end
        ("SELECT 'x\\', ?", 1),  # a plain string: the backslash is a character
        ("SELECT name'x', ?", 1),  # E at the end of a word opens no E-string
    ],
)
def test_backslash_escapes_only_in_e_strings(sql: str, count: int) -> None:
    assert scan(sql).count == count
