"""Who is calling: the API key on every Flight call, as a bearer token or via basic auth.

Every call, ``Handshake`` included, passes ``ApiKeyMiddlewareFactory.start_call``, which accepts

- ``authorization: Bearer <key>`` (ADBC's ``adbc.flight.sql.authorization_header``, a static
  token, or the token a handshake returned), and
- on ``Handshake`` only, ``authorization: Basic base64(user:password)`` with the key as the
  password (the user name is ignored: the key names itself); the answer's ``authorization``
  header hands the key back as the bearer token the client then sends on every call.

Anything else (no header, ``Bearer None`` from a client without a token, an unknown key) is
refused with ``FlightUnauthenticatedError`` before a handler runs. Handlers read the caller from
the call's ``auth`` middleware (``caller_of``), and the session the call names, if any, from its
``x-duckcell-session`` header (``session_of``, see ``sessions.py``). Keys are checked on the
control plane's loop, whose thread owns the database connection.

pyarrow.flight answers ``Handshake`` only when a ``ServerAuthHandler`` is installed, so
``HandshakeAuthHandler`` accepts every handshake and every call at that layer: the middleware,
which sees the same calls first, is the gate.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable

import pyarrow.flight as flight

from launcher.controlplane.apikeys import ApiKey
from launcher.errors import ApiKeyError

from .bridge import LoopBridge
from .status import handler

MIDDLEWARE_KEY = "auth"
AUTHORIZATION = "authorization"
SESSION_HEADER = "x-duckcell-session"
BEARER = "Bearer "
BASIC = "Basic "
_NO_KEY = (
    "no API key: send 'authorization: Bearer <key>' (ADBC: db_kwargs "
    "adbc.flight.sql.authorization_header='Bearer <key>'), or basic auth with the key as the "
    "password; create a key with `duckcell controlplane apikey create`"
)

Verify = Callable[[str], Awaitable[ApiKey]]
# Seconds a verified key is accepted without asking the database again, and how many are kept.
KEY_CACHE_S = 5.0
_KEY_CACHE_SIZE = 1024


class CallerMiddleware(flight.ServerMiddleware):
    """Holds the verified caller for the handlers; after a basic-auth handshake, sends the
    bearer token back."""

    def __init__(self, caller: ApiKey, bearer: str | None = None, session: str = "") -> None:
        self.caller = caller
        self.session = session
        self._bearer = bearer

    def sending_headers(self) -> dict[str, str]:
        return {AUTHORIZATION: BEARER + self._bearer} if self._bearer else {}


class ApiKeyMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call; ``verify`` runs on the loop through ``bridge``.

    A key verified in the last ``cache_s`` seconds is accepted without asking the loop again:
    an ADBC query makes two or three calls, and each hop to the loop and the database cost
    0.6 to 0.8 ms of a ``SELECT 42``'s latency here. So a revoked key
    (``duckcell controlplane apikey revoke``) is refused at the latest ``cache_s`` later.
    The cache holds the SHA-256 of keys, never a key; refusals are never cached.
    """

    def __init__(
        self,
        bridge: LoopBridge,
        verify: Verify,
        *,
        cache_s: float = KEY_CACHE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bridge = bridge
        self._verify = verify
        self._cache_s = cache_s
        self._clock = clock
        self._verified: dict[str, tuple[ApiKey, float]] = {}
        self._lock = threading.Lock()  # handlers run on many threads

    @handler  # an unexpected error (the loop gone) leaves as INTERNAL, its traceback logged
    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> CallerMiddleware:
        values = headers.get(AUTHORIZATION) or [""]
        header = values[0]
        if info.method == flight.FlightMethod.HANDSHAKE and header.startswith(BASIC):
            key = basic_password(header.removeprefix(BASIC))
            return CallerMiddleware(self._check(key), bearer=key.strip())
        if not header.startswith(BEARER):
            raise flight.FlightUnauthenticatedError(_NO_KEY)
        session = (headers.get(SESSION_HEADER) or [""])[0].strip()
        return CallerMiddleware(self._check(header.removeprefix(BEARER)), session=session)

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


def session_of(context: flight.ServerCallContext) -> str:
    """The session name the call's ``x-duckcell-session`` header gives ("" for none)."""
    middleware = context.get_middleware(MIDDLEWARE_KEY)
    return middleware.session if isinstance(middleware, CallerMiddleware) else ""


class HandshakeAuthHandler(flight.ServerAuthHandler):
    """Lets pyarrow.flight answer ``Handshake``; the middleware already authenticated it."""

    def authenticate(
        self, outgoing: flight.ServerAuthSender, incoming: flight.ServerAuthReader
    ) -> None:
        return None

    def is_valid(self, token: bytes) -> bytes:
        return b""
