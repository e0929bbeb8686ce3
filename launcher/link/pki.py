"""The worker's half of the PKI, and what the control plane's CA shares with it.

A worker makes its own key and a CSR (``generate_worker_key_and_csr``), stores the key with mode
0600 (``write_private_key``), refuses a key file others may read (``refuse_loose_key``), pins the
control plane's CA by its fingerprint (``fingerprint_of``) and checks the certificate it got back
(``verify_chain``). The CA itself is ``launcher.controlplane.ca``, which builds on these.

Private keys are written atomically with mode 0600 (``launcher.atomic``), so a crash never
leaves a half-written or briefly world-readable key. Everything here raises ``CertificateError``
for bad input; ``cryptography``'s own exceptions do not leave this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from launcher.atomic import write_atomically
from launcher.errors import CertificateError

FINGERPRINT_PREFIX = "sha256:"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private_key(path: Path, pem: bytes) -> None:
    """Store a private key PEM with mode 0600, atomically (shared by the CA and the worker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, pem, 0o600)


def refuse_loose_key(path: Path) -> None:
    """Raise ``CertificateError`` when a private key file is open to other users (someone
    copied or restored it without its mode); the file is never used then."""
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise CertificateError(f"{path} is readable by other users: run `chmod 600 {path}`")


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_cert(pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise CertificateError(f"{what} is not a valid PEM certificate: {exc}") from None


def fingerprint_of(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's DER encoding.

    Unlike kubeadm, which hashes the CA's SubjectPublicKeyInfo, this hashes the whole DER
    certificate: simpler to reproduce (``openssl x509 -outform der | sha256sum``) and just as
    binding, at the cost that re-issuing the CA cert for the same key changes the pin.
    """
    der = load_cert(cert_pem, "certificate").public_bytes(serialization.Encoding.DER)
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


def generate_worker_key_and_csr(worker_name: str) -> tuple[bytes, bytes]:
    """The worker's side: a new P-256 key and a CSR for it; returns (key PEM, CSR PEM).

    The key never leaves the worker host; store it with ``write_private_key``. The CSR's CN is
    only a hint, the control plane sets the real identity.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_name)]))
        .sign(key, hashes.SHA256())
    )
    return key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def verify_chain(
    cert_pem: bytes, ca_pem: bytes, *, now: dt.datetime | None = None
) -> x509.Certificate:
    """Check that ``cert_pem`` was issued by the CA in ``ca_pem`` and is valid at ``now``.

    Returns the parsed certificate. Used by the enrollment client to check what the control plane
    sent back against the pinned CA, and by tests; TLS handshakes do their own verification.
    """
    cert = load_cert(cert_pem, "certificate")
    ca = load_cert(ca_pem, "CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"certificate for {subject_cn(cert)!r} was not issued by CA {subject_cn(ca)!r} "
            f"({fingerprint_of(ca_pem)})"
        ) from None
    at = now or utcnow()
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        raise CertificateError(
            f"certificate for {subject_cn(cert)!r} is valid only from {start:%Y-%m-%d %H:%M} "
            f"to {end:%Y-%m-%d %H:%M} UTC: check the clock or issue a new certificate"
        )
    return cert


def subject_cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()
