"""API keys: how a client of the query service proves who it is.

Key format (one line, safe in shells and env vars)::

    dck1.<key id>.<secret>

- ``dck1``: duckcell key, format version 1.
- key id: 16 lowercase hex characters, random; the database key. Not secret.
- secret: 43 characters of ``secrets.token_urlsafe(32)`` (256 bits).

Only ``sha256(secret)`` and the key's role are stored; like enrollment tokens (``tokens.py``), a
fast hash is enough for 256 random bits. Clients send the key as gRPC metadata
``authorization: Bearer <key>``. Every refusal raises ``ApiKeyError`` with a message that never
quotes the key.
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

from launcher.errors import ApiKeyError, ControlPlaneError

KEY_PREFIX = "dck1"
_KEY_RE = re.compile(r"dck1\.(?P<id>[0-9a-f]{16})\.(?P<secret>[A-Za-z0-9_-]{43})", re.ASCII)
_ROLE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}", re.ASCII)
_NEW_KEY_HINT = "create one with `duckcell controlplane apikey create --data DIR --role ROLE`"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A verified key: its id and role. Never holds the secret."""

    key_id: str
    role: str


def _hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


class ApiKeys:
    """Creates and verifies API keys. Takes a connection used from one thread only."""

    def __init__(self, conn: sqlite3.Connection, *, clock: Callable[[], float] = time.time) -> None:
        self._conn = conn
        self._clock = clock

    def create(self, role: str) -> str:
        """A new key for ``role``; the full key is returned once and never stored."""
        if not _ROLE_RE.fullmatch(role):
            raise ControlPlaneError(
                f"--role: expected 1-64 letters, digits, '_', '.' or '-', got {role!r}"
            )
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._conn:
            self._conn.execute(
                "INSERT INTO api_keys (id, secret_hash, role, created_at) VALUES (?, ?, ?, ?)",
                (key_id, _hash_secret(secret), role, self._clock()),
            )
        return f"{KEY_PREFIX}.{key_id}.{secret}"

    def list(self) -> list[tuple[str, str, float]]:
        """Every key not revoked as ``(key id, role, created at)``, oldest first; never a
        secret."""
        rows = self._conn.execute(
            "SELECT id, role, created_at FROM api_keys WHERE revoked_at IS NULL "
            "ORDER BY created_at, id"
        ).fetchall()
        return [(key_id, role, created) for key_id, role, created in rows]

    def revoke(self, key_id: str) -> None:
        """Mark a key revoked: calls that send it are refused from now on, saying so (a Flight
        SQL endpoint that verified it a moment ago may accept it for up to its cache's few
        seconds). Raises ``ControlPlaneError`` for an unknown or already revoked id. Audit
        records keep the id."""
        with self._conn:
            cursor = self._conn.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), key_id),
            )
        if cursor.rowcount == 0:
            known = self._conn.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,))
            state = "is already revoked" if known.fetchone() else "does not exist"
            raise ControlPlaneError(
                f"API key {key_id} {state}: `duckcell controlplane apikey list` shows the "
                "keys in use"
            )

    def verify(self, key: str) -> ApiKey:
        """The key's id and role; raises ``ApiKeyError`` when it is malformed or unknown."""
        match = _KEY_RE.fullmatch(key.strip())
        if match is None:
            raise ApiKeyError(
                f"the API key is malformed (expected {KEY_PREFIX}.<id>.<secret>): copy it "
                f"again, or {_NEW_KEY_HINT}"
            )
        row = self._conn.execute(
            "SELECT secret_hash, role, revoked_at FROM api_keys WHERE id = ?", (match["id"],)
        ).fetchone()
        # Compare a hash even for an unknown id, so timing does not tell ids apart.
        stored, role, revoked_at = row if row is not None else ("", "", None)
        if not hmac.compare_digest(stored, _hash_secret(match["secret"])) or row is None:
            raise ApiKeyError(f"unknown API key {match['id']}: {_NEW_KEY_HINT}")
        if revoked_at is not None:  # told only to a holder of the whole key
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(revoked_at))
            raise ApiKeyError(f"API key {match['id']} was revoked at {when}: {_NEW_KEY_HINT}")
        return ApiKey(key_id=match["id"], role=role)
