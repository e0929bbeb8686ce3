"""The control plane's side of the tunnel: one long-lived stream per enrolled worker.

A worker dials in over mutual TLS (the server requires a client certificate signed by its CA on
the tunnel port) and is named by its certificate's CN; the serial must be the one recorded at
enrollment, and a revoked, unknown or incompatible worker gets a ``Refusal`` message followed by
PERMISSION_DENIED. Otherwise it is welcomed with the heartbeat interval, marked online, and its
heartbeats keep it so; each heartbeat also re-reads the registry, so a revocation made by another
process (the CLI) closes the stream within one interval. The stream ends, and the worker is marked
offline, when the worker hangs up, misses three heartbeats, or is revoked here (``disconnect``).
Only heartbeats count as signs of life (``HeartbeatWatch``): a stream that carries other messages
but no heartbeat for three intervals is ended all the same, and gRPC keepalive (see ``server``)
catches connections that died without a word. A ``Draining`` message tells the router to pick
the worker no more; the stream itself stays until the worker hangs up.

Each stream's messages are read by a small pump task into an inbox queue; ``disconnect`` puts a
close order in the same queue, so the handler has one place to wait and all its database work
stays on the event loop's thread. Messages to the worker (``RunQuery``, ``Cancel``,
``SessionOpen``, ``SessionClose``) go through the outbox the ``QueryRouter`` hands out on
connect; a writer task per stream drains it.
``PushResults`` calls are handed to the router, which relays them to the waiting client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import Message
from grpc import aio

from launcher import __version__
from launcher.errors import CertificateError
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc

from ..link.wire import REASON_KEY
from .ca import subject_and_serial
from .registry import Worker, WorkerRegistry
from .routing import Outbox, QueryRouter, UnknownQueryError

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
# A worker that misses this many heartbeats in a row is taken for gone.
MISSED_HEARTBEATS = 3
HELLO_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class _Close:
    """An order to end a stream: with a refusal (final), a status (the worker may retry), or
    neither (the worker hung up)."""

    refusal: pb.Refusal | None = None
    code: grpc.StatusCode | None = None
    message: str = ""


@dataclass(slots=True)
class HeartbeatWatch:
    """When a worker is taken for gone: ``MISSED_HEARTBEATS`` intervals after its last
    heartbeat (or its welcome). Times are the event loop's clock, so tests can pass their own.
    Messages other than heartbeats do not count, so a stream cannot stay up on them alone."""

    interval_s: float
    last_beat: float

    @property
    def deadline(self) -> float:
        return self.last_beat + MISSED_HEARTBEATS * self.interval_s

    def beat(self, now: float) -> None:
        self.last_beat = now

    def overdue(self, now: float) -> bool:
        return now >= self.deadline


@dataclass(slots=True)
class _Link:
    worker_id: str
    inbox: asyncio.Queue[pb.WorkerMessage | _Close] = field(default_factory=asyncio.Queue)


def major(version: str) -> str:
    return version.split(".", 1)[0]


class TunnelService(pb_grpc.TunnelServicer):
    """Serves ``Tunnel.Connect`` and keeps the map of live streams, one per worker id."""

    def __init__(
        self,
        registry: WorkerRegistry,
        router: QueryRouter,
        *,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        version: str = __version__,
        config: Callable[[], pb.ConfigPush] = pb.ConfigPush,
        observe: Callable[[Message], object] = lambda message: None,
    ) -> None:
        self._registry = registry
        self._router = router
        self._config = config  # the catalog push every worker gets right after its Welcome
        # Sees every message a worker sends (tests prove what never crosses the tunnel).
        self._observe = observe
        self._interval_s = heartbeat_interval_s
        self._version = version
        self._live: dict[str, _Link] = {}

    def online(self) -> list[str]:
        """Ids of the workers with a live stream on this server."""
        return sorted(self._live)

    def disconnect(self, worker_id: str, refusal: pb.Refusal) -> bool:
        """Close ``worker_id``'s stream with ``refusal``; False when it has none here."""
        link = self._live.get(worker_id)
        if link is not None:
            link.inbox.put_nowait(_Close(refusal=refusal))
        return link is not None

    def close_all(self, message: str) -> None:
        """End every stream with UNAVAILABLE: the workers will reconnect."""
        for link in self._live.values():
            link.inbox.put_nowait(_Close(code=grpc.StatusCode.UNAVAILABLE, message=message))

    async def Connect(  # the generated servicer's method name
        self,
        request_iterator: object,  # unused: messages are read with context.read()
        context: aio.ServicerContext[pb.WorkerMessage, pb.ControlMessage],
    ) -> None:
        # Hello is read before any refusal: aborting while the worker is still sending it would
        # show the worker a local INTERNAL error instead of the refusal.
        hello = await self._hello(context)
        worker_id, serial = await self._peer(context)
        worker = self._registry.get(worker_id)
        refusal = _standing(worker_id, serial, worker)
        if refusal is None:
            refusal = self._version_refusal(hello.worker_version)
        if refusal is not None:
            await _refuse(context, worker_id, refusal)
        link = _Link(worker_id)
        previous = self._live.get(worker_id)
        if previous is not None:  # a stale stream the server has not noticed dying yet
            message = "replaced by a newer connection of the same worker"
            previous.inbox.put_nowait(_Close(code=grpc.StatusCode.ABORTED, message=message))
        self._live[worker_id] = link
        pump = asyncio.create_task(_pump(context, link, self._observe))
        writer: asyncio.Task[None] | None = None
        outbox: Outbox | None = None
        try:
            self._registry.mark_online(
                worker_id, version=hello.worker_version, labels=dict(hello.labels)
            )
            log.info("worker %s connected (version %s)", worker_id, hello.worker_version)
            # Routable before the worker hears its Welcome (so a client that waited for the
            # worker to connect finds it), but the writer that drains the outbox starts only
            # after the Welcome and the catalog: a RunQuery never precedes either.
            name = worker.name if worker is not None else ""
            outbox = self._router.worker_connected(worker_id, name)
            await context.write(pb.ControlMessage(welcome=self._welcome(worker_id)))
            await context.write(pb.ControlMessage(config=self._config()))
            writer = asyncio.create_task(_write(context, outbox))
            close = await self._watch(link, serial, outbox)
        finally:
            pump.cancel()
            if writer is not None:
                writer.cancel()
            if outbox is not None:
                self._router.worker_gone(worker_id, outbox)
            if self._live.get(worker_id) is link:
                del self._live[worker_id]
                self._registry.mark_offline(worker_id)
            log.info("worker %s disconnected", worker_id)
        if close.refusal is not None:
            await _refuse(context, worker_id, close.refusal)
        if close.code is not None:
            await context.abort(close.code, close.message)

    async def PushResults(  # the generated servicer's method name
        self,
        request_iterator: AsyncIterator[pb.ResultChunk],
        context: aio.ServicerContext[pb.ResultChunk, pb.PushAck],
    ) -> pb.PushAck:
        worker_id, serial = await self._peer(context)
        worker = self._registry.get(worker_id)
        refusal = _standing(worker_id, serial, worker)
        if refusal is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal.message)
        request_iterator = _observed(request_iterator, self._observe)
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("query_id"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "PushResults must open with the query id"
            )
        try:
            await self._router.accept(worker_id, first.query_id, request_iterator)
        except UnknownQueryError as error:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        return pb.PushAck()

    async def _peer(self, context: aio.ServicerContext) -> tuple[str, int]:
        """The worker id and certificate serial of the verified client certificate."""
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the tunnel needs the worker's client certificate: connect to the tunnel port "
                "with the identity `duckcell enroll` wrote",
            )
        try:
            return subject_and_serial(pems[0])
        except CertificateError as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        raise AssertionError("unreachable: abort raises")

    async def _hello(self, context: aio.ServicerContext) -> pb.Hello:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                message = await context.read()
        except TimeoutError:
            message = aio.EOF
        if message is aio.EOF or not message.HasField("hello"):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a tunnel must open with a Hello message"
            )
        return message.hello

    def _version_refusal(self, worker_version: str) -> pb.Refusal | None:
        if major(worker_version) == major(self._version):
            return None
        return pb.Refusal(
            reason="version",
            message=f"worker version {worker_version or '(none)'} is not compatible with control "
            f"plane version {self._version} (major versions differ): upgrade the older side",
        )

    def _welcome(self, worker_id: str) -> pb.Welcome:
        return pb.Welcome(
            worker_id=worker_id,
            control_plane_version=self._version,
            heartbeat_interval_ms=round(self._interval_s * 1000),
        )

    async def _watch(self, link: _Link, serial: int, outbox: Outbox) -> _Close:
        """Handle the worker's messages until something ends the stream; say how to end it."""
        silence_s = MISSED_HEARTBEATS * self._interval_s
        loop = asyncio.get_running_loop()
        watch = HeartbeatWatch(self._interval_s, loop.time())
        while True:
            try:
                async with asyncio.timeout_at(watch.deadline):
                    item = await link.inbox.get()
            except TimeoutError:
                log.warning("worker %s missed %d heartbeats", link.worker_id, MISSED_HEARTBEATS)
                return _Close(
                    code=grpc.StatusCode.UNAVAILABLE,
                    message=f"no heartbeat for {silence_s:g} s: reconnect",
                )
            if isinstance(item, _Close):
                return item
            if item.HasField("draining"):
                self._router.worker_draining(link.worker_id, outbox)
                self._registry.mark_draining(link.worker_id)
            if item.HasField("session_opened"):
                self._router.session_opened(link.worker_id, outbox, item.session_opened)
            if item.HasField("session_ended"):
                self._router.session_ended(link.worker_id, outbox, item.session_ended)
            if item.HasField("result"):
                self._router.deliver(link.worker_id, item.result)
            if item.HasField("heartbeat"):
                watch.beat(loop.time())
                # Re-read the registry: a revocation by another process shows up here.
                worker = self._registry.get(link.worker_id)
                refusal = _standing(link.worker_id, serial, worker)
                if refusal is not None:
                    return _Close(refusal=refusal)
                self._registry.mark_online(link.worker_id)


async def _observed(
    chunks: AsyncIterator[pb.ResultChunk], observe: Callable[[Message], object]
) -> AsyncIterator[pb.ResultChunk]:
    async for chunk in chunks:
        observe(chunk)
        yield chunk


async def _pump(
    context: aio.ServicerContext, link: _Link, observe: Callable[[Message], object]
) -> None:
    """Move the worker's messages into the inbox; a hang-up becomes an empty close order."""
    try:
        while (message := await context.read()) is not aio.EOF:
            observe(message)
            link.inbox.put_nowait(message)
    finally:
        link.inbox.put_nowait(_Close())


async def _write(context: aio.ServicerContext, outbox: Outbox) -> None:
    """Send the router's messages to the worker; a failed write means the stream is over,
    which the pump reports."""
    while True:
        message = await outbox.get()
        try:
            await context.write(message)
        except (aio.AioRpcError, asyncio.InvalidStateError, RuntimeError):
            return


def _standing(worker_id: str, serial: int, worker: Worker | None) -> pb.Refusal | None:
    """Why this certificate may not hold a tunnel, or None when it may."""
    if worker is None:
        return pb.Refusal(
            reason="unknown_worker",
            message=f"no enrolled worker {worker_id}: enroll again with a new token",
        )
    if worker.revoked_at is not None:
        return revoked_refusal(worker_id)
    if worker.cert_serial != serial:
        return pb.Refusal(
            reason="certificate",
            message=f"certificate serial {serial:x} is not the one worker {worker_id} enrolled "
            "with: use the identity `duckcell enroll` wrote, or enroll again",
        )
    return None


def revoked_refusal(worker_id: str) -> pb.Refusal:
    return pb.Refusal(
        reason="revoked",
        message=f"worker {worker_id} was revoked on the control plane: to bring this host back, "
        "remove its identity directory and enroll it again with a new token",
    )


async def _refuse(context: aio.ServicerContext, worker_id: str, refusal: pb.Refusal) -> None:
    """Send the refusal as the stream's last message, then end it with PERMISSION_DENIED."""
    log.info("tunnel of worker %s refused (%s)", worker_id, refusal.reason)
    await context.write(pb.ControlMessage(refusal=refusal))
    await context.abort(
        grpc.StatusCode.PERMISSION_DENIED,
        refusal.message,
        trailing_metadata=((REASON_KEY, refusal.reason),),
    )
