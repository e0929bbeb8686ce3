"""The control plane's certificate authority (the worker's half is ``launcher.link.pki``).

The control plane is its own CA: it signs its TLS server certificate and every enrolled worker's
client certificate, so mTLS on the tunnel needs no outside PKI. Keys are EC P-256 because gRPC's
BoringSSL and every OpenSSL accept it; Ed25519 support in TLS stacks is still uneven.

Private keys are written atomically with mode 0600 (``launcher.atomic``), so a crash never
leaves a half-written or briefly world-readable key. Everything here raises ``CertificateError``
for bad input; ``cryptography``'s own exceptions do not leave this module.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from launcher.atomic import write_atomically
from launcher.errors import CertificateError
from launcher.link.pki import (
    fingerprint_of,
    key_pem,
    load_cert,
    refuse_loose_key,
    subject_cn,
    utcnow,
    write_private_key,
)

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
CA_VALIDITY_DAYS = 3650
# Backdating absorbs small clock differences between the control plane and a worker.
BACKDATE = dt.timedelta(minutes=5)

# Public keys a worker certificate may carry: what TLS stacks accept and is strong enough.
LeafPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


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
        now = utcnow()
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
        cert_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        write_private_key(key_path, key_pem(key))
        return cls(key=key, cert=cert)

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path) -> CertificateAuthority:
        refuse_loose_key(key_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"cannot read CA key {key_path}: {exc}") from None
        cert = load_cert(cert_path.read_bytes(), str(cert_path))
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
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

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
        now = utcnow()
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


def subject_and_serial(cert_pem: bytes) -> tuple[str, int]:
    """(CN, serial) of a certificate: how the tunnel names the worker behind a verified peer."""
    cert = load_cert(cert_pem, "certificate")
    return subject_cn(cert), cert.serial_number
