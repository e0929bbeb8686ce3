"""SQL as duckcell reads it before running it: size limit, parse, tables, statements.

``pool`` is what the worker, the control plane and the CLI use: ``check_statement`` (the size
limit, checked first at every entry) and ``ParserPool`` (``SqlParser``: DuckDB's parse in
child processes, time- and memory-bounded, cached). ``parsed`` is the answer as plain data.
``tables`` is the parse itself, run in the children; ``child`` is one child process.
"""

from .parsed import ParsedSql, Statement, Token
from .pool import MAX_STATEMENT_BYTES, ParserPool, SqlParser, check_statement

__all__ = [
    "MAX_STATEMENT_BYTES",
    "ParsedSql",
    "ParserPool",
    "SqlParser",
    "Statement",
    "Token",
    "check_statement",
]
