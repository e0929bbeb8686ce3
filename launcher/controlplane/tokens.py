"""One-time, expiring enrollment tokens: how a new worker proves an admin let it in.

The token format is in ``launcher.link.tokens`` (both ends read it). Only ``sha256(secret)`` is
stored. A fast hash is enough here because the secret is 256 random bits, not a password: there
is nothing to brute-force. Redeeming is a single guarded ``UPDATE``, so of two concurrent redeems
exactly one wins, even across processes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from collections.abc import Callable

from launcher.errors import (
    CaMismatchError,
    ControlPlaneError,
    ExpiredTokenError,
    UnknownTokenError,
    UsedTokenError,
)
from launcher.link.pki import FINGERPRINT_PREFIX
from launcher.link.tokens import NEW_TOKEN_HINT, format_token, parse_token

DEFAULT_TTL_S = 3600.0
Clock = Callable[[], float]


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
        return format_token(token_id, secret, self._ca_fingerprint)

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
                f"--control-plane address, or {NEW_TOKEN_HINT} on this control plane"
            )
        row = self._read_token(parsed.token_id)
        if row is None or not hmac.compare_digest(row[0], _hash_secret(parsed.secret)):
            raise UnknownTokenError(
                f"enrollment token {parsed.token_id} is not known to this control plane: "
                f"{NEW_TOKEN_HINT}"
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
                f"enrollment token {token_id} was already used (tokens work once): {NEW_TOKEN_HINT}"
            )
        return ExpiredTokenError(f"enrollment token {token_id} has expired: {NEW_TOKEN_HINT}")

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
