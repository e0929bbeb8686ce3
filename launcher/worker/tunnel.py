"""The worker's side of the tunnel: dial out to the control plane and stay connected.

``TunnelClient.run`` opens ``Tunnel.Connect`` over mutual TLS with the identity ``duckcell
enroll`` wrote, sends Hello, and after the control plane's Welcome sends a Heartbeat every
interval it names. When the stream ends or cannot be opened it dials again after an exponential
backoff with full jitter (a random delay between 0 and ``min(cap, base * 2**attempt)``, so a
fleet of workers does not reconnect in lockstep after a control-plane restart). A Refusal
(revoked, unknown worker, incompatible version) is final: ``run`` raises
``TunnelRefusedError`` and does not dial again. ``stop`` ends ``run`` cleanly.

``drain`` is the graceful way out (the worker's SIGTERM): the client sends ``Draining`` so the
control plane routes nothing more here, keeps heartbeating while ``QueryTasks.drain`` gives the
running queries ``drain_grace_s`` to finish and stops the rest (their clients get the reason
"worker_shutdown"), then hangs up and ``run`` returns. The caller then closes its launcher,
which removes the sandboxes. A second ``drain`` (a second Ctrl-C) stops at once.

``RunQuery`` and ``Cancel`` messages go to ``QueryTasks`` (``launcher.worker.queries``), which
runs each query with the ``QueryRunner`` given to the client and pushes its results on a call of
its own. Queries belong to one stream: when it ends (or on ``stop``) they are cancelled, which
releases their sandboxes, and the control plane tells their clients the worker left.
``SessionOpen`` and ``SessionClose`` go to ``WorkerSessions`` (``launcher.worker.sessions``),
which opens sessions with the runner (when it keeps sessions) and, before each heartbeat,
reports the sessions the worker ended by itself; a stream's sessions end with it too.

Retry or stop, by gRPC status: PERMISSION_DENIED with a refusal reason and UNAUTHENTICATED (no
certificate reached the server: wrong port or identity) stop; every other status, including
UNAVAILABLE (control plane down or restarting) and a failed TLS handshake, is retried.

How the worker dials (keepalive, proxies, backoff) is ``launcher.worker.dialing``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from launcher import __version__
from launcher.errors import CatalogError, PolicyError, TunnelRefusedError
from launcher.link.wire import MESSAGE_OPTIONS, REASON_KEY
from launcher.model.catalog import Catalog
from launcher.model.policy import Policy, load_pushed_policies
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc
from launcher.worker.dialing import Backoff, Keepalive, ProxyConfig
from launcher.worker.enroll import Identity
from launcher.worker.queries import AuditSink, NoQueryRunner, QueryRunner, QueryTasks
from launcher.worker.sessions import NoSessionHost, SessionHost, WorkerSessions

log = logging.getLogger(__name__)

WELCOME_TIMEOUT_S = 10.0
DEFAULT_DRAIN_GRACE_S = 30.0
Sleep = Callable[[float], Awaitable[None]]


class TunnelClient:
    """Keeps this worker's tunnel to the control plane open until ``stop`` or a refusal.

    ``address`` defaults to the identity's tunnel address. ``sleep`` is what backoff waits
    with, so tests can observe or shorten it. ``connected`` is set while a welcomed stream is
    up; ``refusal`` holds the final refusal, if any. ``runner`` runs the queries the control
    plane sends; without one, each is answered with an error. ``audit`` receives one record
    per query (``launcher.worker.audit.WorkerAuditLog``); ``drain_grace_s`` is how long ``drain``
    lets running queries finish. ``proxy`` says how to reach the control plane (see the
    module docstring); without one, gRPC's own reading of the environment applies.
    ``keepalive`` defaults to pings every 10 s answered within 10 s. ``on_catalog`` gets
    each catalog the control plane pushes (right after the Welcome, then on every change).
    ``on_policies`` gets the control plane's policies, validated, whenever their revision
    changes (an empty list when it has none: the worker's own policies apply); when any pushed
    policy is invalid none is taken and the error is logged.
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
        audit: AuditSink | None = None,
        drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
        proxy: ProxyConfig | None = None,
        keepalive: Keepalive | None = None,
        on_catalog: Callable[[Catalog], object] | None = None,
        on_policies: Callable[[list[Policy]], object] | None = None,
        sessions: SessionHost | None = None,
    ) -> None:
        self._identity = identity
        # Who opens the sessions the control plane asks for: by default the runner, when it
        # can (``ExecutorQueryRunner`` does), so every worker that runs queries runs sessions.
        if sessions is None:
            sessions = runner if isinstance(runner, SessionHost) else NoSessionHost()
        self._session_host: SessionHost = sessions
        self._on_catalog = on_catalog or (lambda catalog: None)
        self.catalog_revision = ""
        self._on_policies = on_policies or (lambda policies: None)
        self.policies_revision = ""  # "" until the control plane pushes policies of its own
        self._runner: QueryRunner = runner or NoQueryRunner()
        self._audit = audit
        self._drain_grace_s = drain_grace_s
        self._proxy = proxy or ProxyConfig()
        self._keepalive = keepalive or Keepalive()
        self._queries: QueryTasks | None = None
        self._address = address or identity.tunnel_address
        self._labels = labels or {}
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._version = version
        self._stopping = asyncio.Event()
        self._draining = asyncio.Event()
        self._leaving = asyncio.Event()  # stop or drain: dial no more
        self.connected = asyncio.Event()
        self.refusal: TunnelRefusedError | None = None
        self.connections = 0  # welcomed streams so far
        self._down_since: float | None = None  # when the last welcomed stream ended

    def stop(self) -> None:
        """Ask ``run`` to hang up and return; safe to call from a signal handler."""
        self._stopping.set()
        self._leaving.set()

    def drain(self) -> None:
        """Ask ``run`` to drain (see the module docstring) and return; safe to call from a
        signal handler. Called again while draining, it stops at once."""
        if self._draining.is_set():
            self.stop()
        self._draining.set()
        self._leaving.set()

    async def run(self) -> None:
        """Dial, stay connected, redial with backoff; raises ``TunnelRefusedError``."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._identity.ca_path.read_bytes(),
            private_key=self._identity.key_path.read_bytes(),
            certificate_chain=self._identity.cert_path.read_bytes(),
        )
        attempt = 0
        while not self._leaving.is_set():
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
            if not self._leaving.is_set():
                await self._pause(self._backoff.delay(attempt))
                attempt += 1

    async def _pause(self, delay_s: float) -> None:
        sleeper = asyncio.ensure_future(self._sleep(delay_s))
        stopper = asyncio.ensure_future(self._leaving.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def _connect_once(self, credentials: grpc.ChannelCredentials) -> None:
        """One stream, from dial to its end; returns normally on stop or a clean hang-up."""
        proxying = self._proxy.channel_options(self._address)
        options = (*MESSAGE_OPTIONS, *self._keepalive.channel_options(), *proxying)
        async with aio.secure_channel(self._address, credentials, options) as channel:
            stub = pb_grpc.TunnelStub(channel)
            call = stub.Connect()
            try:
                welcome = await self._handshake(call)
                if welcome is None:
                    return
                self.connections += 1
                self.connected.set()
                log.info(
                    "tunnel up as %s (control plane %s)",
                    welcome.worker_id,
                    welcome.control_plane_version,
                )
                if self._down_since is not None:  # at the drop's level: seen without -v
                    down_s = time.monotonic() - self._down_since
                    log.warning("tunnel to %s back up after %.1f s down", self._address, down_s)
                send = _Sender(call)
                sessions = WorkerSessions(self._session_host, send)
                queries = QueryTasks(
                    self._runner, stub, audit=self._audit, sessions=sessions, send=send
                )
                await self._serve(call, send, queries, sessions, welcome)
            finally:
                if self.connected.is_set():
                    self._down_since = time.monotonic()
                self.connected.clear()
                call.cancel()

    async def _handshake(self, call: aio.StreamStreamCall) -> pb.Welcome | None:
        """Hello, then the Welcome; None on a clean end or when ``stop``/``drain`` came first.

        A dial can stall without failing (a proxy or network that swallows the TLS handshake):
        until the Welcome, the stop event is watched here, so a SIGTERM never waits for it.
        """
        hello = pb.WorkerMessage(hello=pb.Hello(worker_version=self._version, labels=self._labels))

        async def exchange() -> pb.ControlMessage | None:
            async with asyncio.timeout(WELCOME_TIMEOUT_S):
                await _send(call, hello)
                return await self._read(call)

        answer = asyncio.ensure_future(exchange())
        leaving = asyncio.ensure_future(self._leaving.wait())
        try:
            await asyncio.wait({answer, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
        if not answer.done():
            answer.cancel()
            return None
        first = answer.result()  # TunnelRefusedError, AioRpcError or TimeoutError surface here
        return None if first is None else first.welcome

    @property
    def running_queries(self) -> int:
        return len(self._queries) if self._queries is not None else 0

    async def _serve(
        self,
        call: aio.StreamStreamCall,
        send: _Sender,
        queries: QueryTasks,
        sessions: WorkerSessions,
        welcome: pb.Welcome,
    ) -> None:
        """Heartbeat and read until the stream ends or ``stop`` is called.

        Only the reader says how the stream ended: a heartbeat write that loses a race with the
        server closing the stream fails with a local INTERNAL error that hides the real status
        (a refusal, say), so the heartbeat task just stops and the reader reports.
        """
        self._queries = queries
        interval_s = welcome.heartbeat_interval_ms / 1000
        heartbeat = asyncio.create_task(self._heartbeat(send, sessions, interval_s))
        reader = asyncio.create_task(self._read_all(call, queries, sessions))
        stopper = asyncio.create_task(self._stopping.wait())
        drainer = asyncio.create_task(self._draining.wait())
        try:
            await asyncio.wait({reader, stopper, drainer}, return_when=asyncio.FIRST_COMPLETED)
            if drainer.done() and not reader.done() and not stopper.done():
                await self._drain(send, queries, {reader, stopper})
        finally:
            for task in (heartbeat, reader, stopper, drainer):
                task.cancel()
            # Before the channel closes: each query releases its sandbox.
            await queries.close()
            await sessions.close_all()  # the control plane forgets them with the stream
            self._queries = None
        if reader.done() and not reader.cancelled():
            reader.result()  # a refusal or a gRPC error surfaces here

    async def _drain(
        self, send: _Sender, queries: QueryTasks, enders: set[asyncio.Task[Any]]
    ) -> None:
        """Say Draining, then wait for the queries to end (or the stream to, or ``stop``).

        The reader keeps running meanwhile: Cancel messages for running queries still count,
        and a RunQuery that crossed Draining on the wire is answered by ``QueryTasks``.
        """
        log.warning(
            "draining: %d running query(ies) get %g s to finish",
            len(queries),
            self._drain_grace_s,
        )
        draining = pb.Draining(
            grace_ms=round(self._drain_grace_s * 1000), running_queries=len(queries)
        )
        worker = self._identity.worker_id
        # Refuse first: a RunQuery read while Draining is being written must not run. Its
        # refusal goes up the stream after Draining, so the control plane moves it elsewhere.
        queries.refuse_new(worker)
        await send(pb.WorkerMessage(draining=draining))
        drained = asyncio.create_task(queries.drain(self._drain_grace_s, worker))
        try:
            await asyncio.wait({drained, *enders}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
        if drained.done() and not drained.cancelled():
            log.warning("drained: every query has ended; hanging up")

    async def _heartbeat(self, send: _Sender, sessions: WorkerSessions, interval_s: float) -> None:
        while True:
            # Sessions the worker ended by itself are reported at the heartbeat's pace.
            await sessions.sweep()
            beat = pb.Heartbeat(
                sent_unix_ms=int(time.time() * 1000), running_queries=self.running_queries
            )
            if not await send(pb.WorkerMessage(heartbeat=beat)):
                return
            await asyncio.sleep(interval_s)

    async def _read_all(
        self, call: aio.StreamStreamCall, queries: QueryTasks, sessions: WorkerSessions
    ) -> None:
        while (message := await self._read(call)) is not None:
            if message.HasField("run_query"):
                queries.start(message.run_query)
            elif message.HasField("session_open"):
                sessions.open(message.session_open)
            elif message.HasField("session_close"):
                sessions.close(message.session_close.session_id)
            elif message.HasField("cancel"):
                await queries.cancel(message.cancel.query_id)
            elif message.HasField("config"):
                self._apply_config(message.config)

    def _apply_config(self, push: pb.ConfigPush) -> None:
        """Take a pushed catalog and policies; each bad part is logged and the one in force
        stays."""
        self._apply_policies(push)
        try:
            catalog = Catalog.from_json(push.catalog_json)
        except CatalogError as error:
            log.error("catalog revision %s refused, keeping the last: %s", push.revision, error)
            return
        log.info("catalog revision %s: %d table(s)", push.revision, len(catalog.tables))
        self.catalog_revision = push.revision
        self._on_catalog(catalog)

    def _apply_policies(self, push: pb.ConfigPush) -> None:
        """Policies before the catalog: a new role may name a policy that comes with it."""
        if push.policies_revision == self.policies_revision:
            return  # a catalog-only change, or a repeat after a reconnect
        try:
            policies = load_pushed_policies((doc.name, doc.yaml) for doc in push.policies)
            self._on_policies(policies)  # may refuse them too (``PolicyError``)
        except PolicyError as error:
            log.error(
                "policies revision %s refused, keeping the policies in force: %s",
                push.policies_revision,
                error,
            )
            return
        log.info(
            "policies revision %s: %s",
            push.policies_revision or "(none: this worker's own)",
            ", ".join(policy.name for policy in policies) or "-",
        )
        self.policies_revision = push.policies_revision  # only once it took effect

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


class _Sender:
    """Writes on one stream, one message at a time: the heartbeat, the drain and the session
    side all write, and a gRPC call takes one write in flight at a time."""

    def __init__(self, call: aio.StreamStreamCall) -> None:
        self._call = call
        self._lock = asyncio.Lock()

    async def __call__(self, message: pb.WorkerMessage) -> bool:
        async with self._lock:
            return await _send(self._call, message)


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
