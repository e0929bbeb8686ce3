"""The control plane's MCP endpoint: the same tools over streamable HTTP, a session per caller.

Run in the control plane's process and wired by the command (``duckcell controlplane serve
--mcp-listen``), it is a client of the control plane's own ``Query`` service: each MCP session
gets a ``ControlPlaneClient`` with the caller's API key (the request's bearer token), so the
key's role decides tables and policy and every statement is authenticated, routed and audited
exactly as any other client's (tables listed by its ``ListTables``). Nothing here reaches the
router or the catalog directly: the command hands in ``verify`` (a key to its caller's name,
or ``ApiKeyError``), so a wrong key is refused before the SDK sees the request.

Each request is checked before the SDK sees it: no or an unknown key is answered 401 with the
reason. An MCP session is bound to the key that opened it (another key gets 404, as for a
session that does not exist). A conversation ends when its MCP session is deleted, when it has
been idle ``idle_s`` (the SDK's session idle timeout is the same), or when the server stops;
its duckcell session and sandbox go with it. TLS uses the certificate the command passes in;
plaintext is refused off loopback (``check_listen``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import UNSUPPORTED_PROTOCOL_VERSION
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Receive, Scope, Send

from ..client import ControlPlaneClient
from ..errors import ApiKeyError, ControlPlaneError
from ..link.wire import split_address
from .conversation import Conversation
from .export import Exports
from .remote import RemoteBackend
from .server import ToolSettings, build_server

log = logging.getLogger(__name__)

SESSION_HEADER = "mcp-session-id"
DEFAULT_IDLE_S = 1800.0
_SWEEP_S = 10.0
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_MAX_PROBE_BYTES = 1 << 20

Verify = Callable[[str], str]


def check_listen(listen: str, *, plaintext: bool) -> tuple[str, int]:
    """``--mcp-listen HOST:PORT`` as host and port; plaintext only on loopback."""
    host, port = split_address(listen, listening=True)
    if plaintext and host not in _LOOPBACK:
        raise ControlPlaneError(
            f"--mcp-listen {listen}: plaintext MCP is allowed on loopback only (API keys would "
            "cross the network in clear); drop --mcp-plaintext to serve TLS"
        )
    return host, port


# An export is handed over as an MCP resource, whole and base64-encoded in one message.
MAX_EXPORT_BYTES = 64 * 2**20


@dataclass(eq=False)
class _Held:
    conversation: Conversation
    client: ControlPlaneClient
    key_digest: str
    exports: Path


class McpHttpEndpoint:
    """``start``, then ``url``; ``stop`` ends every conversation."""

    def __init__(
        self,
        listen: str,
        *,
        query_address: str,
        ca_pem: bytes,
        verify: Verify,
        tls: tuple[bytes, bytes] | None,
        settings: ToolSettings,
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        self._host, self._port = check_listen(listen, plaintext=tls is None)
        self._query_address = query_address
        self._ca_pem = ca_pem
        self._verify = verify
        self._tls = tls
        self._idle_s = idle_s
        self._held: dict[str, _Held] = {}
        self._owners: dict[str, tuple[str, float]] = {}  # MCP session -> (key digest, seen)
        # Each conversation's exports, under a directory of this process (made at start),
        # gone with the conversation.
        self._spool: Path | None = None
        self._server = build_server(
            self._conversation_for, settings, on_close=self._close_all, resources=True
        )
        self._uvicorn: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sweeping: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        scheme = "http" if self._tls is None else "https"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self._port}/mcp"

    async def start(self) -> None:
        loopback = self._host in _LOOPBACK
        security = (
            None
            if loopback
            else TransportSecuritySettings(
                enable_dns_rebinding_protection=False  # bearer keys: a browser cannot send one
            )
        )
        app = self._server.streamable_http_app(
            session_idle_timeout=self._idle_s, host=self._host, transport_security=security
        )
        with tempfile.TemporaryDirectory(prefix="duckcell-mcp-tls-") as directory:
            tls_files = self._tls_files(Path(directory))
            config = uvicorn.Config(
                _Guard(app, self._verify, self._owners, self._ended),
                host=self._host,
                port=self._port,
                log_level="warning",
                lifespan="on",
                **tls_files,
            )
            config.load()  # reads the certificate now, before the directory goes
        # The socket is bound here, not by uvicorn, which answers a port in use with
        # sys.exit() from inside its task: a traceback and exit code 3 instead of one line.
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            listening = socket.create_server((self._host, self._port), family=family)
        except OSError as error:
            raise ControlPlaneError(
                f"cannot serve MCP on {self._host}:{self._port} ({error.strerror}); is the "
                "port in use? (--mcp-listen)"
            ) from None
        self._port = listening.getsockname()[1]
        server = uvicorn.Server(config)
        self._uvicorn = server
        self._serving = asyncio.ensure_future(server.serve(sockets=[listening]))
        self._spool = Path(tempfile.mkdtemp(prefix="duckcell-mcp-exports-"))
        self._sweeping = asyncio.ensure_future(self._sweep())

    def _tls_files(self, directory: Path) -> dict[str, Any]:
        if self._tls is None:
            return {}
        cert_pem, key_pem = self._tls
        cert, key = directory / "cert.pem", directory / "key.pem"
        cert.write_bytes(cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(key_pem)
        return {
            "ssl_certfile": str(cert),
            "ssl_keyfile": str(key),
            "ssl_version": ssl.PROTOCOL_TLS_SERVER,
        }

    async def stop(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
        if self._uvicorn is not None and self._serving is not None:
            self._uvicorn.should_exit = True
            with contextlib.suppress(Exception):
                await self._serving
        await self._close_all()
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)

    def _conversation_for(self, ctx: Context) -> Conversation:
        headers = ctx.headers or {}
        session_id = headers.get(SESSION_HEADER)
        key = _bearer(headers.get("authorization", ""))
        if not session_id or not key:
            raise ToolError(
                "duckcell keeps one sandboxed session per MCP session: connect with an MCP "
                "session (the initialize handshake) and an API key as bearer token"
            )
        held = self._held.get(session_id)
        if held is None:
            assert self._spool is not None  # tools run only once the server started
            client = ControlPlaneClient(self._query_address, key, self._ca_pem)
            backend = RemoteBackend(client, "this control plane")
            exports = self._spool / _digest(session_id)[:32]  # never the header itself
            conversation = Conversation(backend, Exports(exports, max_bytes=MAX_EXPORT_BYTES))
            held = _Held(conversation, client, _digest(key), exports)
            self._held[session_id] = held
        elif held.key_digest != _digest(key):
            raise ToolError("unknown MCP session")  # the guard answers 404 before this
        return held.conversation

    async def _ended(self, session_id: str) -> None:
        self._owners.pop(session_id, None)
        held = self._held.pop(session_id, None)
        if held is not None:
            await _close(held)

    async def _sweep(self) -> None:
        """End what idled longer than the SDK keeps a session (it ends those by itself)."""
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = time.monotonic()
            for session_id, (_, seen) in list(self._owners.items()):
                held = self._held.get(session_id)
                if now - seen > self._idle_s and (held is None or held.conversation.idle):
                    await self._ended(session_id)

    async def _close_all(self) -> None:
        held, self._held = list(self._held.values()), {}
        for one in held:
            await _close(one)


async def _close(held: _Held) -> None:
    with contextlib.suppress(Exception):  # the control plane may be stopping too
        await held.conversation.close()
    await held.client.close()
    shutil.rmtree(held.exports, ignore_errors=True)


class _Guard:
    """ASGI middleware: every request needs a valid API key; an MCP session is bound to the key
    whose request opened it (its ``mcp-session-id`` is read off that response) and answers any
    other key 404; a DELETE of a session ends its conversation once the SDK has ended it."""

    def __init__(
        self,
        app: ASGIApp,
        verify: Verify,
        owners: dict[str, tuple[str, float]],
        ended: Callable[[str], Awaitable[None]],
    ) -> None:
        self._app = app
        self._verify = verify
        self._owners = owners  # MCP session id -> (key digest, last request)
        self._ended = ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = _bearer(headers.get("authorization", ""))
        try:
            if not key:
                raise ApiKeyError(
                    "no API key: send 'Authorization: Bearer <key>' (`duckcell controlplane "
                    "apikey create`)"
                )
            self._verify(key)  # one indexed row of the control plane's database, on its loop
        except ApiKeyError as error:
            await _answer(send, 401, str(error))
            return
        version = headers.get("mcp-protocol-version")
        if version and version not in HANDSHAKE_PROTOCOL_VERSIONS and scope["method"] == "POST":
            await _handshake_only(receive, send)
            return
        digest = _digest(key)
        session_id = headers.get(SESSION_HEADER)
        if session_id is None:
            await self._app(scope, receive, self._binding(send, digest))
            return
        owner = self._owners.get(session_id)
        if owner is None or owner[0] != digest:
            # Another key's session, or one this guard no longer knows (swept as idle, or
            # never opened through it): answered as an unknown one, so that no key reaches
            # (or ends) a session it did not open.
            await _answer(send, 404, "Session not found")
            return
        self._owners[session_id] = (digest, time.monotonic())
        await self._app(scope, receive, send)
        if scope["method"] == "DELETE":
            await self._ended(session_id)

    def _binding(self, send: Send, digest: str) -> Send:
        """``send``, noting the session a response opens as ``digest``'s."""

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name.lower() == SESSION_HEADER.encode():
                        self._owners[value.decode("latin-1")] = (digest, time.monotonic())
            await send(message)

        return sending


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _handshake_only(receive: Receive, send: Send) -> None:
    """Answer a sessionless (2026-07-28 and later) request with "unsupported protocol version"
    and the handshake versions: a conversation's sandbox needs an MCP session, and an ``auto``
    client then falls back to the initialize handshake, which has one."""
    body = b""
    while len(body) <= _MAX_PROBE_BYTES:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    try:
        request_id = json.loads(body).get("id")
    except (ValueError, AttributeError):
        request_id = None
    error = {
        "code": UNSUPPORTED_PROTOCOL_VERSION,
        "message": "duckcell keeps a sandboxed session per MCP session: use the initialize "
        "handshake",
        "data": {"supported": list(HANDSHAKE_PROTOCOL_VERSIONS)},
    }
    answer = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": answer})


def _bearer(header: str) -> str:
    return header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
