"""The parse itself (run in the parser processes): long IN lists are condensed before DuckDB
serialises them, and that never changes which tables a statement reads or what it says."""

from __future__ import annotations

import pytest

from launcher.errors import SqlError
from launcher.model.sql.tables import CONDENSE_ABOVE, _condensed, analyze

IDS = ", ".join(str(i) for i in range(4000))  # long enough to be condensed
NAMES = ", ".join(f"'n{i}'" for i in range(3000))


@pytest.mark.parametrize(
    ("sql", "condensed"),
    [
        ("SELECT * FROM t WHERE x IN (1, -2, +3.5, 'a''b')", "SELECT * FROM t WHERE x IN (1)"),
        (
            "SELECT * FROM t WHERE x NOT IN ('a', 'b') OR y IN (3)",
            "SELECT * FROM t WHERE x NOT IN ('a') OR y IN (3)",
        ),
        ("SELECT * FROM t WHERE x IN (1, y, 2)", None),  # not constants only
        ("SELECT * FROM 'a.parquet', 'b.parquet'", None),  # tables, even if strings
        ("SELECT * FROM t WHERE x IN (SELECT 1, 2 FROM u)", None),
        ("SELECT * FROM (VALUES (1, 2), (3, 4)) v(a, b)", None),
        ("SELECT * FROM t WHERE x IN (1, 2 -- two\n)", None),
    ],
)
def test_only_in_lists_of_constants_are_condensed(sql: str, condensed: str | None) -> None:
    assert _condensed(sql) == (sql if condensed is None else condensed)


@pytest.mark.parametrize(
    ("sql", "tables"),
    [
        (f"SELECT * FROM trips WHERE id IN ({IDS})", {"trips"}),
        (
            f"SELECT * FROM trips WHERE id IN ({NAMES}) AND z IN (SELECT z FROM zones)",
            {"trips", "zones"},
        ),
        (f"WITH c AS (SELECT 1) SELECT * FROM c, t WHERE id NOT IN ({IDS})", {"t"}),
        (f"SELECT * FROM 'trips', 'zones' WHERE id IN ({IDS})", {"trips", "zones"}),
        (f"SELECT * FROM a WHERE id IN ({IDS}); SELECT * FROM b WHERE i IN ({NAMES})", {"a", "b"}),
    ],
)
def test_a_long_statement_reads_the_tables_it_reads_as_written(sql: str, tables: set[str]) -> None:
    assert len(sql) > CONDENSE_ABOVE
    assert analyze(sql).tables == tables


def test_a_long_statement_that_does_not_parse_gets_duckdbs_message_on_its_own_text() -> None:
    with pytest.raises(SqlError, match=r"(?s)syntax error at or near \"ORDERR\".*3999\) ORDERR"):
        analyze(f"SELECT * FROM trips WHERE id IN ({IDS}) ORDERR BY 1")
    with pytest.raises(SqlError, match="Parser Error: Max expression depth"):
        analyze("SELECT " + "+".join(["1"] * 20_000))
