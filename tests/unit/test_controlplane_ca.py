"""The control plane's CA with real keys and a real TLS handshake on loopback."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from launcher.controlplane.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CertificateAuthority,
)
from launcher.errors import CertificateError
from launcher.link.pki import generate_worker_key_and_csr, verify_chain, write_private_key


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("other-ca"))


def test_ca_is_created_once_and_reloaded_identical(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, common_name="test CA")
    again = CertificateAuthority.load_or_create(tmp_path, common_name="ignored on reload")
    assert again.cert_pem() == first.cert_pem()
    assert again.fingerprint() == first.fingerprint()
    der = first.cert.public_bytes(serialization.Encoding.DER)
    assert first.fingerprint() == "sha256:" + hashlib.sha256(der).hexdigest()
    assert stat.S_IMODE((tmp_path / CA_KEY_FILE).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_ca_certificate_extensions(ca: CertificateAuthority) -> None:
    ext = ca.cert.extensions
    basic = ext.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc
    assert lifetime >= dt.timedelta(days=3650)
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"


def test_key_without_certificate_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / CA_CERT_FILE).unlink()
    with pytest.raises(CertificateError, match=r"ca\.crt is missing: restore"):
        CertificateAuthority.load_or_create(tmp_path)


def test_certificate_without_key_is_a_crashed_creation_and_is_replaced(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / CA_KEY_FILE).unlink()
    second = CertificateAuthority.load_or_create(tmp_path)
    assert second.fingerprint() != first.fingerprint()


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path)
    (tmp_path / CA_KEY_FILE).chmod(0o640)
    with pytest.raises(CertificateError, match="chmod 600"):
        CertificateAuthority.load_or_create(tmp_path)


def test_write_private_key_is_0600_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "state" / "worker.key"
    write_private_key(path, b"old")
    write_private_key(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_server_cert_verifies_and_has_sans(ca: CertificateAuthority) -> None:
    cert_pem, key_pem = ca.issue_server_cert(["localhost", "127.0.0.1", "cp.example", "::1"])
    cert = verify_chain(cert_pem, ca.cert_pem())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "cp.example"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert b"PRIVATE KEY" in key_pem


def test_worker_csr_subject_and_extensions_are_ignored(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("cp.example")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert_pem, serial = ca.sign_worker_csr(forged, worker_id="wkr-123")
    cert = verify_chain(cert_pem, ca.cert_pem())
    assert cert.serial_number == serial
    assert cert.subject.rfc4514_string() == "CN=wkr-123"
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_worker_serials_are_random(ca: CertificateAuthority) -> None:
    _, csr = generate_worker_key_and_csr("w")
    serials = {ca.sign_worker_csr(csr, worker_id=f"w{i}")[1] for i in range(5)}
    assert len(serials) == 5


def _tampered_csr() -> bytes:
    """A CSR whose signature no longer matches its content (one signature byte flipped)."""
    _, csr_pem = generate_worker_key_and_csr("worker")
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("csr_pem", "message"),
    [
        (_tampered_csr(), "signature does not verify"),
        (b"not a csr", "not valid PEM"),
    ],
)
def test_bad_csr_is_refused(ca: CertificateAuthority, csr_pem: bytes, message: str) -> None:
    with pytest.raises(CertificateError, match=message):
        ca.sign_worker_csr(csr_pem, worker_id="w")


def test_cert_from_another_ca_fails_verify_chain(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    _, csr = generate_worker_key_and_csr("w")
    cert_pem, _ = other_ca.sign_worker_csr(csr, worker_id="w")
    with pytest.raises(CertificateError, match="was not issued by CA"):
        verify_chain(cert_pem, ca.cert_pem())


def test_expired_cert_fails_verify_chain(ca: CertificateAuthority) -> None:
    _, csr = generate_worker_key_and_csr("w")
    cert_pem, _ = ca.sign_worker_csr(csr, worker_id="w", days=1)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    with pytest.raises(CertificateError, match="check the clock or issue a new certificate"):
        verify_chain(cert_pem, ca.cert_pem(), now=later)


def _write_pair(directory: Path, name: str, cert_pem: bytes, key_pem: bytes) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_pem)
    write_private_key(key_path, key_pem)
    return cert_path, key_path


def _handshake(ca: CertificateAuthority, client_ca: CertificateAuthority, tmp: Path) -> None:
    """Serve one mTLS handshake on loopback; the client's certificate comes from ``client_ca``.

    Returns when both sides agree; raises the server's error when it refuses the client.
    """
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*_write_pair(tmp, "server", *ca.issue_server_cert(["localhost"])))
    server_ctx.load_verify_locations(cadata=ca.cert_pem().decode())
    server_ctx.verify_mode = ssl.CERT_REQUIRED

    key_pem, csr_pem = generate_worker_key_and_csr("worker")
    client_cert_pem, _ = client_ca.sign_worker_csr(csr_pem, worker_id="wkr-1")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=ca.cert_pem().decode())
    client_ctx.load_cert_chain(*_write_pair(tmp, "client", client_cert_pem, key_pem))

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    server_errors: list[Exception] = []
    peer_names: list[str] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                peer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
                peer_names.append(peer.subject.rfc4514_string())
                tls.sendall(b"ok")
        except (OSError, ssl.SSLError, ValueError) as exc:
            server_errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    reply = b""
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            # TLS 1.3 reports a refused client certificate on the first read, not the handshake.
            reply = tls.recv(2)
    except (OSError, ssl.SSLError):
        pass  # the client only learns "alert"; the server's error below says why
    finally:
        thread.join(10)
        listener.close()
    if server_errors:
        raise server_errors[0]
    assert (reply, peer_names) == (b"ok", ["CN=wkr-1"])


def test_mtls_handshake_with_worker_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    _handshake(ca, ca, tmp_path)


def test_mtls_refuses_client_certificate_from_another_ca(
    ca: CertificateAuthority, other_ca: CertificateAuthority, tmp_path: Path
) -> None:
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        _handshake(ca, other_ca, tmp_path)
