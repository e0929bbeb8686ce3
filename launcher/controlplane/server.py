"""The control plane's gRPC server. So far it serves enrollment; the tunnel comes next.

Enrollment runs over server-authenticated TLS: a new worker has no certificate yet, so client
certificates are requested but not required. The certificate chain the server presents is its
leaf followed by the CA certificate, because the worker pins the CA by reading it from the
handshake and comparing its hash with the one its token carries (see ``launcher.enroll``).

All database work happens on the event loop's thread: the SQLite connection is opened in
``start`` and used by one thread only, and each enrollment is a couple of short writes.
"""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
import time

import grpc
from grpc import aio

from launcher import __version__
from launcher.errors import CertificateError, ControlPlaneError, EnrollmentError
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc

from .ca import CertificateAuthority
from .datadir import ControlPlaneData
from .registry import WorkerRegistry, new_worker_id
from .tokens import Clock, EnrollmentTokens
from .wire import REASON_KEY, split_address

log = logging.getLogger(__name__)

# Hosts every server certificate is valid for, so loopback deployments and tests just work.
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
# Wildcard listen addresses are not names a client can dial, so they never go into the SANs.
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


class EnrollmentService(pb_grpc.EnrollmentServicer):
    """Swaps a one-time token and a CSR for a worker id and a signed client certificate."""

    def __init__(
        self, ca: CertificateAuthority, tokens: EnrollmentTokens, registry: WorkerRegistry
    ) -> None:
        self._ca = ca
        self._tokens = tokens
        self._registry = registry

    async def Enroll(  # the generated servicer's method name
        self, request: pb.EnrollRequest, context: aio.ServicerContext
    ) -> pb.EnrollReply:
        # The token is redeemed before the CSR is even parsed: nobody without a valid token gets
        # the CA to do any work, and a token is spent once whatever happens next.
        try:
            token_id = self._tokens.redeem(request.token)
            worker_id = new_worker_id()
            cert_pem, serial = self._ca.sign_worker_csr(request.csr_pem, worker_id=worker_id)
        except EnrollmentError as error:
            log.info("enrollment refused (%s): %s", error.reason, error)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                str(error),
                trailing_metadata=((REASON_KEY, error.reason),),
            )
        except CertificateError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        worker = self._registry.register(
            worker_id=worker_id,
            name=request.worker_name or worker_id,
            cert_serial=serial,
            token_id=token_id,
            version=request.worker_version,
        )
        log.info("enrolled worker %s (%s) with token %s", worker.worker_id, worker.name, token_id)
        return pb.EnrollReply(
            worker_id=worker.worker_id,
            certificate_pem=cert_pem,
            ca_pem=self._ca.cert_pem(),
            control_plane_version=__version__,
        )


class ControlPlaneServer:
    """The reference control plane's network side: ``await start()``, then ``await stop()``.

    ``listen`` is ``HOST:PORT``; port 0 picks a free port, readable from ``port`` after start.
    ``hosts`` are extra names the TLS certificate is valid for. Raises ``ControlPlaneError``
    when the address cannot be bound.
    """

    def __init__(
        self,
        data: ControlPlaneData,
        listen: str,
        hosts: list[str] | None = None,
        *,
        clock: Clock = time.time,
    ) -> None:
        self._data = data
        self._listen = listen
        self._host, _ = split_address(listen)
        self._hosts = [*DEFAULT_HOSTS, *([] if self._host in _WILDCARDS else [self._host])]
        self._hosts += hosts or []
        self._clock = clock
        self._server: aio.Server | None = None
        self._conn: sqlite3.Connection | None = None
        self.port = 0

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if _is_ipv6(self._host) else self._host
        return f"{host}:{self.port}"

    def fingerprint(self) -> str:
        return self._data.ca().fingerprint()

    async def start(self) -> None:
        ca = self._data.ca()
        cert_pem, key_pem = ca.issue_server_cert(self._hosts)
        credentials = grpc.ssl_server_credentials(
            [(key_pem, cert_pem + ca.cert_pem())],
            root_certificates=ca.cert_pem(),
            require_client_auth=False,
        )
        self._conn = self._data.database()
        tokens = EnrollmentTokens(self._conn, ca_fingerprint=ca.fingerprint(), clock=self._clock)
        registry = WorkerRegistry(self._conn, clock=self._clock)
        server = aio.server()
        pb_grpc.add_EnrollmentServicer_to_server(EnrollmentService(ca, tokens, registry), server)
        try:
            self.port = server.add_secure_port(self._listen, credentials)
        except RuntimeError as exc:
            raise ControlPlaneError(
                f"cannot listen on {self._listen}: {exc}; is the port in use?"
            ) from None
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting, give running calls ``grace`` seconds, then close the database."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False
