"""``SqlParser`` for tests that are not about parsing: DuckDB's parse, in the test's process.

The worker and the control plane parse in child processes (``launcher.model.sql.ParserPool``, tested
in ``tests/unit/test_sql_pool.py`` and the integration tier); a test of what the data path or
the router does with a parse needs only its answer, and no processes to start and stop.
"""

from __future__ import annotations

from launcher.model.sql import ParsedSql, check_statement
from launcher.model.sql.tables import analyze


class InlineParser:
    """Parses in this process, with the same size limit; ``parsed`` lists the SQL it saw."""

    def __init__(self) -> None:
        self.parsed: list[str] = []

    async def parse(self, sql: str) -> ParsedSql:
        check_statement(sql)
        self.parsed.append(sql)
        return analyze(sql)
