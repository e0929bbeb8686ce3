"""SQL parsing for long-lived processes: size-limited, in child processes, time-boxed.

Every SQL text a client sends is parsed by DuckDB before it runs, to find the tables it reads
(``launcher.model.sql.tables``). Parsing in the worker or control plane itself let one statement
stall and bloat it: a 6.6 MB ``IN`` list of a million items took DuckDB's parser 16 s and
2.3 GB, on the event loop, so the worker missed its heartbeats and kept 1.5 GB afterwards.

So a statement is parsed here in three bounded steps:

1. ``check_statement``: a statement over ``MAX_STATEMENT_BYTES`` is refused at once, at every
   entry (the control plane's Query service and Flight SQL, the worker's tunnel, the CLI).
2. ``ParserPool.parse``: the parse runs in one of a few long-lived child processes
   (``python -m launcher.model.sql.tables``), reached through pipes, so the event loop only waits
   on I/O and heartbeats, other queries and the process's memory never wait on or keep a
   parse. A parse that takes longer than ``timeout_s``, or whose child grows past
   ``kill_rss_bytes``, kills that child and refuses the statement; a child that died is
   replaced, and one left above ``retire_rss_bytes`` after a parse is replaced too (DuckDB
   and the allocator keep what a large parse took). Statements over
   ``LARGE_STATEMENT_BYTES`` may use all children but one, so small statements always find
   a child even while large ones keep the others busy.
3. Answers for the same SQL text are shared while it is being parsed and kept in a small LRU
   afterwards (DuckDB's refusals too), so repeating a statement costs one dictionary lookup.

Hand-offs: ``parse`` runs the parse as a task of its own, which callers await shielded: a
caller that goes away (its client left) does not interrupt a child mid-answer, and the
answer still lands in the cache.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import sys
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from launcher.errors import ParserUnavailableError, SqlError, StatementLimitError

from .child import Child
from .parsed import ParsedSql

MiB = 2**20
# 1 MiB admits any hand-written or generated query we have seen (BI tools' SQL stays well under
# 100 KiB) and IN lists of ~150,000 ids (0.94 MB, parsed in ~0.7 s, ~120 MiB in a child: long
# IN lists are condensed first, see ``launcher.model.sql.tables``). Other 1 MiB shapes cost more (a
# 40,000-branch CASE or UNION: 3 to 6 s, ~0.55 GiB) and meet the timeout under load. A
# million-item list (6.9 MB: 16 s and 2.3 GB when it was parsed in-process) is refused before
# anything else: load such lists as a table instead.
MAX_STATEMENT_BYTES = 1 * MiB
PARSE_TIMEOUT_S = 5.0
POOL_SIZE = 2
LARGE_STATEMENT_BYTES = 64 * 1024  # above this a statement may not take the last free child
RETIRE_RSS_BYTES = 256 * MiB  # an idle child holds ~70 MiB; one above this after a parse goes
KILL_RSS_BYTES = 1024 * MiB  # the costliest 1 MiB statements peak at ~0.6 GiB
CACHE_ENTRIES = 256
CACHE_MAX_BYTES = 64 * 1024  # parsed results of longer statements are not kept
MAX_ERROR_CHARS = 2000
POLL_S = 0.05  # how often a running parse's child memory is looked at

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A statement refused for what it is (DuckDB's message, or too big to parse): kept in
    the cache like a parse, since the same text is refused the same way again."""

    message: str
    error: type[SqlError] = SqlError


_Answer = ParsedSql | _Refusal


class SqlParser(Protocol):
    """What callers need: the ``ParsedSql`` of a SQL text. Raises ``StatementLimitError``
    (too large, too slow or too big to parse), ``SqlError`` (DuckDB's message) or
    ``ParserUnavailableError`` (no parser free in time)."""

    async def parse(self, sql: str) -> ParsedSql: ...


def check_statement(sql: str, limit: int = MAX_STATEMENT_BYTES) -> bytes:
    """``sql`` as UTF-8, or ``StatementLimitError`` when it is longer than ``limit`` bytes."""
    size = len(sql) if sql.isascii() else len(sql.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise StatementLimitError(
            f"the statement is {_size(size)} ({size:,} bytes); the limit is {_size(limit)} "
            f"({limit:,} bytes): pass long value lists as a table (a catalog table, or one "
            "the statement creates from a file) instead of writing them into the SQL"
        )
    try:
        return sql.encode("utf-8")
    except UnicodeEncodeError:
        raise SqlError("the statement is not valid UTF-8 text; send it as UTF-8") from None


def child_command() -> list[str]:
    """How to start a parser process: this Python, running ``launcher.model.sql.tables``."""
    return [sys.executable, "-m", "launcher.model.sql.tables"]


class ParserPool:
    """``SqlParser`` over ``size`` child processes (see the module docstring).

    Use it as ``async with ParserPool() as parser:``, or call ``start`` (optional: children
    start on first use otherwise) and ``close``. ``command`` starts a child (tests pass one
    that misbehaves).
    """

    def __init__(
        self,
        *,
        size: int = POOL_SIZE,
        timeout_s: float = PARSE_TIMEOUT_S,
        max_statement_bytes: int = MAX_STATEMENT_BYTES,
        large_bytes: int = LARGE_STATEMENT_BYTES,
        retire_rss_bytes: int = RETIRE_RSS_BYTES,
        kill_rss_bytes: int = KILL_RSS_BYTES,
        cache_entries: int = CACHE_ENTRIES,
        command: Sequence[str] | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._max_bytes = max_statement_bytes
        self._large_bytes = large_bytes
        self._retire_rss = retire_rss_bytes
        self._kill_rss = kill_rss_bytes
        self._cache_entries = cache_entries
        self._command = list(command or child_command())
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(_Slot())
        self._slots = size
        self._large = asyncio.Semaphore(max(1, size - 1))
        self._cache: collections.OrderedDict[bytes, _Answer] = collections.OrderedDict()
        self._inflight: dict[bytes, asyncio.Task[_Answer]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._children: set[Child] = set()
        self._closing = False  # close() is stopping everything: replace no child

    @property
    def pids(self) -> list[int]:
        """The process ids of the running children."""
        return sorted(child.pid for child in self._children if child.alive)

    async def start(self) -> None:
        """Start every child now, so the first queries do not wait for one to start."""
        slots = [self._free.get_nowait() for _ in range(self._free.qsize())]
        try:
            for slot in slots:
                if slot.child is None:
                    slot.child = await self._spawn()
        finally:
            for slot in slots:
                self._free.put_nowait(slot)

    async def close(self) -> None:
        """Stop the parses in flight and every child. A parse after this starts children
        again, on demand."""
        self._closing = True
        try:
            for task in [*self._inflight.values(), *self._background]:
                task.cancel()
            tasks = [*self._inflight.values(), *self._background]
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(child.stop() for child in list(self._children)))
            self._children.clear()
        finally:
            self._closing = False

    async def __aenter__(self) -> ParserPool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def parse(self, sql: str) -> ParsedSql:
        """``SqlParser.parse``: the size check, the cache, then a child (module docstring)."""
        data = check_statement(sql, self._max_bytes)
        key = hashlib.blake2b(data, digest_size=16).digest()
        answer = self._cache.get(key)
        if answer is not None:
            self._cache.move_to_end(key)
        else:
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.create_task(self._parse_new(key, data))
                self._inflight[key] = task
                task.add_done_callback(lambda done: _settle(self._inflight, key, done))
            answer = await asyncio.shield(task)
        if isinstance(answer, _Refusal):
            raise answer.error(answer.message)
        return answer

    async def _parse_new(self, key: bytes, data: bytes) -> _Answer:
        """Parse ``data`` in a child and keep what DuckDB said (the parse or its refusal)."""
        answer = await self._in_child(data)
        if isinstance(answer, _Refusal) or len(data) <= CACHE_MAX_BYTES:
            self._cache[key] = answer
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return answer

    async def _in_child(self, data: bytes) -> _Answer:
        """Wait (within the timeout) for a lane and a child, then parse there."""
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        large = len(data) > self._large_bytes and self._slots > 1
        if large:
            await self._within(deadline, self._large.acquire())
        try:
            slot = await self._within(deadline, self._free.get())
            try:
                return await self._ask(slot, data, deadline)
            finally:
                self._give_back(slot)
        finally:
            if large:
                self._large.release()

    async def _within(self, deadline: float, waiting: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout_at(deadline):
                return await waiting
        except TimeoutError:
            raise ParserUnavailableError(
                f"every SQL parser stayed busy for {self._timeout_s:g} s (other statements "
                "were being parsed): run the query again"
            ) from None

    async def _ask(self, slot: _Slot, data: bytes, deadline: float) -> _Answer:
        """Parse ``data`` in the slot's child, started first if need be. A child found gone
        when asked (it died idle, say by the OOM killer) is replaced and asked once more; one
        that dies on the statement twice refuses it."""
        for attempt in range(2):
            if slot.child is not None and not slot.child.alive:
                self._in_background(self._stop(slot.child))  # reap it
                slot.child = None
            if slot.child is None:
                slot.child = await self._spawn()
            try:
                return await self._ask_child(slot.child, data, deadline)
            except _ChildGone:
                ended = await slot.child.ended()
                if attempt:
                    raise StatementLimitError(
                        f"the SQL parser process ended while parsing the statement ({ended}), "
                        "so it was refused: simplify the statement"
                    ) from None
        raise AssertionError("unreachable")

    async def _ask_child(self, child: Child, data: bytes, deadline: float) -> _Answer:
        """The child's answer, watching its memory; a child that overran is killed."""
        reply = asyncio.create_task(child.ask(data))
        try:
            async with asyncio.timeout_at(deadline):
                while not reply.done():
                    await asyncio.wait([reply], timeout=POLL_S)
                    if not reply.done() and child.rss_bytes() > self._kill_rss:
                        return _Refusal(
                            f"parsing the statement took more than {self._kill_rss // MiB} MiB, "
                            "so it was refused: simplify it, or pass long value lists as a "
                            "table instead of writing them into the SQL",
                            StatementLimitError,
                        )
            return _decode(reply.result())
        except TimeoutError:
            raise StatementLimitError(
                f"the statement took longer than {self._timeout_s:g} s to parse (to find the "
                "tables it reads), so it was refused: simplify it, or pass long value lists "
                "as a table instead of writing them into the SQL"
            ) from None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            raise _ChildGone() from None
        finally:
            if not reply.done():  # timed out, too big, or cancelled by close(): mid-answer
                reply.cancel()
                child.kill()

    def _give_back(self, slot: _Slot) -> None:
        """Return ``slot`` to the free ones; a child that died or holds too much memory is
        replaced first, in the background."""
        child = slot.child
        healthy = child is not None and child.alive and child.rss_bytes() <= self._retire_rss
        if healthy or self._closing:
            self._free.put_nowait(slot)
            return
        self._in_background(self._replace(slot))

    async def _replace(self, slot: _Slot) -> None:
        old, slot.child = slot.child, None
        try:
            if old is not None:
                await self._stop(old)
            slot.child = await self._spawn()
        except ParserUnavailableError:
            pass  # the next parse on this slot tries again, and reports what failed
        finally:
            self._free.put_nowait(slot)

    async def _stop(self, child: Child) -> None:
        await child.stop()
        self._children.discard(child)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _spawn(self) -> Child:
        try:
            child = await Child.spawn(self._command)
        except OSError as error:
            raise ParserUnavailableError(
                f"cannot start a SQL parser process ({error}): check the host's free memory "
                "and process limits"
            ) from None
        self._children.add(child)
        return child


class _ChildGone(Exception):
    """The child closed its pipes (it died) before answering."""


class _Slot:
    """A place for one child: the pool holds ``size`` of them, free or in use."""

    def __init__(self) -> None:
        self.child: Child | None = None


def _decode(body: bytes) -> _Answer:
    doc = json.loads(body)
    if "error" in doc:
        return _Refusal(str(doc["error"])[:MAX_ERROR_CHARS])
    return ParsedSql.from_doc(doc["parsed"])


def _settle(
    inflight: dict[bytes, asyncio.Task[_Answer]], key: bytes, task: asyncio.Task[_Answer]
) -> None:
    """A parse ended: forget it as in flight, and mark its error as seen (every caller may
    have left)."""
    inflight.pop(key, None)
    if not task.cancelled():
        task.exception()


def _size(size: int) -> str:
    if size % MiB == 0:
        return f"{size // MiB} MiB"
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
