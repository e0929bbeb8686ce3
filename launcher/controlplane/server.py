"""The control plane's gRPC server: enrollment and the workers' tunnel, on two ports.

Enrollment and the clients' ``Query`` service run over server-authenticated TLS: a new worker
has no certificate yet, and clients authenticate with an API key instead. The tunnel
runs over mutual TLS: its port requires a client certificate signed by the CA. They cannot share
one port because gRPC's Python server either ignores client certificates or requires them; it
has no "request but do not require" mode (with ``require_client_auth=False`` the certificate is
not even asked for, so the peer's identity would be unknown). Both services are registered on
both ports; a tunnel call on the enrollment port has no certificate and gets UNAUTHENTICATED.
The enrollment reply tells the worker the tunnel port. The certificate chain the server presents
is its leaf followed by the CA certificate, because the worker pins the CA by reading it from
the handshake and comparing its hash with the one its token carries (see
``launcher.worker.enroll``).

All database work happens on the event loop's thread: the SQLite connection is opened in
``start`` and used by one thread only, and each enrollment is a couple of short writes, each
query one audit row (opened before it is sent, closed when it ends). ``start`` reconciles the
audit first: rows a dead process left running are recorded lost.

Keepalive (``KEEPALIVE_OPTIONS``): the server pings each connection every 10 s and drops it when
a ping is not answered within 10 s, so a worker whose host vanished without closing its TCP
connection is noticed within about 20 s even before its missed heartbeats (3 x 5 s) end the
tunnel. Workers ping every 10 s too (``launcher.worker.tunnel.Keepalive``); the server lets a client
ping as often as every 5 s without data, so their pings never earn strikes and a GOAWAY
("too_many_pings"). ``grpc.http2.ping_timeout_ms`` is set with the keepalive timeout because
grpcio 1.85 waits that long (60 s by default) for a ping's answer, whatever the keepalive says.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import Message
from grpc import aio

from launcher import __version__
from launcher.errors import CertificateError, ControlPlaneError, EnrollmentError
from launcher.model.sql import ParserPool
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc

from ..link.wire import MESSAGE_OPTIONS, REASON_KEY, is_ipv6, split_address
from .apikeys import ApiKeys
from .audit import AuditLog, prune_forever
from .ca import CertificateAuthority
from .catalogs import CatalogVersion, CatalogWatcher
from .datadir import ControlPlaneData
from .policies import PolicyDocuments, PolicyWatcher
from .query import QueryService
from .registry import Worker, WorkerRegistry, new_worker_id
from .routing import QueryRouter
from .tokens import Clock, EnrollmentTokens
from .tunnel import DEFAULT_HEARTBEAT_INTERVAL_S, TunnelService, revoked_refusal

log = logging.getLogger(__name__)

# Hosts every server certificate is valid for, so loopback deployments and tests just work.
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
# Wildcard listen addresses are not names a client can dial, so they never go into the SANs.
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
# See the module docstring for why these numbers.
KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
)


class EnrollmentService(pb_grpc.EnrollmentServicer):
    """Swaps a one-time token and a CSR for a worker id and a signed client certificate."""

    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: EnrollmentTokens,
        registry: WorkerRegistry,
        tunnel_port: int,
    ) -> None:
        self._ca = ca
        self._tokens = tokens
        self._registry = registry
        self._tunnel_port = tunnel_port

    async def Enroll(  # the generated servicer's method name
        self, request: pb.EnrollRequest, context: aio.ServicerContext
    ) -> pb.EnrollReply:
        # The token is redeemed before the CSR is even parsed: nobody without a valid token gets
        # the CA to do any work, and a token is spent once whatever happens next.
        try:
            worker_id = new_worker_id()
            name = request.worker_name or worker_id
            token_id = self._tokens.redeem(
                request.token, before_use=lambda: self._registry.check_name(name)
            )
            cert_pem, serial = self._ca.sign_worker_csr(request.csr_pem, worker_id=worker_id)
            worker = self._registry.register(
                worker_id=worker_id,
                name=name,
                cert_serial=serial,
                token_id=token_id,
                version=request.worker_version,
            )
        except EnrollmentError as error:
            log.info("enrollment refused (%s): %s", error.reason, error)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                str(error),
                trailing_metadata=((REASON_KEY, error.reason),),
            )
        except CertificateError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        log.info("enrolled worker %s (%s) with token %s", worker.worker_id, worker.name, token_id)
        return pb.EnrollReply(
            worker_id=worker.worker_id,
            certificate_pem=cert_pem,
            ca_pem=self._ca.cert_pem(),
            control_plane_version=__version__,
            tunnel_port=self._tunnel_port,
        )


class ControlPlaneServer:
    """The reference control plane's network side: ``await start()``, then ``await stop()``.

    ``listen`` is ``HOST:PORT`` for enrollment; the tunnel listens on ``tunnel_listen``, by
    default the same host and the next port. Port 0 picks a free port, readable from ``port`` and
    ``tunnel_port`` after start. ``hosts`` are extra names the TLS certificate is valid for.
    Raises ``ControlPlaneError`` when an address cannot be bound.
    """

    def __init__(
        self,
        data: ControlPlaneData,
        listen: str,
        hosts: list[str] | None = None,
        *,
        tunnel_listen: str | None = None,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        clock: Clock = time.time,
        observe: Callable[[Message], object] = lambda message: None,
        audit_retention_s: float | None = None,
    ) -> None:
        self._observe = observe  # sees every message workers send (see TunnelService)
        # None keeps every audit record; else older ones are deleted at start and hourly.
        self._audit_retention_s = audit_retention_s
        self._prune_task: asyncio.Task[None] | None = None
        self._data = data
        self._listen = listen
        self._host, port = split_address(listen, listening=True)
        if tunnel_listen:
            split_address(tunnel_listen, listening=True)  # checked here, not by gRPC's bind
        self._tunnel_listen = tunnel_listen or _next_port(listen, port)
        self._heartbeat_interval_s = heartbeat_interval_s
        self._hosts = [*DEFAULT_HOSTS, *([] if self._host in _WILDCARDS else [self._host])]
        self._hosts += hosts or []
        self._clock = clock
        self._server: aio.Server | None = None
        self._catalog_task: asyncio.Task[None] | None = None
        self.catalog = CatalogWatcher(data.root, self._push_catalog)
        self._policies_task: asyncio.Task[None] | None = None
        self.policies = PolicyWatcher(data.root, self._push_policies)
        self.router: QueryRouter | None = None
        self.audit: AuditLog | None = None  # the query audit log, once started
        # Parses SQL for the router and Flight SQL, in child processes (``launcher.model.sql``).
        self.parser: ParserPool | None = None
        # API keys over this server's database, for the surfaces clients call (Flight SQL).
        self.api_keys: ApiKeys | None = None
        self._conn: sqlite3.Connection | None = None
        self._tunnel: TunnelService | None = None
        self._registry: WorkerRegistry | None = None
        self.port = 0
        self.tunnel_port = 0

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if is_ipv6(self._host) else self._host
        return f"{host}:{self.port}"

    @property
    def tunnel_address(self) -> str:
        host = f"[{self._host}]" if is_ipv6(self._host) else self._host
        return f"{host}:{self.tunnel_port}"

    def fingerprint(self) -> str:
        return self._data.ca().fingerprint()

    def ca(self) -> CertificateAuthority:
        """The CA whose certificates this server presents (a Flight SQL endpoint's too)."""
        return self._data.ca()

    @property
    def hosts(self) -> list[str]:
        """The names and addresses this server's TLS certificates are valid for."""
        return list(self._hosts)

    async def start(self) -> None:
        ca = self._data.ca()
        cert_pem, key_pem = ca.issue_server_cert(self._hosts)
        pairs = [(key_pem, cert_pem + ca.cert_pem())]
        self._conn = self._data.database()
        tokens = EnrollmentTokens(self._conn, ca_fingerprint=ca.fingerprint(), clock=self._clock)
        self._registry = WorkerRegistry(self._conn, clock=self._clock)
        self._registry.mark_offline()  # nobody is connected yet, whatever a crash left behind
        audit = self.audit = AuditLog(self._conn)
        audit.reconcile(self._clock())  # rows a dead process left "running" become "lost"
        server = aio.server(options=(*MESSAGE_OPTIONS, *KEEPALIVE_OPTIONS))
        self.port = _bind(server, self._listen, grpc.ssl_server_credentials(pairs))
        mutual = grpc.ssl_server_credentials(
            pairs, root_certificates=ca.cert_pem(), require_client_auth=True
        )
        self.tunnel_port = _bind(server, self._tunnel_listen, mutual)
        enrollment = EnrollmentService(ca, tokens, self._registry, self.tunnel_port)
        pb_grpc.add_EnrollmentServicer_to_server(enrollment, server)
        self.parser = ParserPool()
        router = QueryRouter(
            audit=audit,
            clock=self._clock,
            catalog=lambda: self.catalog.current.catalog,
            parser=self.parser,
        )
        self.router = router
        self._tunnel = TunnelService(
            self._registry,
            router,
            heartbeat_interval_s=self._heartbeat_interval_s,
            config=lambda: config_push(self.catalog.current, self.policies.current),
            observe=self._observe,
        )
        pb_grpc.add_TunnelServicer_to_server(self._tunnel, server)
        # Served on both ports like the others; clients use the enrollment port (server TLS).
        self.api_keys = ApiKeys(self._conn)
        service = QueryService(self.api_keys, router, catalog=lambda: self.catalog.current.catalog)
        pb_grpc.add_QueryServicer_to_server(service, server)
        await server.start()
        self._server = server
        self._catalog_task = asyncio.create_task(self.catalog.run())
        self._policies_task = asyncio.create_task(self.policies.run())
        if self._audit_retention_s is not None:
            pruning = prune_forever(audit, self._audit_retention_s, clock=self._clock)
            self._prune_task = asyncio.create_task(pruning)

    def _push_catalog(self, version: CatalogVersion) -> None:
        """A new catalog revision was applied: every connected worker gets it now.

        The policies are looked at first: a role in the new catalog may name a policy applied
        just before it, and the two must reach the workers in one push (that push is made by
        the policies' own change, which carries this catalog)."""
        if self.policies.check():
            return
        if self.router is not None:
            push = config_push(version, self.policies.current)
            self.router.broadcast(pb.ControlMessage(config=push))

    def _push_policies(self, documents: PolicyDocuments) -> None:
        """The policies changed: every connected worker gets them now (with the catalog, read
        again first for the same reason as in ``_push_catalog``)."""
        if self.catalog.check():
            return
        if self.router is not None:
            push = config_push(self.catalog.current, documents)
            self.router.broadcast(pb.ControlMessage(config=push))

    async def revoke(self, worker_id: str) -> Worker:
        """Revoke a worker and close its tunnel now (the CLI, in another process, only writes
        the database; the tunnel then notices at the worker's next heartbeat)."""
        if self._registry is None or self._tunnel is None:
            raise ControlPlaneError("the control plane is not running")
        worker = self._registry.revoke(worker_id)
        self._tunnel.disconnect(worker_id, revoked_refusal(worker_id))
        return worker

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, give running calls ``grace`` seconds, then close the database.

        Tunnels never finish by themselves, so they are told to close first (their workers
        reconnect with backoff until a control plane answers again).
        """
        if self._catalog_task is not None:
            self._catalog_task.cancel()
            self._catalog_task = None
        if self._policies_task is not None:
            self._policies_task.cancel()
            self._policies_task = None
        if self._prune_task is not None:
            self._prune_task.cancel()
            self._prune_task = None
        if self._tunnel is not None:
            self._tunnel.close_all("the control plane is shutting down")
            self._tunnel = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.parser is not None:
            await self.parser.close()
            self.parser = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._registry = None


def config_push(version: CatalogVersion, policies: PolicyDocuments) -> pb.ConfigPush:
    return pb.ConfigPush(
        revision=version.revision,
        catalog_json=version.catalog.to_json(),
        policies=[pb.PolicyDocument(name=n, yaml=t) for n, t in policies.texts.items()],
        policies_revision=policies.revision,
    )


def _bind(server: aio.Server, listen: str, credentials: grpc.ServerCredentials) -> int:
    try:
        return server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise ControlPlaneError(f"cannot listen on {listen}: {exc}; is the port in use?") from None


def _next_port(listen: str, port: int) -> str:
    """The default tunnel address: the enrollment port plus one (or any free port for 0)."""
    if port >= 65535:
        raise ControlPlaneError(
            f"the tunnel listens on the enrollment port plus one, and {listen} leaves none; "
            "choose a lower port or give --tunnel-listen HOST:PORT"
        )
    return f"{listen.rpartition(':')[0]}:{port + 1 if port else 0}"
