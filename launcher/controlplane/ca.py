"""The control plane's certificate authority, and the worker's half of enrollment crypto.

The control plane is its own CA: it signs its TLS server certificate and every enrolled worker's
client certificate, so mTLS on the tunnel needs no outside PKI. Keys are EC P-256 because gRPC's
BoringSSL and every OpenSSL accept it; Ed25519 support in TLS stacks is still uneven.

Private keys are written atomically with mode 0600 (temp file, fsync, rename), so a crash never
leaves a half-written or briefly world-readable key. Everything here raises ``CertificateError``
for bad input; ``cryptography``'s own exceptions do not leave this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from launcher.errors import CertificateError

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
CA_VALIDITY_DAYS = 3650
# Backdating absorbs small clock differences between the control plane and a worker.
BACKDATE = dt.timedelta(minutes=5)
FINGERPRINT_PREFIX = "sha256:"

# Public keys a worker certificate may carry: what TLS stacks accept and is strong enough.
LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the whole new one.

    The temp file is created with ``mode`` from the start (never wider), flushed to disk, renamed
    over the target, and the directory is fsynced so the rename itself survives a crash.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_private_key(path: Path, pem: bytes) -> None:
    """Store a private key PEM with mode 0600, atomically (shared by the CA and the worker)."""
    _atomic_write(path, pem, 0o600)


def refuse_loose_key(path: Path) -> None:
    """Raise ``CertificateError`` when a private key file is open to other users (someone
    copied or restored it without its mode); the file is never used then."""
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise CertificateError(f"{path} is readable by other users: run `chmod 600 {path}`")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_cert(pem: bytes, what: str) -> x509.Certificate:
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
    der = _load_cert(cert_pem, "certificate").public_bytes(serialization.Encoding.DER)
    return FINGERPRINT_PREFIX + hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class CertificateAuthority:
    """The control plane's CA: signs its server certificate and workers' client certificates.

    Build it with ``load_or_create``; raises ``CertificateError`` for unreadable or inconsistent
    files and for CSRs it refuses to sign.
    """

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def load_or_create(
        cls, directory: Path, *, common_name: str = "duckcell control plane CA"
    ) -> CertificateAuthority:
        """Load the CA from ``directory``, creating it on first use.

        The certificate is written before the key, so the key's presence marks a complete CA: a
        certificate alone is the trace of a crash mid-creation and is replaced. A key without its
        certificate is refused instead, because re-creating the certificate would change the
        fingerprint that tokens and enrolled workers pin.
        """
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        if key_path.exists():
            if not cert_path.exists():
                raise CertificateError(
                    f"{key_path} exists but {cert_path} is missing: restore the CA certificate "
                    f"from a backup, or remove {directory} to start a new CA (every worker must "
                    "then enroll again)"
                )
            return cls._load(key_path, cert_path)
        return cls._create(key_path, cert_path, common_name)

    @classmethod
    def _create(cls, key_path: Path, cert_path: Path, common_name: str) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _utcnow()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        write_private_key(key_path, _key_pem(key))
        return cls(key=key, cert=cert)

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path) -> CertificateAuthority:
        refuse_loose_key(key_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"cannot read CA key {key_path}: {exc}") from None
        cert = _load_cert(cert_path.read_bytes(), str(cert_path))
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key().public_numbers() != cert.public_key().public_numbers()
        ):
            raise CertificateError(
                f"{key_path} does not belong to {cert_path}: restore the matching pair from a "
                "backup"
            )
        return cls(key=key, cert=cert)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def fingerprint(self) -> str:
        """What an enrollment token carries so a worker can pin this CA (see ``fingerprint_of``)."""
        return fingerprint_of(self.cert_pem())

    def issue_server_cert(self, hosts: list[str], *, days: int = 365) -> tuple[bytes, bytes]:
        """A fresh key and TLS server certificate valid for ``hosts`` (DNS names or IPs).

        Returns (certificate PEM, key PEM). The first host becomes the subject's CN, but clients
        match on the SANs only.
        """
        if not hosts:
            raise CertificateError("a server certificate needs at least one host name or address")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(
            key.public_key(),
            common_name=hosts[0],
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            days=days,
            san=x509.SubjectAlternativeName([_general_name(h) for h in dict.fromkeys(hosts)]),
        )
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    def sign_worker_csr(
        self, csr_pem: bytes, *, worker_id: str, days: int = 365
    ) -> tuple[bytes, int]:
        """Sign a worker's client certificate; returns (certificate PEM, serial).

        Only the CSR's public key is used, after its self-signature proves the sender holds the
        private key. The requested subject and extensions are ignored: the worker's identity is
        the id the control plane assigned, never what the worker asked for.
        """
        if not worker_id:
            raise CertificateError("a worker certificate needs a worker id")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateError(
                f"the certificate signing request is not valid PEM: {exc}"
            ) from None
        if not csr.is_signature_valid:
            raise CertificateError(
                "the certificate signing request's signature does not verify: generate a new key "
                "and CSR (`duckcell enroll` does this) and retry"
            )
        cert = self._leaf(
            _worker_public_key(csr),
            common_name=worker_id,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            days=days,
        )
        return cert.public_bytes(serialization.Encoding.PEM), cert.serial_number

    def _leaf(
        self,
        public_key: LeafPublicKey,
        *,
        common_name: str,
        usage: x509.ObjectIdentifier,
        days: int,
        san: x509.SubjectAlternativeName | None = None,
    ) -> x509.Certificate:
        """An end-entity certificate; never outlives the CA, so chains stay valid to the end."""
        if days <= 0:
            raise CertificateError(f"certificate lifetime must be positive, got {days} days")
        now = _utcnow()
        not_after = min(now + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if san is not None:
            builder = builder.add_extension(san, critical=False)
        return builder.sign(self.key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    """An IP SAN for addresses (clients compare those as IPs), a DNS SAN for everything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _worker_public_key(csr: x509.CertificateSigningRequest) -> LeafPublicKey:
    """The CSR's key, refusing types and sizes that TLS stacks reject or that are too weak."""
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.key_size < 256:
            raise CertificateError(f"EC key on {key.curve.name} is too small: use EC P-256")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CertificateError(f"RSA key of {key.key_size} bits is too small: use EC P-256")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CertificateError(f"unsupported worker key type {type(key).__name__}: use EC P-256")
    return key


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
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def verify_chain(
    cert_pem: bytes, ca_pem: bytes, *, now: dt.datetime | None = None
) -> x509.Certificate:
    """Check that ``cert_pem`` was issued by the CA in ``ca_pem`` and is valid at ``now``.

    Returns the parsed certificate. Used by the enrollment client to check what the control plane
    sent back against the pinned CA, and by tests; TLS handshakes do their own verification.
    """
    cert = _load_cert(cert_pem, "certificate")
    ca = _load_cert(ca_pem, "CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(
            f"certificate for {_subject_cn(cert)!r} was not issued by CA {_subject_cn(ca)!r} "
            f"({fingerprint_of(ca_pem)})"
        ) from None
    at = now or _utcnow()
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        raise CertificateError(
            f"certificate for {_subject_cn(cert)!r} is valid only from {start:%Y-%m-%d %H:%M} "
            f"to {end:%Y-%m-%d %H:%M} UTC: check the clock or issue a new certificate"
        )
    return cert


def subject_and_serial(cert_pem: bytes) -> tuple[str, int]:
    """(CN, serial) of a certificate: how the tunnel names the worker behind a verified peer."""
    cert = _load_cert(cert_pem, "certificate")
    return _subject_cn(cert), cert.serial_number


def _subject_cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else cert.subject.rfc4514_string()
