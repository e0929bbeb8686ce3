"""Who is calling, and on which connection: the API key on every Flight call.

Every call, ``Handshake`` included, passes ``ApiKeyMiddlewareFactory.start_call``, which accepts

- ``authorization: Bearer <key>`` (ADBC's ``adbc.flight.sql.authorization_header``, a static
  token),
- ``authorization: Bearer <token>`` with a token a handshake returned (``connections.py``),
- ``authorization: Basic base64(user:password)`` with the key as the password, on any call (the
  user name is ignored: the key names itself).

A ``Handshake`` answers a fresh opaque token in its ``authorization`` header (never the key);
the calls that carry it belong to that connection. Otherwise a call's connection is the one its
``x-duckcell-session`` header names, else the one its ``arrow_flight_session_id`` cookie names;
a call without either gets a cookie in its answer (``set-cookie``) for the next ones. A token
the server did not issue is refused (UNAUTHENTICATED), a cookie issued to another key too
(PERMISSION_DENIED); both are recorded through ``refused``.

Anything else (no header, ``Bearer None`` from a client without a token, an unknown key) is
refused with ``FlightUnauthenticatedError`` before a handler runs. Handlers read the caller from
the call's ``auth`` middleware (``caller_of``) and its connection (``connection_of``). Keys are
checked on the control plane's loop, whose thread owns the database connection.

pyarrow.flight answers ``Handshake`` only when a ``ServerAuthHandler`` is installed, so
``HandshakeAuthHandler`` accepts every handshake and every call at that layer: the middleware,
which sees the same calls first, is the gate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
import time
from collections.abc import Awaitable, Callable

import pyarrow.flight as flight

from launcher.controlplane.apikeys import ApiKey
from launcher.errors import ApiKeyError

from .bridge import LoopBridge
from .connections import (
    HOW_TO_CONNECT,
    TOKEN_PREFIX,
    Connection,
    ConnectionRefused,
    HandshakeTokens,
    SessionCookies,
    cookie_of,
    set_cookie,
)
from .messages import InvalidRequest
from .status import handler

MIDDLEWARE_KEY = "auth"
AUTHORIZATION = "authorization"
SESSION_HEADER = "x-duckcell-session"
SET_COOKIE = "set-cookie"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BEARER = "Bearer "
BASIC = "Basic "
_NO_KEY = (
    "no API key: send 'authorization: Bearer <key>' (ADBC: db_kwargs "
    "adbc.flight.sql.authorization_header='Bearer <key>'), or basic auth with the key as the "
    "password; create a key with `duckcell controlplane apikey create`"
)

Verify = Callable[[str], Awaitable[ApiKey]]
# Records a refused call: the caller's key id ("" when unknown) and what it presented.
Refused = Callable[[str, str], None]
# Seconds a verified key is accepted without asking the database again, and how many are kept.
KEY_CACHE_S = 5.0
_KEY_CACHE_SIZE = 1024


class CallerMiddleware(flight.ServerMiddleware):
    """Holds the verified caller and its connection for the handlers; sends the headers the
    call's answer carries (a handshake's token, a new session cookie)."""

    def __init__(
        self,
        caller: ApiKey,
        connection: Connection | None = None,
        sending: dict[str, str] | None = None,
    ) -> None:
        self.caller = caller
        self.connection = connection
        self._sending = sending or {}

    def sending_headers(self) -> dict[str, str]:
        return self._sending


class ApiKeyMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call; ``verify`` runs on the loop through ``bridge``.

    A key verified in the last ``cache_s`` seconds is accepted without asking the loop again:
    an ADBC query makes two or three calls, and each hop to the loop and the database cost
    0.6 to 0.8 ms of a ``SELECT 42``'s latency here. So a revoked key
    (``duckcell controlplane apikey revoke``) is refused at the latest ``cache_s`` later.
    The cache holds the SHA-256 of keys, never a key; refusals are never cached.
    ``refused`` records calls that named another key's connection (``connections.py``).
    """

    def __init__(
        self,
        bridge: LoopBridge,
        verify: Verify,
        *,
        cache_s: float = KEY_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
        tokens: HandshakeTokens | None = None,
        cookies: SessionCookies | None = None,
        refused: Refused = lambda key_id, what: None,
    ) -> None:
        self._bridge = bridge
        self._verify = verify
        self._cache_s = cache_s
        self._clock = clock
        self.tokens = tokens or HandshakeTokens()
        self._cookies = cookies or SessionCookies()
        self._refused = refused
        self._verified: dict[str, tuple[ApiKey, float]] = {}
        self._lock = threading.Lock()  # handlers run on many threads

    @handler  # an unexpected error (the loop gone) leaves as INTERNAL, its traceback logged
    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> CallerMiddleware:
        header = (headers.get(AUTHORIZATION) or [""])[0]
        connection: Connection | None = None
        if header.startswith(BASIC):
            api_key = basic_password(header.removeprefix(BASIC))
        elif header.startswith(BEARER):
            api_key = header.removeprefix(BEARER).strip()
            if api_key.startswith(TOKEN_PREFIX):
                found = self.tokens.resolve(api_key)
                if found is None:
                    self._refused("", "an unknown session token (guessed, or forgotten)")
                    raise flight.FlightUnauthenticatedError(
                        f"unknown or expired session token: {HOW_TO_CONNECT}"
                    )
                api_key, connection = found
        else:
            raise flight.FlightUnauthenticatedError(_NO_KEY)
        caller = self._check(api_key)
        sending: dict[str, str] = {}
        if info.method == flight.FlightMethod.HANDSHAKE:
            # A fresh token per handshake: one connection, one session (never the key itself).
            sending[AUTHORIZATION] = BEARER + self.tokens.issue(api_key, caller.key_id)
            return CallerMiddleware(caller, None, sending)
        named = (headers.get(SESSION_HEADER) or [""])[0].strip()
        if named:
            connection = Connection("header", session_name(named))
        elif connection is None:
            cookie = cookie_of(headers)
            if cookie:
                try:
                    connection = self._cookies.check(cookie, caller.key_id)
                except ConnectionRefused:
                    self._refused(caller.key_id, "a session cookie not issued to this key")
                    raise
            else:  # a cookie for the next calls: it names this connection once sent back
                value, _unused = self._cookies.issue(caller.key_id)
                sending[SET_COOKIE] = set_cookie(value)
        return CallerMiddleware(caller, connection, sending)

    def _check(self, key: str) -> ApiKey:
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = self._clock()
        with self._lock:
            cached = self._verified.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            caller = self._bridge.call(self._verify(key))
        except ApiKeyError as error:
            raise flight.FlightUnauthenticatedError(str(error)) from None
        with self._lock:
            if len(self._verified) >= _KEY_CACHE_SIZE:
                self._verified = {d: v for d, v in self._verified.items() if v[1] > now}
            self._verified[digest] = (caller, now + self._cache_s)
        return caller


def basic_password(encoded: str) -> str:
    """The password of a basic-auth value; clients may leave out base64's padding."""
    try:
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        _user, sep, password = decoded.decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        sep, password = "", ""
    if not sep or not password:
        raise flight.FlightUnauthenticatedError(
            "basic auth: expected base64 of 'user:password' with the API key as the password"
        )
    return password


def caller_of(context: flight.ServerCallContext) -> ApiKey:
    """The verified caller of a handler's call (the middleware refused everyone else)."""
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    if not isinstance(middleware, CallerMiddleware):
        raise flight.FlightUnauthenticatedError(_NO_KEY)
    return middleware.caller


def connection_of(context: flight.ServerCallContext) -> Connection | None:
    """The client connection the call belongs to (``None``: it named none)."""
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    return middleware.connection if isinstance(middleware, CallerMiddleware) else None


def session_name(name: str) -> str:
    """``name`` from an ``x-duckcell-session`` header; ``InvalidRequest`` when malformed."""
    if not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"x-duckcell-session: {name!r} is not a session name; use up to 64 letters, "
            "digits, '.', '_' or '-'"
        )
    return name


class HandshakeAuthHandler(flight.ServerAuthHandler):
    """Lets pyarrow.flight answer ``Handshake``; the middleware already authenticated it."""

    def authenticate(
        self, outgoing: flight.ServerAuthSender, incoming: flight.ServerAuthReader
    ) -> None:
        return None

    def is_valid(self, token: bytes) -> bytes:
        return b""
