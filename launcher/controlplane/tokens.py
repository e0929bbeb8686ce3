"""One-time, expiring enrollment tokens: how a new worker proves an admin let it in.

Token format (one line, safe in shells, env vars and files)::

    dct1.<token id>.<secret>.<CA fingerprint hex>

- ``dct1``: duckcell token, format version 1; a later format gets a new prefix.
- token id: 16 lowercase hex characters, random; the database key. Not secret.
- secret: 43 characters of ``secrets.token_urlsafe(32)`` (256 bits; base64url has no ``.``).
- CA fingerprint: the 64 hex digits of ``sha256`` over the control plane CA's DER certificate
  (``CertificateAuthority.fingerprint()`` without its ``sha256:`` prefix). ``duckcell enroll``
  pins the CA with it before sending anything, like kubeadm's discovery-token-ca-cert-hash.

Only ``sha256(secret)`` is stored. A fast hash is enough here because the secret is 256 random
bits, not a password: there is nothing to brute-force. Redeeming is a single guarded ``UPDATE``,
so of two concurrent redeems exactly one wins, even across processes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from launcher.controlplane.ca import FINGERPRINT_PREFIX
from launcher.errors import (
    CaMismatchError,
    ControlPlaneError,
    ExpiredTokenError,
    MalformedTokenError,
    UnknownTokenError,
    UsedTokenError,
)

TOKEN_PREFIX = "dct1"
DEFAULT_TTL_S = 3600.0
_TOKEN_RE = re.compile(
    r"(?P<id>[0-9a-f]{16})\.(?P<secret>[A-Za-z0-9_-]{43})\.(?P<ca>[0-9a-f]{64})", re.ASCII
)
TOKEN_LENGTH = len(TOKEN_PREFIX) + 1 + 16 + 1 + 43 + 1 + 64
_NEW_TOKEN_HINT = "create a new token with `duckcell controlplane token create`"

Clock = Callable[[], float]


@dataclass(frozen=True)
class ParsedToken:
    """A token split into its parts. ``repr`` hides the secret so it never reaches a log."""

    token_id: str
    secret: str
    ca_fingerprint: str  # "sha256:<hex>", comparable with CertificateAuthority.fingerprint()

    def __repr__(self) -> str:
        return f"ParsedToken(token_id={self.token_id!r}, ca_fingerprint={self.ca_fingerprint!r})"


def parse_token(text: str) -> ParsedToken:
    """Split a token; raises ``MalformedTokenError`` without quoting the input (it may be real)."""
    text = text.strip()
    prefix, dot, rest = text.partition(".")
    if prefix != TOKEN_PREFIX or not dot:
        raise MalformedTokenError(
            f"this is not a duckcell enrollment token (those start with '{TOKEN_PREFIX}.'): "
            f"check what was copied, or {_NEW_TOKEN_HINT}"
        )
    match = _TOKEN_RE.fullmatch(rest)
    if match is None:
        raise MalformedTokenError(
            f"the enrollment token is malformed (expected {TOKEN_PREFIX}.<id>.<secret>.<ca hash>,"
            f" {len(text)} characters given, {TOKEN_LENGTH} expected): it may have been cut "
            f"or altered when copied; copy it again, or {_NEW_TOKEN_HINT}"
        )
    return ParsedToken(
        token_id=match["id"],
        secret=match["secret"],
        ca_fingerprint=FINGERPRINT_PREFIX + match["ca"],
    )


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


class EnrollmentTokens:
    """Creates and redeems one-time enrollment tokens for one control plane's CA.

    Takes a SQLite connection (see ``store.open_database``) owned by the caller and used from
    one thread, the CA fingerprint that tokens carry and that redeemed tokens must match, and a
    clock (seconds since the epoch) so tests can move time instead of sleeping. ``redeem``
    raises one ``EnrollmentError`` subclass per refusal reason.
    """

    def __init__(
        self, conn: sqlite3.Connection, *, ca_fingerprint: str, clock: Clock = time.time
    ) -> None:
        if not re.fullmatch(re.escape(FINGERPRINT_PREFIX) + "[0-9a-f]{64}", ca_fingerprint):
            raise ValueError(f"CA fingerprint must be 'sha256:<64 hex>', got {ca_fingerprint!r}")
        self._conn = conn
        self._ca_fingerprint = ca_fingerprint
        self._clock = clock

    def create(self, ttl_s: float = DEFAULT_TTL_S, *, now: float | None = None) -> str:
        """Store a new token valid for ``ttl_s`` seconds and return its text.

        The text is the only place the secret exists: show it once to the admin.
        """
        if ttl_s <= 0:
            raise ControlPlaneError(f"token lifetime must be positive, got {ttl_s} s")
        at = self._clock() if now is None else now
        token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
        self._write(
            "INSERT INTO enrollment_tokens (id, secret_hash, created_at, expires_at)"
            " VALUES (?, ?, ?, ?)",
            (token_id, _hash_secret(secret), at, at + ttl_s),
        )
        fingerprint_hex = self._ca_fingerprint.removeprefix(FINGERPRINT_PREFIX)
        return f"{TOKEN_PREFIX}.{token_id}.{secret}.{fingerprint_hex}"

    def redeem(
        self,
        token_text: str,
        *,
        now: float | None = None,
        before_use: Callable[[], None] | None = None,
    ) -> str:
        """Use up a token and return its id; a token is redeemed once, ever.

        The order of checks matters: the CA first (a token for another control plane is the
        likeliest mix-up and needs a different fix), then the secret, and only a caller holding
        the right secret learns whether the token expired or was used. ``before_use`` runs
        then, for a valid token only; when it raises, the token stays unused.
        """
        parsed = parse_token(token_text)
        if parsed.ca_fingerprint != self._ca_fingerprint:  # public value: no need for hmac
            raise CaMismatchError(
                f"enrollment token {parsed.token_id} was made for another control plane (CA "
                f"{parsed.ca_fingerprint}, this one is {self._ca_fingerprint}): check the "
                f"--control-plane address, or {_NEW_TOKEN_HINT} on this control plane"
            )
        row = self._read_token(parsed.token_id)
        if row is None or not hmac.compare_digest(row[0], _hash_secret(parsed.secret)):
            raise UnknownTokenError(
                f"enrollment token {parsed.token_id} is not known to this control plane: "
                f"{_NEW_TOKEN_HINT}"
            )
        at = self._clock() if now is None else now
        if row[2] is not None or row[1] <= at:
            raise self._refusal(parsed.token_id)
        if before_use is not None:
            before_use()
        won = self._write(
            "UPDATE enrollment_tokens SET used_at = ?"
            " WHERE id = ? AND used_at IS NULL AND expires_at > ?",
            (at, parsed.token_id, at),
        )
        if won:
            return parsed.token_id
        raise self._refusal(parsed.token_id)

    def _refusal(self, token_id: str) -> UsedTokenError | ExpiredTokenError:
        """Why the guarded UPDATE matched nothing; read after the fact, so a lost race says used."""
        row = self._read_token(token_id)
        if row is not None and row[2] is not None:
            return UsedTokenError(
                f"enrollment token {token_id} was already used (tokens work once): "
                f"{_NEW_TOKEN_HINT}"
            )
        return ExpiredTokenError(f"enrollment token {token_id} has expired: {_NEW_TOKEN_HINT}")

    def _read_token(self, token_id: str) -> tuple[str, float, float | None] | None:
        try:
            return self._conn.execute(
                "SELECT secret_hash, expires_at, used_at FROM enrollment_tokens WHERE id = ?",
                (token_id,),
            ).fetchone()
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"reading enrollment tokens failed: {exc}") from None

    def _write(self, sql: str, params: tuple[object, ...]) -> bool:
        """Run one statement in its own transaction; True when it changed a row."""
        try:
            with self._conn:
                return self._conn.execute(sql, params).rowcount == 1
        except sqlite3.Error as exc:
            raise ControlPlaneError(f"writing enrollment tokens failed: {exc}") from None
