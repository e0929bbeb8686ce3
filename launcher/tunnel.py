"""The worker's side of the tunnel: dial out to the control plane and stay connected.

``TunnelClient.run`` opens ``Tunnel.Connect`` over mutual TLS with the identity ``duckcell
enroll`` wrote, sends Hello, and after the control plane's Welcome sends a Heartbeat every
interval it names. When the stream ends or cannot be opened it dials again after an exponential
backoff with full jitter (a random delay between 0 and ``min(cap, base * 2**attempt)``, so a
fleet of workers does not reconnect in lockstep after a control-plane restart). A Refusal
(revoked, unknown worker, incompatible version) is final: ``run`` raises
``TunnelRefusedError`` and does not dial again. ``stop`` ends ``run`` cleanly.

``RunQuery`` and ``Cancel`` messages go to ``QueryTasks`` (``launcher.tunnel_queries``), which
runs each query with the ``QueryRunner`` given to the client and pushes its results on a call of
its own. Queries belong to one stream: when it ends (or on ``stop``) they are cancelled, which
releases their sandboxes, and the control plane tells their clients the worker left.

Retry or stop, by gRPC status: PERMISSION_DENIED with a refusal reason and UNAUTHENTICATED (no
certificate reached the server: wrong port or identity) stop; every other status, including
UNAVAILABLE (control plane down or restarting) and a failed TLS handshake, is retried.

Proxies: gRPC honours ``https_proxy``/``HTTPS_PROXY`` and ``no_proxy``/``NO_PROXY`` by itself
(channel option ``grpc.enable_http_proxy``, on by default) and tunnels the TLS connection
through the proxy with HTTP CONNECT, so nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc import aio

from launcher import __version__
from launcher.controlplane.wire import MESSAGE_OPTIONS, REASON_KEY
from launcher.enroll import Identity
from launcher.errors import TunnelRefusedError
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc
from launcher.tunnel_queries import NoQueryRunner, QueryRunner, QueryTasks

log = logging.getLogger(__name__)

WELCOME_TIMEOUT_S = 10.0
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter; ``random`` returns a float in [0, 1)."""

    base_s: float = 0.5
    cap_s: float = 30.0
    random: Callable[[], float] = _random.random

    def delay(self, attempt: int) -> float:
        return self.random() * min(self.cap_s, self.base_s * 2 ** min(attempt, 32))


class TunnelClient:
    """Keeps this worker's tunnel to the control plane open until ``stop`` or a refusal.

    ``address`` defaults to the identity's tunnel address. ``sleep`` is what backoff waits
    with, so tests can observe or shorten it. ``connected`` is set while a welcomed stream is
    up; ``refusal`` holds the final refusal, if any. ``runner`` runs the queries the control
    plane sends; without one, each is answered with an error.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        address: str | None = None,
        labels: dict[str, str] | None = None,
        backoff: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
        version: str = __version__,
        runner: QueryRunner | None = None,
    ) -> None:
        self._identity = identity
        self._runner: QueryRunner = runner or NoQueryRunner()
        self._queries: QueryTasks | None = None
        self._address = address or identity.tunnel_address
        self._labels = labels or {}
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._version = version
        self._stopping = asyncio.Event()
        self.connected = asyncio.Event()
        self.refusal: TunnelRefusedError | None = None
        self.connections = 0  # welcomed streams so far

    def stop(self) -> None:
        """Ask ``run`` to hang up and return; safe to call from a signal handler."""
        self._stopping.set()

    async def run(self) -> None:
        """Dial, stay connected, redial with backoff; raises ``TunnelRefusedError``."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._identity.ca_path.read_bytes(),
            private_key=self._identity.key_path.read_bytes(),
            certificate_chain=self._identity.cert_path.read_bytes(),
        )
        attempt = 0
        while not self._stopping.is_set():
            welcomed_before = self.connections
            try:
                await self._connect_once(credentials)
            except TunnelRefusedError as refusal:
                self.refusal = refusal
                log.error("tunnel refused: %s", refusal)
                raise
            except aio.AioRpcError as error:
                log.warning(
                    "tunnel to %s: %s %s", self._address, error.code().name, error.details()
                )
            except TimeoutError:
                log.warning(
                    "tunnel to %s: no Welcome within %g s", self._address, WELCOME_TIMEOUT_S
                )
            if self.connections > welcomed_before:
                attempt = 0  # the link worked: start the backoff over
            if not self._stopping.is_set():
                await self._pause(self._backoff.delay(attempt))
                attempt += 1

    async def _pause(self, delay_s: float) -> None:
        sleeper = asyncio.ensure_future(self._sleep(delay_s))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def _connect_once(self, credentials: grpc.ChannelCredentials) -> None:
        """One stream, from dial to its end; returns normally on stop or a clean hang-up."""
        async with aio.secure_channel(self._address, credentials, MESSAGE_OPTIONS) as channel:
            stub = pb_grpc.TunnelStub(channel)
            call = stub.Connect()
            try:
                hello = pb.Hello(worker_version=self._version, labels=self._labels)
                await _send(call, pb.WorkerMessage(hello=hello))
                async with asyncio.timeout(WELCOME_TIMEOUT_S):
                    first = await self._read(call)
                if first is None:
                    return
                welcome = first.welcome
                self.connections += 1
                self.connected.set()
                log.info(
                    "tunnel up as %s (control plane %s)",
                    welcome.worker_id,
                    welcome.control_plane_version,
                )
                await self._serve(call, QueryTasks(self._runner, stub), welcome)
            finally:
                self.connected.clear()
                call.cancel()

    @property
    def running_queries(self) -> int:
        return len(self._queries) if self._queries is not None else 0

    async def _serve(
        self, call: aio.StreamStreamCall, queries: QueryTasks, welcome: pb.Welcome
    ) -> None:
        """Heartbeat and read until the stream ends or ``stop`` is called.

        Only the reader says how the stream ended: a heartbeat write that loses a race with the
        server closing the stream fails with a local INTERNAL error that hides the real status
        (a refusal, say), so the heartbeat task just stops and the reader reports.
        """
        self._queries = queries
        interval_s = welcome.heartbeat_interval_ms / 1000
        heartbeat = asyncio.create_task(self._heartbeat(call, interval_s))
        reader = asyncio.create_task(self._read_all(call, queries))
        stopper = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (heartbeat, reader, stopper):
                task.cancel()
            # Before the channel closes: each query releases its sandbox.
            await queries.close()
            self._queries = None
        if reader.done() and not reader.cancelled():
            reader.result()  # a refusal or a gRPC error surfaces here

    async def _heartbeat(self, call: aio.StreamStreamCall, interval_s: float) -> None:
        while True:
            beat = pb.Heartbeat(
                sent_unix_ms=int(time.time() * 1000), running_queries=self.running_queries
            )
            if not await _send(call, pb.WorkerMessage(heartbeat=beat)):
                return
            await asyncio.sleep(interval_s)

    async def _read_all(self, call: aio.StreamStreamCall, queries: QueryTasks) -> None:
        while (message := await self._read(call)) is not None:
            if message.HasField("run_query"):
                queries.start(message.run_query)
            elif message.HasField("cancel"):
                await queries.cancel(message.cancel.query_id)

    async def _read(self, call: aio.StreamStreamCall) -> pb.ControlMessage | None:
        """The next message, or None at a clean end; a refusal raises ``TunnelRefusedError``."""
        try:
            message = await call.read()
        except aio.AioRpcError as error:
            raise _translate(error) from None
        if message is aio.EOF:
            return None
        if message.HasField("refusal"):
            refusal = message.refusal
            raise TunnelRefusedError(refusal.message, refusal.reason)
        return message


async def _send(call: aio.StreamStreamCall, message: pb.WorkerMessage) -> bool:
    """Write one message; False when the stream is already over (reading tells why)."""
    try:
        await call.write(message)
    except (aio.AioRpcError, asyncio.InvalidStateError):
        return False
    return True


def _translate(error: aio.AioRpcError) -> Exception:
    """Final refusals become ``TunnelRefusedError``; anything else is retried as it is."""
    code = error.code()
    reason = dict(error.trailing_metadata() or ()).get(REASON_KEY)
    if code == grpc.StatusCode.PERMISSION_DENIED and reason:
        return TunnelRefusedError(error.details() or "refused", str(reason))
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return TunnelRefusedError(error.details() or "no client certificate", "unauthenticated")
    return error
