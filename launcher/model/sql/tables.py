"""Which tables a SQL text names, and what its statements are, found by DuckDB's own parser.

This module runs in the parser processes of ``launcher.model.sql.pool`` (``python -m
launcher.model.sql.tables``), never in a worker or control plane: parsing a statement of a few
megabytes costs DuckDB seconds and gigabytes, which must not stall or bloat a long-lived
process. It reads requests on stdin and answers on stdout (``serve``); tests call ``analyze``
directly.

The control plane uses the answer to place a query (pinned connections) and to check a role's
tables; the worker to decide which catalog tables to fetch and bind, and whether the query
writes. Both must agree, so there is one function. It parses on a private, locked DuckDB
connection that holds no data and can touch no file on the host.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

import duckdb

from launcher.errors import SqlError
from launcher.model.sql.parsed import HEADER, ParsedSql, Statement, Token

_PARSER_CONFIG = {"autoload_known_extensions": False, "autoinstall_known_extensions": False}
_PARSER_LOCKDOWN = (
    "SET allowed_directories = ['/scratch/']",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)
_T = duckdb.token_type
# Statements longer than this (characters) have their IN lists condensed before they are
# serialised (``_condensed``); shorter ones cost well under a millisecond as written.
CONDENSE_ABOVE = 16 * 1024
_IN_LIST = re.compile(r"\bin\s*\(", re.IGNORECASE)  # no such text, nothing to condense
NESTED_TOO_DEEPLY = (
    "the statement is nested too deeply to find the tables it reads; flatten its subqueries "
    "or expressions"
)


def analyze(sql: str) -> ParsedSql:
    """The tables ``sql`` reads or writes (as written, CTE names left out) and its statements.

    SELECTs go through DuckDB's JSON serialisation of their parse tree: a pure parse, exact;
    a text of SELECTs only is serialised in one pass (a long one with its IN lists of
    constants cut short first, see ``_condensed``). Other statements (CREATE ... AS,
    INSERT, COPY, EXPLAIN) have no such serialisation, so ``get_table_names`` binds them, on
    a private connection that can touch no file on this host (writes bind only against
    /scratch, as in a sandbox). Binding fails where a statement names a session's temp table
    or joins USING columns of unknown tables; such a statement falls back to every identifier
    DuckDB's tokenizer finds in it: a superset, which may bind a table the statement does not
    read but never misses one it does. Raises SqlError with DuckDB's message.
    """
    con = _parser()
    try:
        selects, answer = _select_trees(con, sql)
        if selects is not None:
            tables = set().union(*(_select_tables(tree) for tree in selects))
            return ParsedSql(frozenset(tables), tuple(Statement("SELECT") for _ in selects))
        if answer.get("error_type") == "parser" and "position" not in answer:
            # DuckDB's whole message (say, the expression depth limit): parsing the text a
            # second time through extract_statements would only double the cost.
            raise SqlError(f"Parser Error: {answer.get('error_message')}")
        return _analyze_each(con, sql)
    except duckdb.Error as error:
        raise SqlError(str(error)) from None


def table_names(sql: str) -> set[str]:
    """The table names ``sql`` reads or writes (``analyze``'s tables)."""
    return set(analyze(sql).tables)


def _analyze_each(con: duckdb.DuckDBPyConnection, sql: str) -> ParsedSql:
    """``analyze`` for a text with other statements than SELECTs, one statement at a time."""
    tables: set[str] = set()
    statements: list[Statement] = []
    texts: list[str] = []
    for statement in con.extract_statements(sql):
        tables |= _statement_tables(con, statement.query)
        kind = statement.type.name
        copy_to = _copy_to(statement.query) if kind == "COPY" else None
        statements.append(Statement(kind, copy_to))
        texts.append(statement.query)
    if any(s.copy_to is not None for s in statements):  # a write is rewritten from the texts
        statements = [
            Statement(s.kind, s.copy_to, text) for s, text in zip(statements, texts, strict=True)
        ]
    return ParsedSql(frozenset(tables), tuple(statements))


_connection: list[duckdb.DuckDBPyConnection] = []


def _parser() -> duckdb.DuckDBPyConnection:
    """The parsing connection: opening one costs ~20 ms, parsing well under 1 ms.

    It never holds data (nothing is executed on it but parsing and binding), so reusing it
    leaks nothing between queries.
    """
    if not _connection:
        con = duckdb.connect(":memory:", config=_PARSER_CONFIG)
        for statement in _PARSER_LOCKDOWN:
            con.execute(statement)
        _connection.append(con)
    return _connection[0]


def _select_trees(
    con: duckdb.DuckDBPyConnection, query: str
) -> tuple[list[object] | None, dict[str, Any]]:
    """The parse trees of ``query``'s statements when they are all SELECTs (else None), and
    DuckDB's answer (its error when it gave one). A long query is serialised condensed first,
    and as written when its condensed form does not parse."""
    long = len(query) > CONDENSE_ABOVE and _IN_LIST.search(query) is not None
    condensed = _condensed(query) if long else query
    answer = _serialized(con, condensed)
    if answer.get("error_type") == "parser" and condensed is not query:
        answer = _serialized(con, query)
    if answer.get("error"):
        return None, answer
    return list(answer.get("statements", [])), answer


def _serialized(con: duckdb.DuckDBPyConnection, query: str) -> dict[str, Any]:
    """DuckDB's JSON serialisation of ``query``: its parse tree, or ``error`` set (not a
    SELECT, or it does not parse) with ``error_type`` and ``error_message``."""
    row = con.execute("SELECT json_serialize_sql(?)", [query]).fetchone()
    answer = json.loads(row[0]) if row else {"error": True}
    return answer if isinstance(answer, dict) else {"error": True}


def _condensed(query: str) -> str:
    """``query`` with each ``IN (c1, c2, ...)`` list of constants cut to its first constant.

    Such a list names no table, but DuckDB serialises each constant as a JSON object: a
    0.9 MB list of ids made 20 MB of JSON and seconds of work. Only a list right after IN,
    closed right after its constants (numbers, with a sign or not, and strings), is cut;
    everything else stays as written, so no table reference can be lost.
    """
    raw = duckdb.tokenize(query)
    starts = [start for start, _ in raw] + [len(query)]
    words = [query[starts[i] : starts[i + 1]].strip() for i in range(len(raw))]
    kinds = [kind for _, kind in raw]

    def after_constant(i: int) -> int | None:
        if i < len(raw) and kinds[i] in (_T.numeric_const, _T.string_const):
            return i + 1
        signed = i + 1 < len(raw) and words[i] in ("-", "+")
        return i + 2 if signed and kinds[i + 1] == _T.numeric_const else None

    pieces, copied, i = [], 0, 0
    while i < len(raw) - 1:
        first = after_constant(i + 2) if words[i].upper() == "IN" and words[i + 1] == "(" else None
        if kinds[i] != _T.keyword or first is None:
            i += 1
            continue
        end = first
        while end < len(raw) and words[end] == ",":
            following = after_constant(end + 1)
            if following is None:
                break
            end = following
        if end > first and end < len(raw) and words[end] == ")":
            pieces.append(query[copied : starts[first]])
            copied = starts[end]
        i = end
    return "".join([*pieces, query[copied:]])


def _select_tables(tree: object) -> set[str]:
    tables: set[str] = set()
    ctes: set[str] = set()
    _walk(tree, tables, ctes)
    lowered = {cte.lower() for cte in ctes}
    return {name for name in tables if name.lower() not in lowered}


def _statement_tables(con: duckdb.DuckDBPyConnection, query: str) -> set[str]:
    selects, _ = _select_trees(con, query)
    if selects is not None:
        return set().union(*(_select_tables(tree) for tree in selects))
    try:  # not a SELECT
        return set(con.get_table_names(query))
    except (duckdb.CatalogException, duckdb.BinderException, duckdb.InvalidInputException):
        return set(_identifiers(query))


def _identifiers(query: str) -> Iterator[str]:
    """Every identifier token of a statement, unquoted ("a"."b" gives a and b)."""
    tokens = duckdb.tokenize(query)
    for i, (start, kind) in enumerate(tokens):
        if kind == _T.identifier:
            end = tokens[i + 1][0] if i + 1 < len(tokens) else len(query)
            word = query[start:end].strip()
            if len(word) >= 2 and word[0] == word[-1] == '"':
                word = word[1:-1].replace('""', '"')
            yield word


def _walk(node: object, tables: set[str], ctes: set[str]) -> None:
    """Collect BASE_TABLE names and CTE names anywhere in a serialised parse tree."""
    if isinstance(node, dict):
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            tables.add(node["table_name"])
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            ctes.update(entry["key"] for entry in cte_map.get("map", []))
        children: Iterable[object] = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return
    for child in children:
        _walk(child, tables, ctes)


def _tokens(query: str) -> list[Token]:
    """DuckDB's tokens of one statement, with their text; comments and the final ; left out."""
    raw = duckdb.tokenize(query)
    tokens = []
    for i, (start, kind) in enumerate(raw):
        end = raw[i + 1][0] if i + 1 < len(raw) else len(query)
        text = query[start:end].rstrip()
        if kind != _T.comment and not (kind == _T.operator and text == ";"):
            tokens.append(Token(start, start + len(text), kind.name, text))
    return tokens


def _copy_to(query: str) -> tuple[Token, ...] | None:
    """The tokens after a ``COPY``'s top-level TO; None for a ``COPY ... FROM``.

    The TO is the first top-level TO keyword (parentheses counted, so an INTERVAL ... TO
    inside the query does not count); a COPY ... FROM reads and is not a write.
    """
    tokens = _tokens(query)
    if not tokens or tokens[0].text.upper() != "COPY":
        return None
    depth = 0
    for i, token in enumerate(tokens):
        if token.kind == "operator":
            depth += token.text.count("(") - token.text.count(")")
        elif depth == 0 and token.kind == "keyword" and token.text.upper() in ("TO", "FROM"):
            return tuple(tokens[i + 1 :]) if token.text.upper() == "TO" else None
    return None


def serve(requests: BinaryIO, answers: BinaryIO) -> None:
    """Answer requests until ``requests`` ends: each one a SQL text (UTF-8), each answer a
    JSON object, ``{"parsed": ...}`` or ``{"error": "DuckDB's message"}``. One at a time."""
    while True:
        header = requests.read(HEADER.size)
        if len(header) < HEADER.size:
            return  # the parent closed the pipe, or is gone
        (size,) = HEADER.unpack(header)
        sql = requests.read(size).decode("utf-8", "replace")
        answer: dict[str, object]
        try:
            answer = {"parsed": analyze(sql).to_doc()}
        except SqlError as error:
            answer = {"error": str(error)}
        except RecursionError:
            answer = {"error": NESTED_TOO_DEEPLY}
        except Exception as error:  # a bug, or MemoryError: refuse this one, keep serving
            answer = {"error": f"cannot find the tables the statement reads ({error!r})"}
        body = json.dumps(answer).encode()
        answers.write(HEADER.pack(len(body)) + body)
        answers.flush()


if __name__ == "__main__":
    # A parse tree as deep as DuckDB allows (max_expression_depth 1000, more through
    # subqueries) is deeper than Python's default of 1000 frames; a deeper one is refused.
    sys.setrecursionlimit(20_000)
    serve(sys.stdin.buffer, sys.stdout.buffer)
