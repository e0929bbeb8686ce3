"""The SQL parser pool: the size limit, real parser processes, and the bounds on each parse
(time, memory, a crashed child, busy children, callers that leave), with children of our own
(``FAKE``) where a real parse could not misbehave on cue."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from launcher.errors import ParserUnavailableError, SqlError, StatementLimitError
from launcher.model.sql import MAX_STATEMENT_BYTES, ParserPool, check_statement
from tests.support.waiting import eventually

DEADLINE_S = 30.0
# A parser process that answers like the real one without DuckDB: "SLOW <s> <name>" sleeps
# first, "GATE <dir> <name>" appends a line to <dir>/parsed and answers once <dir>/open exists,
# "HANG" never answers, "CRASH" exits, "ENV" names its environment variables as tables;
# anything else reads its last word as a table name.
FAKE = r"""
import json, os, struct, sys, time
HEADER = struct.Struct(">I")
while True:
    header = sys.stdin.buffer.read(4)
    if len(header) < 4:
        break
    sql = sys.stdin.buffer.read(HEADER.unpack(header)[0]).decode()
    words = sql.split()
    if words[0] == "CRASH":
        os._exit(3)
    if words[0] == "HANG":
        time.sleep(3600)
    if words[0] == "SLOW":
        time.sleep(float(words[1]))
    if words[0] == "GATE":
        with open(os.path.join(words[1], "parsed"), "a") as parsed:
            parsed.write(sql + "\n")
        while not os.path.exists(os.path.join(words[1], "open")):
            time.sleep(0.01)
    tables = sorted(os.environ) if words[0] == "ENV" else [words[-1]]
    statement = {"kind": "SELECT", "text": "", "copy_to": None}
    body = json.dumps({"parsed": {"tables": tables, "statements": [statement]}}).encode()
    sys.stdout.buffer.write(HEADER.pack(len(body)) + body)
    sys.stdout.buffer.flush()
"""
FAKE_COMMAND = [sys.executable, "-c", FAKE]
IN_LIST = "SELECT * FROM t WHERE x IN (" + ",".join(str(i) for i in range(60_000)) + ")"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))  # type: ignore[arg-type]


def test_a_statement_over_the_limit_is_refused_with_its_size_and_the_limit() -> None:
    assert check_statement("SELECT 1") == b"SELECT 1"
    assert len(check_statement("x" * MAX_STATEMENT_BYTES)) == MAX_STATEMENT_BYTES
    with pytest.raises(StatementLimitError) as refused:
        check_statement("SELECT * FROM t WHERE x IN (" + "1," * 3_300_000 + "1)")
    assert "the statement is 6.6 MB (6,600,030 bytes); the limit is 1 MiB (1,048,576 bytes)" in (
        str(refused.value)
    )
    assert refused.value.reason == "sql" and refused.value.exit_code == 1
    with pytest.raises(StatementLimitError, match=r"2\.0 kB \(2,000 bytes\)"):
        check_statement("é" * 1000, limit=1999)  # counted in UTF-8 bytes, not characters


def test_statements_are_parsed_in_child_processes_and_answers_are_kept() -> None:
    async def scenario() -> None:
        async with ParserPool(size=2) as pool:
            assert len(pool.pids) == 2 and os.getpid() not in pool.pids
            parsed = await pool.parse("WITH c AS (SELECT 1) SELECT * FROM c, trips; DROP TABLE x")
            assert parsed.tables == {"trips", "x"}
            assert [s.kind for s in parsed.statements] == ["SELECT", "DROP"]
            with pytest.raises(SqlError, match='syntax error at or near "SELEC"'):
                await pool.parse("SELEC 1")
            for pid in pool.pids:  # the cache answers without any child
                os.kill(pid, signal.SIGKILL)
            assert (await pool.parse("SELECT 42")).tables == frozenset()  # restarted
            started = time.monotonic()
            assert (await pool.parse(IN_LIST)).tables == {"t"}
            with pytest.raises(SqlError, match="syntax error"):
                await pool.parse("SELEC 1")
            assert (await pool.parse(IN_LIST)).tables == {"t"}
            assert time.monotonic() - started < 10
        assert pool.pids == []

    run(scenario)


def test_a_parse_past_the_timeout_is_refused_and_its_child_replaced() -> None:
    async def scenario() -> None:
        async with ParserPool(size=1, timeout_s=0.5, command=FAKE_COMMAND) as pool:
            (hung,) = pool.pids
            started = time.monotonic()
            with pytest.raises(StatementLimitError, match=r"longer than 0\.5 s to parse"):
                await pool.parse("HANG t")
            assert time.monotonic() - started < 2
            assert (await pool.parse("SELECT * FROM zones")).tables == {"zones"}
            assert pool.pids != [hung]
            await eventually(lambda: not _alive(hung), deadline_s=DEADLINE_S)

    run(scenario)


def test_a_child_that_dies_mid_parse_refuses_that_statement_and_is_replaced() -> None:
    async def scenario() -> None:
        async with ParserPool(size=1, command=FAKE_COMMAND) as pool:
            (first,) = pool.pids
            with pytest.raises(StatementLimitError, match=r"ended .*\(exit code 3\)"):
                await pool.parse("CRASH t")
            assert (await pool.parse("SELECT * FROM zones")).tables == {"zones"}
            assert pool.pids != [first]

    run(scenario)


def test_a_parse_that_grows_past_the_memory_cap_is_killed_and_refused() -> None:
    async def scenario() -> None:
        big = "SELECT " + ",".join(str(i) for i in range(150_000)) + " FROM t"  # 1 MB of tree
        async with ParserPool(size=1, kill_rss_bytes=160 * 2**20) as pool:
            (child,) = pool.pids
            with pytest.raises(StatementLimitError, match="took more than 160 MiB"):
                await pool.parse(big)
            await eventually(lambda: not _alive(child), deadline_s=DEADLINE_S)
            assert (await pool.parse("SELECT * FROM zones")).tables == {"zones"}

    run(scenario)


def test_a_child_left_large_after_a_parse_is_replaced() -> None:
    async def scenario() -> None:
        async with ParserPool(size=1, retire_rss_bytes=1) as pool:  # every child is too large
            (first,) = pool.pids
            await pool.parse("SELECT 1")
            await eventually(lambda: pool.pids not in ([], [first]), deadline_s=DEADLINE_S)
            assert (await pool.parse("SELECT * FROM zones")).tables == {"zones"}

    run(scenario)


def test_large_statements_never_take_the_last_free_child() -> None:
    """With two children, two slow large statements take turns on one child; a small
    statement sent meanwhile is answered at once by the other."""

    async def scenario() -> None:
        async with ParserPool(size=2, large_bytes=64, command=FAKE_COMMAND) as pool:
            padding = " " * 100
            large = [asyncio.create_task(pool.parse(f"SLOW 1 {padding} big{i}")) for i in range(2)]
            await asyncio.sleep(0.2)
            started = time.monotonic()
            assert (await pool.parse("SELECT * FROM small")).tables == {"small"}
            assert time.monotonic() - started < 0.5
            assert not any(task.done() for task in large)
            done = [(await task).tables for task in large]
            assert done == [{"big0"}, {"big1"}]
            assert time.monotonic() - started > 1.5  # one after the other

    run(scenario)


def test_when_every_child_stays_busy_a_statement_is_refused_as_retryable() -> None:
    async def scenario() -> None:
        async with ParserPool(size=1, timeout_s=0.5, command=FAKE_COMMAND) as pool:
            # In line for the one child: "a" is answered, "b" keeps it to its own deadline,
            # which "waiting" reaches too, still in line.
            first = asyncio.create_task(pool.parse("SLOW 0.2 a"))
            hung = asyncio.create_task(pool.parse("HANG b"))
            waiting = asyncio.create_task(pool.parse("SELECT * FROM waiting"))
            assert (await first).tables == {"a"}
            with pytest.raises(StatementLimitError, match=r"longer than 0\.5 s"):
                await hung
            with pytest.raises(ParserUnavailableError, match=r"busy for 0\.5 s") as busy:
                await waiting
            assert busy.value.reason == "capacity"

    run(scenario)


def test_concurrent_statements_all_get_their_own_answer() -> None:
    async def scenario() -> None:
        async with ParserPool(size=2) as pool:
            sqls = [f"SELECT * FROM t{i} JOIN u{i} USING (id)" for i in range(60)]
            answers = await asyncio.gather(*(pool.parse(sql) for sql in sqls))
            assert [a.tables for a in answers] == [{f"t{i}", f"u{i}"} for i in range(60)]

    run(scenario)


def test_a_caller_that_leaves_does_not_cut_the_parse_short(tmp_path: Path) -> None:
    """The parse goes on for the next caller with the same SQL (and its cache).

    The child holds its answer until the test opens the gate, so the first caller leaves while
    its parse is certainly in flight; the child then parsed the statement once, for both.
    """
    sql = f"GATE {tmp_path} kept"
    parsed = tmp_path / "parsed"

    async def scenario() -> None:
        async with ParserPool(size=1, command=FAKE_COMMAND) as pool:
            (child,) = pool.pids
            leaving = asyncio.create_task(pool.parse(sql))
            await eventually(parsed.exists, deadline_s=DEADLINE_S)  # the child is parsing it
            leaving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await leaving
            assert leaving.cancelled()
            staying = asyncio.create_task(pool.parse(sql))
            (tmp_path / "open").touch()
            assert (await staying).tables == {"kept"}
            assert parsed.read_text().splitlines() == [sql]  # one parse, not cut short
            assert pool.pids == [child]  # and its child was not replaced

    run(scenario)


def test_children_get_none_of_the_parents_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUCKCELL_TEST_SECRET", "s3cr3t")

    async def scenario() -> None:
        async with ParserPool(size=1, command=FAKE_COMMAND) as pool:
            names = (await pool.parse("ENV")).tables
            assert "DUCKCELL_TEST_SECRET" not in names
            assert "PYTHONPATH" in names

    run(scenario)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not running
        return stat.read().split(") ")[-1][0] != "Z"
