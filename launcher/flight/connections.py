"""Which client connection a Flight call belongs to: handshake tokens and session cookies.

Generic Flight SQL clients do not name sessions; they identify a *connection* one of two ways,
and the server recognises both (besides duckcell's own ``x-duckcell-session`` header):

- **The bearer token a ``Handshake`` returns.** Each handshake gets a fresh opaque token
  (``dcs1.`` and 32 random bytes, URL-safe), answered in the ``authorization`` header; the client
  sends it as ``Bearer <token>`` on its later calls. The server keeps the token's SHA-256 mapped
  to the API key that authenticated the handshake (the key is checked again on every call, so a
  revoked key ends its tokens too) and to a connection id; the API key itself is never handed
  back, and is kept sealed (AES-GCM) under a key derived from the token, which the server does
  not keep: its memory holds no usable API key between calls. Tokens idle for ``TOKEN_IDLE_S``
  are forgotten, and each API key holds at most ``MAX_TOKENS_PER_KEY`` (the oldest goes first).
- **The Flight SQL session cookie** ``arrow_flight_session_id``, set on the first answer to a
  caller that sent none, which clients with cookie middleware send back. It is
  ``<connection id>.<MAC>``, the MAC (HMAC-SHA-256 under a secret made at start) binding the id
  to the API key it was issued to: nothing is stored per cookie, and a cookie presented with
  another key (or made up) fails the check. Such a call is refused (``ConnectionRefused``,
  PERMISSION_DENIED) and recorded in the audit log (``server.py``), as is an unknown token.

A connection's session lives in ``sessions.py``, keyed by API key and ``Connection.key``: one
connection cannot reach another's session, nor another key's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TOKEN_PREFIX = "dcs1."
COOKIE_NAME = "arrow_flight_session_id"
# Seconds a handshake token may go unused before it is forgotten (the client handshakes again).
TOKEN_IDLE_S = 8 * 3600.0
MAX_TOKENS_PER_KEY = 256

HOW_TO_CONNECT = (
    "handshake again (basic auth with the API key as the password returns a fresh token), "
    "or send the API key itself as 'authorization: Bearer <key>'"
)


class ConnectionRefused(Exception):
    """A call named a connection that is not its caller's (another key's cookie, a guessed or
    forgotten token); the message says what to do."""


class SessionRequired(Exception):
    """A statement of a session-mode role on a call that names no connection; the message says
    how to get one. Sent as INVALID_ARGUMENT: pyarrow's server cannot send FAILED_PRECONDITION
    (``status.py``)."""


@dataclass(frozen=True, slots=True)
class Connection:
    """One client connection: ``kind`` is how it was recognised ("token", "cookie" or
    "header"), ``id`` its name within the API key."""

    kind: str
    id: str

    @property
    def key(self) -> str:
        """The name of its session in ``FlightSessions`` (per API key)."""
        return f"{self.kind}:{self.id}"


@dataclass
class _Token:
    sealed_key: bytes  # the API key, sealed under the token (``_seal``)
    key_id: str
    connection: str
    last_used: float


class HandshakeTokens:
    """Opaque bearer tokens from handshakes -> (API key, connection id); thread-safe."""

    def __init__(
        self,
        *,
        idle_s: float = TOKEN_IDLE_S,
        max_per_key: int = MAX_TOKENS_PER_KEY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_s = idle_s
        self._max_per_key = max_per_key
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: OrderedDict[str, _Token] = OrderedDict()  # by digest, oldest use first

    def issue(self, api_key: str, key_id: str) -> str:
        """A fresh token for a connection authenticated by ``api_key``."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = _Token(_seal(token, api_key), key_id, secrets.token_hex(12), self._clock())
        with self._lock:
            self._expire(entry.last_used)
            mine = [d for d, t in self._tokens.items() if t.key_id == key_id]
            for digest in mine[: max(0, len(mine) - self._max_per_key + 1)]:
                del self._tokens[digest]
            self._tokens[_digest(token)] = entry
        return token

    def resolve(self, token: str) -> tuple[str, Connection] | None:
        """The API key and connection of ``token``; ``None`` when it is not one this server
        issued (or it was forgotten)."""
        digest = _digest(token)
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._tokens.get(digest)
            if entry is None:
                return None
            entry.last_used = now
            self._tokens.move_to_end(digest)
        return _unseal(token, entry.sealed_key), Connection("token", entry.connection)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)

    def _expire(self, now: float) -> None:
        """Forget tokens idle past ``idle_s`` (under the lock; the oldest use comes first)."""
        while self._tokens:
            digest, entry = next(iter(self._tokens.items()))
            if entry.last_used + self._idle_s > now:
                return
            del self._tokens[digest]


class SessionCookies:
    """Session cookies bound to the API key they were issued to, checked by their MAC."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)

    def issue(self, key_id: str) -> tuple[str, Connection]:
        """A new cookie value for ``key_id``, and its connection."""
        connection = secrets.token_hex(12)
        return f"{connection}.{self._mac(key_id, connection)}", Connection("cookie", connection)

    def check(self, value: str, key_id: str) -> Connection:
        """The connection of cookie ``value``; ``ConnectionRefused`` when it was not issued to
        ``key_id`` by this server."""
        connection, _, mac = value.partition(".")
        if not connection or not hmac.compare_digest(mac, self._mac(key_id, connection)):
            raise ConnectionRefused(
                f"the {COOKIE_NAME} cookie was not issued to this API key: a session belongs to "
                "the key and connection that opened it; drop the cookie to get a fresh one"
            )
        return Connection("cookie", connection)

    def _mac(self, key_id: str, connection: str) -> str:
        message = f"{key_id}\0{connection}".encode()
        digest = hmac.new(self._secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def cookie_of(headers: dict[str, list[str]]) -> str:
    """The ``arrow_flight_session_id`` value of a call's ``cookie`` headers ("" for none)."""
    for header in headers.get("cookie", []):
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name == COOKIE_NAME:
                return value.strip().strip('"')
    return ""


def set_cookie(value: str) -> str:
    """The ``set-cookie`` header value that hands ``value`` to a client."""
    return f"{COOKIE_NAME}={value}"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sealing_key(token: str) -> bytes:
    # Another hash of the token than ``_digest`` (the table's key): one cannot give the other.
    return hashlib.sha256(b"duckcell token seal\x00" + token.encode()).digest()


def _seal(token: str, api_key: str) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(_sealing_key(token)).encrypt(nonce, api_key.encode(), None)


def _unseal(token: str, sealed: bytes) -> str:
    return AESGCM(_sealing_key(token)).decrypt(sealed[:12], sealed[12:], None).decode()
