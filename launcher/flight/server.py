"""The Flight SQL endpoint beside the control plane: ``await start()``, then ``await stop()``.

TLS is on by default, with a server certificate from the control plane's CA (the same chain the
enrollment port presents, so clients trust the CA file `duckcell controlplane ca` prints).
Plaintext is only for loopback listen addresses: an API key must never cross a network in the
clear, so ``FlightListen.parse`` refuses anything else before a port is opened.

``start`` runs on the control plane's loop and remembers it: every handler thread reaches the
router and the key store through that loop (``bridge.py``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from launcher.controlplane.audit import AuditRecord, AuditSink, NoAudit
from launcher.controlplane.ca import CertificateAuthority
from launcher.errors import ControlPlaneError
from launcher.link.wire import split_address
from launcher.model.sql import ParserPool, SqlParser

from .auth import MIDDLEWARE_KEY, ApiKeyMiddlewareFactory, HandshakeAuthHandler
from .bridge import LoopBridge
from .gateway import CatalogSource, Gateway, SessionRoles, empty_catalog, no_session_roles
from .service import FlightSqlService
from .sessions import FlightSessions
from .statements import (
    MAX_PARKED_PER_KEY,
    MAX_PREPARED_PER_KEY,
    TICKET_EXPIRY_S,
    PreparedStatements,
    QueryTickets,
)
from .types import Router, VerifyKey

log = logging.getLogger(__name__)

_WILDCARDS = {"", "0.0.0.0", "::"}
# The audit outcome of a call refused for naming another key's or an unknown connection.
REFUSED = "refused"
# Seconds between two records (log line, audit row) of refused calls by one caller
# (``FlightSqlServer._refused``).
REFUSAL_RECORD_S = 1.0
# Callers whose last refusal is remembered for the rate above (then the memory starts over).
MAX_REFUSING_CALLERS = 10_000
# Seconds stop() waits for running calls (a client that stopped reading can hold one forever).
STOP_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class FlightListen:
    """Where the Flight SQL endpoint listens and whether it speaks TLS."""

    host: str
    port: int
    plaintext: bool = False

    @classmethod
    def parse(cls, listen: str, *, plaintext: bool = False) -> FlightListen:
        """Raises ``ControlPlaneError`` for a bad address or plaintext off loopback."""
        host, port = split_address(listen, listening=True)
        if plaintext and not is_loopback(host):
            raise ControlPlaneError(
                f"--flight-plaintext needs a loopback --flight-listen (127.0.0.1, ::1 or "
                f"localhost), got {listen!r}: API keys would cross the network in the clear; "
                f"drop --flight-plaintext to serve TLS with the control plane's certificate"
            )
        return cls(host, port, plaintext)

    def location(self, port: int | None = None) -> str:
        scheme = "grpc+tcp" if self.plaintext else "grpc+tls"
        host = f"[{self.host}]" if ":" in self.host else self.host or "0.0.0.0"
        return f"{scheme}://{host}:{self.port if port is None else port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FlightSqlServer:
    """The Flight SQL endpoint. ``port`` and ``location`` are known after ``start``.

    ``catalog`` returns the control plane's catalog as it is at each call: its roles decide
    what a key may read and list, and under which policy its queries run. Each API key may hold
    ``max_parked_per_key`` unfetched results and ``max_prepared_per_key`` prepared statements
    (``statements.py``). ``parser`` parses SQL for the role rule and prepared statements
    (the control plane's; without one the server starts and stops a ``ParserPool`` of its own).
    ``session_roles`` tells which roles are session-mode (each connection one session,
    ``sessions.py``); ``audit`` receives a row for each call refused for naming a connection
    that is not its caller's (``connections.py``).
    """

    def __init__(
        self,
        listen: FlightListen,
        router: Router,
        verify_key: VerifyKey,
        *,
        ca: CertificateAuthority,
        hosts: list[str],
        ticket_expiry_s: float = TICKET_EXPIRY_S,
        catalog: CatalogSource = empty_catalog,
        max_parked_per_key: int = MAX_PARKED_PER_KEY,
        max_prepared_per_key: int = MAX_PREPARED_PER_KEY,
        parser: SqlParser | None = None,
        session_roles: SessionRoles = no_session_roles,
        audit: AuditSink | None = None,
    ) -> None:
        self._session_roles = session_roles
        self._audit: AuditSink = audit or NoAudit()
        self._audit_lock = threading.Lock()  # refusals arrive on handler threads
        self._last_refused: dict[str, float] = {}  # key id ("" unknown) -> last recorded
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own_parser: ParserPool | None = None
        if parser is None:
            parser = self._own_parser = ParserPool()
        self._parser = parser
        self._listen = listen
        self._catalog = catalog
        self._ticket_expiry_s = ticket_expiry_s
        self._max_parked_per_key = max_parked_per_key
        self._max_prepared_per_key = max_prepared_per_key
        self._router = router
        self._verify_key = verify_key
        self._ca = ca
        self._hosts = [*hosts, *([] if listen.host in _WILDCARDS else [listen.host])]
        self._service: FlightSqlService | None = None
        self.port = 0

    @property
    def location(self) -> str:
        """What a client dials, e.g. ``grpc+tls://127.0.0.1:31337``."""
        return self._listen.location(self.port)

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        bridge = LoopBridge(loop)
        keys = ApiKeyMiddlewareFactory(bridge, self._verify_key, refused=self._refused)
        options: dict[str, object] = {
            "auth_handler": HandshakeAuthHandler(),
            "middleware": {MIDDLEWARE_KEY: keys},
        }
        if not self._listen.plaintext:
            cert_pem, key_pem = self._ca.issue_server_cert(list(dict.fromkeys(self._hosts)))
            chain = cert_pem + self._ca.cert_pem()
            options["tls_certificates"] = [flight.CertKeyPair(cert=chain, key=key_pem)]
        try:
            self._service = FlightSqlService(
                self._listen.location(),
                gateway=Gateway(
                    self._router,
                    self._catalog,
                    FlightSessions(self._router, bridge),
                    parser=self._parser,
                    bridge=bridge,
                    session_roles=self._session_roles,
                ),
                bridge=bridge,
                tickets=QueryTickets(
                    loop, expiry_s=self._ticket_expiry_s, max_per_key=self._max_parked_per_key
                ),
                prepared=PreparedStatements(max_per_key=self._max_prepared_per_key),
                **options,
            )
        except (pa.ArrowException, OSError) as error:
            raise ControlPlaneError(
                f"cannot serve Flight SQL on {self._listen.location()}: {error}; "
                "is the port in use?"
            ) from None
        self.port = self._service.port

    def _refused(self, key_id: str, what: str) -> None:
        """Record a call refused for naming a connection that is not its caller's: a log line
        and a row in the audit log (outcome "refused", reason "connection"), written on the
        loop, whose thread owns the database. At most one of each per caller (unknown tokens,
        which nobody authenticated, count as one caller) per ``REFUSAL_RECORD_S``: a flood of
        refused calls must not become a flood of log lines and database writes."""
        now = time.time()
        with self._audit_lock:
            if now - self._last_refused.get(key_id, 0.0) < REFUSAL_RECORD_S:
                return
            if len(self._last_refused) >= MAX_REFUSING_CALLERS:
                self._last_refused.clear()
            self._last_refused[key_id] = now
        log.warning("Flight SQL call refused: key %s presented %s", key_id or "(none)", what)
        record = AuditRecord(
            query_id="flight-" + secrets.token_hex(8),
            caller=key_id or "(unknown)",
            sql="",
            worker_id="",
            policy="",
            started_at=now,
            finished_at=now,
            queued_s=0.0,
            run_s=0.0,
            rows=0,
            bytes=0,
            outcome=REFUSED,
            reason="connection",
            message=f"refused: {what}",
        )
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._audit.write, record)

    async def stop(self) -> None:
        """Cancel queries waiting for DoGet, close the sessions clients opened, then give
        running calls ``STOP_GRACE_S``."""
        service, self._service = self._service, None
        if service is None:
            return
        service.tickets.close_all()
        service.gateway.sessions.close_all()
        try:
            await asyncio.wait_for(asyncio.to_thread(service.shutdown), STOP_GRACE_S)
        except TimeoutError:
            log.warning("Flight SQL calls still running after %.0f s; leaving them", STOP_GRACE_S)
        if self._own_parser is not None:
            await self._own_parser.close()
