"""Statements between ``GetFlightInfo`` and ``DoGet``, and prepared statements.

A query is routed at ``GetFlightInfo``, not at ``DoGet``: the ``FlightInfo`` must carry the
result's schema exactly as the ``DoGet`` stream will (nullability included, or the client fails
with "inconsistent schema"), and only the sandbox knows it. So ``GetFlightInfo`` starts the query,
reads the schema message from the worker's stream and parks the running query under a one-time
ticket; ``DoGet`` claims it and reads on from the same stream. A ticket nobody claims within
``expiry_s`` is dropped and its query cancelled, so an abandoned ``FlightInfo`` never holds a
sandbox for long.

Both registries hold per-key limits (``MAX_PARKED_PER_KEY``, ``MAX_PREPARED_PER_KEY``): each entry
is memory and a parked ticket is a running query holding a sandbox, so one client that never
fetches or closes must not exhaust the server. Past a limit the call fails with ``LimitReached``,
whose message says what to fetch or close.

Both registries are used from many handler threads and the loop's expiry timers: a lock guards
each dictionary and nothing slow ever runs under it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.ipc as ipc

from .bridge import IpcSource, LoopBridge, RoutedResult
from .placeholders import Placeholders

log = logging.getLogger(__name__)

# Seconds a started query waits for its DoGet before it is cancelled.
TICKET_EXPIRY_S = 60.0
# Per API key: queries waiting for their DoGet, and prepared statements not closed.
MAX_PARKED_PER_KEY = 64
MAX_PREPARED_PER_KEY = 256

UNKNOWN_TICKET = (
    "unknown or expired ticket: execute the statement again and fetch its result within "
    "{expiry:g} s"
)
UNKNOWN_PREPARED = (
    "unknown prepared statement (closed, or made on another connection or server): prepare it again"
)
TOO_MANY_PARKED = (
    "this API key has {limit} executed statements whose results nobody fetched yet, the most "
    "one key may: fetch them (DoGet) or close their cursors before executing more; unfetched "
    "results expire after {expiry:g} s"
)
TOO_MANY_PREPARED = (
    "this API key holds {limit} prepared statements, the most one key may: close the ones you "
    "no longer need (cursor.close(), ClosePreparedStatement) before preparing more"
)


class UnknownHandle(LookupError):
    """No such ticket or prepared statement for this caller (never issued, used, expired,
    closed, or another key's); the message says what to do."""


class LimitReached(Exception):
    """An API key holds as many parked tickets or prepared statements as it may; the message
    says what to fetch or close."""


@dataclass(eq=False)  # identity: queries are kept in sets
class RunningQuery:
    """A routed query whose schema has been read; the rest of its stream waits in the router.

    ``open`` and ``batches`` run on handler threads; ``close`` may run on any thread.
    """

    bridge: LoopBridge
    key_id: str
    result: RoutedResult
    source: IpcSource
    reader: ipc.RecordBatchStreamReader
    _closed: bool = field(default=False, init=False)
    # The whole result, when it had arrived by the time the schema was read (``prefetch``).
    table: pa.Table | None = field(default=None, init=False)

    @classmethod
    def open(
        cls, bridge: LoopBridge, key_id: str, result: RoutedResult, cancelled: Callable[[], bool]
    ) -> RunningQuery:
        """Read the schema from ``result``; closes it (cancelling the query) on failure."""
        source = IpcSource(bridge, result)
        source.cancelled = cancelled
        try:
            reader = ipc.open_stream(source)
        except BaseException:
            bridge.spawn(result.close())
            raise
        return cls(bridge, key_id, result, source, reader)

    @property
    def schema(self) -> pa.Schema:
        return self.reader.schema

    def prefetch(self) -> None:
        """Take the whole result now when it has already arrived whole (a small result comes
        in one message): ``DoGet`` then sends ``table`` from pyarrow's C++ side, with no
        Python generator and no hop to the loop per batch. Raises the query's error (and
        closes it) when the worker's outcome is a failure; does nothing for a result still
        streaming in."""
        if not self.source.holds_whole_result():
            return
        try:
            batches = list(self.reader)
            self.source.read_to_outcome()
        except BaseException:
            self.close()
            raise
        self.table = pa.Table.from_batches(batches, self.schema)
        self.close()  # finished: closing cancels nothing, it only lets the router go

    def batches(self, cancelled: Callable[[], bool]) -> Iterator[pa.RecordBatch]:
        """The remaining batches, decoded from the worker's IPC bytes as they come.

        Leaving early (the client cancelled or went away; pyarrow then drops this generator)
        closes the routed query, which cancels it on the worker and frees its sandbox.
        """
        self.source.cancelled = cancelled
        try:
            while True:
                try:
                    batch = self.reader.read_next_batch()
                except StopIteration:
                    break
                yield batch
            # The IPC stream's end is not the query's: the worker's outcome follows it, and
            # closing before reading it would cancel a finished query.
            self.source.read_to_outcome()
        finally:
            self.close()

    def close(self) -> None:
        """Close the routed query (once): a query that has not finished is cancelled."""
        if not self._closed:
            self._closed = True
            self.bridge.spawn(self.result.close())


@dataclass
class _Parked:
    query: RunningQuery
    timer: asyncio.TimerHandle | None = None


class QueryTickets:
    """Running queries waiting for their ``DoGet``, by one-time ticket handle, and those a
    ``DoGet`` is streaming (until ``done``), so that ``close_all`` can end every one."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        expiry_s: float = TICKET_EXPIRY_S,
        max_per_key: int = MAX_PARKED_PER_KEY,
    ) -> None:
        self._loop = loop
        self._expiry_s = expiry_s
        self._max_per_key = max_per_key
        self._lock = threading.Lock()
        self._parked: dict[bytes, _Parked] = {}
        self._per_key: Counter[str] = Counter()
        self._streaming: set[RunningQuery] = set()

    def check_room(self, key_id: str) -> None:
        """Raise ``LimitReached`` if ``key_id`` may park no more: checked before a query is
        routed, so a client at its limit starts no sandbox (``park`` checks again)."""
        with self._lock:
            full = self._per_key[key_id] >= self._max_per_key
        if full:
            raise self._limit_reached()

    def park(self, query: RunningQuery) -> bytes:
        """A new handle for ``query``; its expiry timer starts on the loop. At the key's limit
        the query is closed (cancelled) and ``LimitReached`` raised."""
        handle = secrets.token_bytes(16)
        parked = _Parked(query)
        with self._lock:
            full = self._per_key[query.key_id] >= self._max_per_key
            if not full:
                self._parked[handle] = parked
                self._per_key[query.key_id] += 1
        if full:
            query.close()
            raise self._limit_reached()
        self._loop.call_soon_threadsafe(self._arm, handle, parked)
        return handle

    def claim(self, handle: bytes, key_id: str) -> RunningQuery:
        """The query parked under ``handle`` by ``key_id``, once; raises ``UnknownHandle``."""
        with self._lock:
            parked = self._parked.get(handle)
            if parked is None or parked.query.key_id != key_id:
                raise UnknownHandle(UNKNOWN_TICKET.format(expiry=self._expiry_s))
            self._remove(handle)
            self._streaming.add(parked.query)
        self._loop.call_soon_threadsafe(_disarm, parked)
        return parked.query

    def streaming(self, query: RunningQuery) -> None:
        """``query`` is streamed by a DoGet without having been parked (a late-bound prepared
        statement): ``close_all`` ends it too, ``done`` forgets it."""
        with self._lock:
            self._streaming.add(query)

    def done(self, query: RunningQuery) -> None:
        """``query``'s DoGet ended (however it ended)."""
        with self._lock:
            self._streaming.discard(query)

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    def close_all(self) -> None:
        """Cancel every parked and streaming query (the server is stopping); a DoGet waiting
        for its next chunk then ends with UNAVAILABLE ("shutting down", ``bridge.py``)."""
        with self._lock:
            parked, self._parked = list(self._parked.values()), {}
            streaming, self._streaming = list(self._streaming), set()
            self._per_key.clear()
        for item in parked:
            self._loop.call_soon_threadsafe(_disarm, item)
        for query in [*(item.query for item in parked), *streaming]:
            query.close()

    def _arm(self, handle: bytes, parked: _Parked) -> None:
        with self._lock:
            if self._parked.get(handle) is parked:  # not claimed in the meantime
                parked.timer = self._loop.call_later(self._expiry_s, self._expire, handle)

    def _expire(self, handle: bytes) -> None:
        with self._lock:
            parked = self._remove(handle)
        if parked is not None:
            log.info("no DoGet within %.0f s: cancelling the query", self._expiry_s)
            parked.query.close()

    def _remove(self, handle: bytes) -> _Parked | None:
        """Forget ``handle`` (under the lock)."""
        parked = self._parked.pop(handle, None)
        if parked is not None:
            self._per_key[parked.query.key_id] -= 1
            if not self._per_key[parked.query.key_id]:
                del self._per_key[parked.query.key_id]
        return parked

    def _limit_reached(self) -> LimitReached:
        return LimitReached(TOO_MANY_PARKED.format(limit=self._max_per_key, expiry=self._expiry_s))


def _disarm(parked: _Parked) -> None:
    if parked.timer is not None:
        parked.timer.cancel()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A prepared statement: its SQL and placeholders (named ones made positional,
    ``placeholders.py``), whether it changes data (``changes_data``) and the parameter sets
    last bound to it (each an Arrow IPC stream of one row; none: nothing bound)."""

    key_id: str
    placeholders: Placeholders
    is_update: bool = False
    parameters: tuple[bytes, ...] = ()

    @property
    def sql(self) -> str:
        return self.placeholders.sql


class PreparedStatements:
    """Prepared statements by handle, per API key (at most ``max_per_key`` each). Nothing runs
    until one executes."""

    def __init__(self, *, max_per_key: int = MAX_PREPARED_PER_KEY) -> None:
        self._max_per_key = max_per_key
        self._lock = threading.Lock()
        self._statements: dict[bytes, Prepared] = {}
        self._per_key: Counter[str] = Counter()

    def create(self, key_id: str, placeholders: Placeholders, *, is_update: bool = False) -> bytes:
        """A new handle; raises ``LimitReached`` when ``key_id`` holds ``max_per_key``."""
        handle = secrets.token_bytes(16)
        with self._lock:
            if self._per_key[key_id] >= self._max_per_key:
                raise LimitReached(TOO_MANY_PREPARED.format(limit=self._max_per_key))
            self._statements[handle] = Prepared(key_id, placeholders, is_update)
            self._per_key[key_id] += 1
        return handle

    def get(self, handle: bytes, key_id: str) -> Prepared:
        with self._lock:
            found = self._statements.get(handle)
        if found is None or found.key_id != key_id:
            raise UnknownHandle(UNKNOWN_PREPARED)
        return found

    def bind(self, handle: bytes, key_id: str, parameters: tuple[bytes, ...]) -> None:
        """Keep ``parameters`` for the statement's next executions (until bound again)."""
        with self._lock:
            found = self._statements.get(handle)
            if found is None or found.key_id != key_id:
                raise UnknownHandle(UNKNOWN_PREPARED)
            self._statements[handle] = replace(found, parameters=parameters)

    def close(self, handle: bytes, key_id: str) -> bool:
        """Forget ``key_id``'s statement ``handle``; False if it holds none by that handle.

        Idempotent, never an error: closing is cleanup, and the state the client asks for (the
        statement is not held) is reached either way. A client closes its cursors after the
        control plane restarted (which forgot every statement) or twice from ``close`` and a
        finalizer; an error there would only break its cleanup path. Another key's handle is
        left alone and answered the same, so nothing is learnt about it.
        """
        with self._lock:
            found = self._statements.get(handle)
            if found is None or found.key_id != key_id:
                return False
            del self._statements[handle]
            self._per_key[key_id] -= 1
            if not self._per_key[key_id]:
                del self._per_key[key_id]
        return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._statements)
