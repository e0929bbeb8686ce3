"""The hand-off between pyarrow.flight's handler threads and the control plane's event loop.

pyarrow.flight calls each handler on a thread of its own gRPC server; the router, the tunnel and
the API-key store live on the control plane's asyncio loop. ``LoopBridge.call`` runs a coroutine
there (``asyncio.run_coroutine_threadsafe``) and blocks the handler's thread until it finishes,
watching the call's ``is_cancelled`` meanwhile: a client that goes away while its query has
produced nothing yet still cancels the coroutine (and so the query) within ``POLL_S``.

A routed query's result crosses the same way, pulled one Arrow IPC chunk per call
(``RoutedResult.next_chunk``): the handler's thread holds one chunk at a time, the router holds
at most its small relay queue, and the worker is held back by gRPC flow control beyond that, so
a result is never buffered whole. ``IpcSource`` presents those chunks as the file
``pyarrow.ipc.open_stream`` reads, so batches are decoded straight from the worker's bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pyarrow.flight as flight

from launcher.controlplane.routing import QueryDone, WholeResult

T = TypeVar("T")

# Why a query ended under a handler that did not cancel it: only stop() closes queries that way.
STOPPING = "the Flight SQL server is shutting down and stopped the query: run it again"
# How often a waiting handler looks at its call's is_cancelled (the only cancel signal
# pyarrow.flight gives a handler).
POLL_S = 0.05


def never_cancelled() -> bool:
    return False


class LoopBridge:
    """Runs coroutines on the control plane's loop for handler threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def call(
        self, coroutine: Coroutine[Any, Any, T], cancelled: Callable[[], bool] = never_cancelled
    ) -> T:
        """``coroutine``'s result or exception. Raises ``FlightCancelledError`` (after
        cancelling the coroutine) when ``cancelled()`` turns true first, and
        ``FlightUnavailableError`` when the server cancelled the coroutine (``stop``). Never
        call it from the loop's own thread: it would wait for itself."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        while True:
            try:
                return future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                if cancelled():
                    future.cancel()
                    raise flight.FlightCancelledError("the client cancelled the call") from None
            except concurrent.futures.CancelledError:
                # Not FlightCancelledError: pyarrow clients turn CANCELLED into KeyboardInterrupt.
                raise flight.FlightUnavailableError(STOPPING) from None

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Start ``coroutine`` on the loop without waiting for it (cleanup off a handler).
        After the loop has closed there is nothing left to clean up: it is dropped."""
        if self._loop.is_closed():
            coroutine.close()
            return
        asyncio.run_coroutine_threadsafe(coroutine, self._loop)


class RoutedResult:
    """The router's stream of one query, stepped from the loop. Every method runs there.

    ``close`` cancels a ``next_chunk`` still running before closing the generator, because an
    async generator cannot be closed while it is suspended inside ``anext``; closing it runs
    the router's cleanup, which sends ``Cancel`` to the worker unless the query finished.
    """

    def __init__(self, items: AsyncIterator[bytes | QueryDone]) -> None:
        self._items = items
        self._step: asyncio.Task[bytes | QueryDone] | None = None
        self._closed = False
        self.rows: int | None = None  # set when the worker reported success

    async def next_chunk(self) -> bytes | None:
        """The next IPC bytes, or ``None`` after the last; raises the query's error."""
        if self.rows is not None:
            return None
        if self._closed:  # by the server stopping, between two reads of the handler
            raise flight.FlightUnavailableError(STOPPING)
        self._step = asyncio.ensure_future(anext(self._items))
        item = await self._step
        if isinstance(item, QueryDone):
            self.rows = item.rows
            return None
        return item

    async def close(self) -> None:
        self._closed = True
        if self._step is not None and not self._step.done():
            self._step.cancel()
            await asyncio.wait([self._step])
        if isinstance(self._items, AsyncGenerator):  # the router's is; closing it cleans up
            await self._items.aclose()


class IpcSource(io.RawIOBase):
    """A read-only file over a routed result's chunks, for ``pyarrow.ipc.open_stream``.

    Read from one handler thread at a time; ``cancelled`` is the current call's
    ``is_cancelled`` (the GetFlightInfo call's first, then the DoGet's). Exceptions of the query
    (``QueryError``, ``WorkerUnavailableError``) and the bridge's Flight errors pass through
    pyarrow's reader unchanged.
    """

    def __init__(self, bridge: LoopBridge, result: RoutedResult) -> None:
        super().__init__()
        self._bridge = bridge
        self._result = result
        self._chunk = memoryview(b"")
        self._whole = False  # the chunk at hand is the whole result
        self._ended = False
        self.cancelled: Callable[[], bool] = never_cancelled

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts: list[memoryview] = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0 and self._fill():
            part = self._chunk[:wanted]
            self._chunk = self._chunk[len(part) :]
            wanted -= len(part)
            parts.append(part)
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def holds_whole_result(self) -> bool:
        """Whether the bytes at hand are the query's whole result (``WholeResult``: it came
        inline, see ``launcher.worker.results``), so the rest of the stream can be read
        without waiting for the worker. Never guessed from the bytes: a batch can end with
        the same eight bytes as the stream's end marker."""
        return self._whole

    def read_to_outcome(self) -> None:
        """After the IPC end-of-stream: wait for the worker's outcome (raising its error)."""
        while self._fill():
            self._chunk = memoryview(b"")  # nothing follows an IPC stream's end marker

    def _fill(self) -> bool:
        """Make sure a chunk is at hand; ``False`` at the end of the stream."""
        while not self._chunk:
            if self._ended:
                return False
            chunk = self._bridge.call(self._result.next_chunk(), self.cancelled)
            if chunk is None:
                self._ended = True
                return False
            self._chunk = memoryview(chunk)
            self._whole = isinstance(chunk, WholeResult)
        return True
