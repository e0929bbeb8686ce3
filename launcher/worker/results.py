"""How one query's results leave the worker: inline on the tunnel stream, or on their own call.

A small result costs more to ship than to compute: opening ``Tunnel.PushResults`` (new HTTP/2
stream, a handler on the control plane), one awaited write per IPC piece and the call's answer
are several round trips of the loop on both sides. So ``ResultSink`` holds the first pieces
back: when the query ends before they pass ``INLINE_LIMIT`` bytes, the whole IPC stream and the
outcome go up the tunnel stream as one ``QueryResult`` message. Past the limit it opens the
query's own ``PushResults`` call, sends what it held as one piece and streams the rest, so a
large result keeps its per-query flow control and never holds up the shared stream.

The pieces are forwarded as the runner wrote them (concatenated Arrow IPC is still one valid
stream); nothing is decoded here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from grpc import aio

from ..protocol import controlplane_pb2 as pb
from ..protocol import controlplane_pb2_grpc as pb_grpc

# Up to this many bytes of Arrow IPC a result may ride inline. Big enough for the answers of
# point lookups, aggregates and metadata queries, small enough not to delay the heartbeats and
# the other queries' messages on the shared stream by more than a moment.
INLINE_LIMIT = 256 * 1024

Send = Callable[[pb.WorkerMessage], Awaitable[bool]]


class ResultSink:
    """Collects one query's IPC pieces and delivers them with its outcome.

    ``send`` writes on the tunnel stream (``None``: every result gets its own call), when
    ``inline_now`` says so at the end: a draining worker hangs up right after its last
    outcomes, and only a ``PushResults`` call's answer proves the control plane read one. Use
    ``add`` for each piece, then ``finish`` once with the outcome; ``close`` always, in a
    ``finally`` (it cancels a call left open by an error or a cancellation).
    """

    def __init__(
        self,
        query_id: str,
        stub: pb_grpc.TunnelStub,
        send: Send | None,
        *,
        inline_limit: int = INLINE_LIMIT,
        inline_now: Callable[[], bool] = lambda: True,
    ) -> None:
        self._query_id = query_id
        self._stub = stub
        self._send = send
        self._inline_now = inline_now
        self._limit = inline_limit if send is not None else -1
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._call: aio.StreamUnaryCall | None = None

    @property
    def streaming(self) -> bool:
        """True once the result went past the inline limit onto its own call."""
        return self._call is not None

    async def add(self, piece: bytes) -> None:
        if self._call is None and self._held_bytes + len(piece) <= self._limit:
            self._held.append(piece)
            self._held_bytes += len(piece)
            return
        call = await self._open()
        await call.write(pb.ResultChunk(ipc=piece))

    async def finish(self, outcome: pb.Outcome) -> bool:
        """Deliver what is held and the outcome; False when the stream it went to was over.

        Raises ``aio.AioRpcError`` (or ``asyncio.InvalidStateError``) when the control plane
        ended the query's call: it stopped waiting for this result.
        """
        if self._call is None and self._send is not None and self._inline_now():
            result = pb.QueryResult(query_id=self._query_id, ipc=self._take(), outcome=outcome)
            # Shielded: the stream is shared, and gRPC cancels the whole call when a write on
            # it is cancelled, which a Cancel for this query arriving mid-write would do.
            return await asyncio.shield(self._send(pb.WorkerMessage(result=result)))
        call = await self._open()
        await call.write(pb.ResultChunk(outcome=outcome))
        await call.done_writing()
        await call
        return True

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()

    async def _open(self) -> aio.StreamUnaryCall:
        if self._call is None:
            self._call = self._stub.PushResults()
            await self._call.write(pb.ResultChunk(query_id=self._query_id))
            if self._held:
                await self._call.write(pb.ResultChunk(ipc=self._take()))
        return self._call

    def _take(self) -> bytes:
        held = b"".join(self._held)
        self._held.clear()
        self._held_bytes = 0
        return held
