"""The enrollment token format, read by both ends of the link.

Token format (one line, safe in shells, env vars and files)::

    dct1.<token id>.<secret>.<CA fingerprint hex>

- ``dct1``: duckcell token, format version 1; a later format gets a new prefix.
- token id: 16 lowercase hex characters, random; the database key. Not secret.
- secret: 43 characters of ``secrets.token_urlsafe(32)`` (256 bits; base64url has no ``.``).
- CA fingerprint: the 64 hex digits of ``sha256`` over the control plane CA's DER certificate
  (``CertificateAuthority.fingerprint()`` without its ``sha256:`` prefix). ``duckcell enroll``
  pins the CA with it before sending anything, like kubeadm's discovery-token-ca-cert-hash.

The control plane's side (creating, storing, redeeming) is ``launcher.controlplane.tokens``;
the worker's (``duckcell enroll``) parses a token with ``parse_token``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from launcher.errors import MalformedTokenError
from launcher.link.pki import FINGERPRINT_PREFIX

TOKEN_PREFIX = "dct1"
_TOKEN_RE = re.compile(
    r"(?P<id>[0-9a-f]{16})\.(?P<secret>[A-Za-z0-9_-]{43})\.(?P<ca>[0-9a-f]{64})", re.ASCII
)
TOKEN_LENGTH = len(TOKEN_PREFIX) + 1 + 16 + 1 + 43 + 1 + 64
NEW_TOKEN_HINT = "create a new token with `duckcell controlplane token create`"


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
            f"check what was copied, or {NEW_TOKEN_HINT}"
        )
    match = _TOKEN_RE.fullmatch(rest)
    if match is None:
        raise MalformedTokenError(
            f"the enrollment token is malformed (expected {TOKEN_PREFIX}.<id>.<secret>.<ca hash>,"
            f" {len(text)} characters given, {TOKEN_LENGTH} expected): it may have been cut "
            f"or altered when copied; copy it again, or {NEW_TOKEN_HINT}"
        )
    return ParsedToken(
        token_id=match["id"],
        secret=match["secret"],
        ca_fingerprint=FINGERPRINT_PREFIX + match["ca"],
    )


def format_token(token_id: str, secret: str, ca_fingerprint: str) -> str:
    """The text of a token (``ca_fingerprint`` is ``sha256:<hex>``); ``parse_token`` reverses it."""
    return f"{TOKEN_PREFIX}.{token_id}.{secret}.{ca_fingerprint.removeprefix(FINGERPRINT_PREFIX)}"
