"""The worker's side of enrollment: swap a one-time token for a worker identity.

``enroll`` pins the control plane before it sends anything: it opens a TLS connection without
verification, reads the chain the server presents (leaf, then CA), and compares the CA's hash
with the one the token carries (the kubeadm ``--discovery-token-ca-cert-hash`` idea). Only then
does it generate a key locally, send the token and a CSR over TLS verified against that CA, and
check the certificate it gets back.

The identity is written all at once: every file goes into a temporary directory inside the
state directory, which is renamed to ``identity/`` at the end, so a failure leaves nothing
behind and a reader never sees half an identity. It persists: a restarted worker is the same
worker, and enrolling again over an existing identity is refused.

Raises ``EnrollmentError`` subclasses for a refused token (the same classes and messages as the
control plane's), ``CertificateError`` when certificates do not check out, and
``ControlPlaneError`` for an unreachable control plane or an existing identity.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio

from launcher import __version__
from launcher.atomic import fsync_directory
from launcher.errors import (
    CaMismatchError,
    CertificateError,
    ControlPlaneError,
    enrollment_error,
)
from launcher.link.pki import (
    fingerprint_of,
    generate_worker_key_and_csr,
    refuse_loose_key,
    verify_chain,
    write_private_key,
)
from launcher.link.tokens import parse_token
from launcher.link.wire import REASON_KEY, split_address
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc

IDENTITY_DIR = "identity"
KEY_FILE = "worker.key"
CERT_FILE = "worker.crt"
CA_FILE = "ca.crt"
IDENTITY_FILE = "identity.json"
CONNECT_TIMEOUT_S = 10.0
ENROLL_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Identity:
    """A worker's enrolled identity: files under ``directory``, id assigned by the control plane."""

    worker_id: str
    name: str
    control_plane: str
    directory: Path
    tunnel_port: int = 0

    @classmethod
    def load(cls, state_dir: Path) -> Identity:
        """The identity ``enroll`` wrote under ``state_dir``; raises ``ControlPlaneError``."""
        directory = state_dir / IDENTITY_DIR
        try:
            document = json.loads((directory / IDENTITY_FILE).read_text())
            if not (directory / KEY_FILE).exists():
                raise ControlPlaneError(
                    f"{directory / KEY_FILE} is missing: restore it from a backup, or remove "
                    f"{directory} and enroll again with a new token"
                )
            refuse_loose_key(directory / KEY_FILE)
            return cls(
                worker_id=document["worker_id"],
                name=document["name"],
                control_plane=document["control_plane"],
                directory=directory,
                tunnel_port=int(document.get("tunnel_port", 0)),
            )
        except FileNotFoundError:
            raise ControlPlaneError(
                f"{directory} holds no worker identity: run `duckcell enroll --state {state_dir}` "
                "first"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ControlPlaneError(
                f"cannot read the worker identity in {directory}: {exc!r}; remove it and enroll "
                "again"
            ) from None

    @property
    def tunnel_address(self) -> str:
        """Where the tunnel listens: the enrollment host with the port the control plane gave."""
        if not self.tunnel_port:
            raise ControlPlaneError(
                f"{self.directory / IDENTITY_FILE} names no tunnel port: pass --control-plane "
                "HOST:PORT of the control plane's tunnel"
            )
        host = self.control_plane.rpartition(":")[0]
        return f"{host}:{self.tunnel_port}"

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_FILE


async def enroll(control_plane: str, token: str, state_dir: Path, name: str) -> Identity:
    """Enroll this worker with the control plane at ``control_plane`` (``HOST:PORT``)."""
    parsed = parse_token(token)
    target = state_dir / IDENTITY_DIR
    _refuse_existing(target)
    host, port = split_address(control_plane)

    ca_pem = await _pin_ca(control_plane, host, port, parsed.ca_fingerprint)
    key_pem, csr_pem = generate_worker_key_and_csr(name)
    reply = await _call_enroll(control_plane, host, ca_pem, token, csr_pem, name)

    cert = verify_chain(reply.certificate_pem, ca_pem)
    if not _same_key(cert, key_pem):
        raise CertificateError(
            f"the control plane at {control_plane} returned a certificate for another key: "
            "enroll again with a new token"
        )
    identity = Identity(reply.worker_id, name, control_plane, target, reply.tunnel_port)
    _write_identity(identity, key_pem, reply.certificate_pem, ca_pem)
    return identity


def _refuse_existing(target: Path) -> None:
    if target.exists():
        raise ControlPlaneError(
            f"{target} already holds an enrolled worker identity: a restarted worker keeps it; "
            f"to enroll as a new worker, remove {target} first"
        )


def _same_key(cert: x509.Certificate, key_pem: bytes) -> bool:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ours = serialization.load_pem_private_key(key_pem, password=None).public_key()
    return cert.public_key().public_bytes(*spki) == ours.public_bytes(*spki)


async def _pin_ca(control_plane: str, host: str, port: int, expected: str) -> bytes:
    """The CA certificate the server presents, checked against the token's pin; sends nothing.

    Verification is off for this one handshake on purpose: the pin is the verification. The
    gRPC call that follows verifies the server against the CA returned here.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # gRPC servers may refuse a handshake without it
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=host)
    except (OSError, TimeoutError) as exc:
        raise ControlPlaneError(
            f"cannot reach the control plane at {control_plane}: {exc or 'timed out'}; "
            "check the address and that it is running"
        ) from None
    try:
        chain = _presented_chain(writer.get_extra_info("ssl_object"))
    finally:
        writer.close()
    if len(chain) < 2:
        raise CertificateError(
            f"the control plane at {control_plane} presents no CA certificate after its own: "
            "it is not a duckcell control plane, or an old one; check the address"
        )
    leaf_pem, ca_pem = chain[0], chain[-1]
    presented = fingerprint_of(ca_pem)
    if presented != expected:
        raise CaMismatchError(
            f"the control plane at {control_plane} presents CA {presented} but the token was "
            f"made for {expected}; check the address or get a new token"
        )
    verify_chain(leaf_pem, ca_pem)
    return ca_pem


def _presented_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The server's certificate chain as sent, leaf first, as PEM.

    Python 3.13 has a public ``get_unverified_chain`` (DER bytes). On 3.11 and 3.12 the same
    call exists only on the private ``_sslobj`` (returning ``_ssl.Certificate`` objects); this
    is the one place that reaches for it.
    """
    public = getattr(ssl_object, "get_unverified_chain", None)
    if public is not None:
        ders: list[bytes] = list(public() or [])
    else:
        private = ssl_object._sslobj.get_unverified_chain() or []  # type: ignore[attr-defined]
        ders = [cert.public_bytes(ssl._ssl.ENCODING_DER) for cert in private]  # type: ignore[attr-defined]
    return [ssl.DER_cert_to_PEM_cert(der).encode() for der in ders]


async def _call_enroll(
    control_plane: str, host: str, ca_pem: bytes, token: str, csr_pem: bytes, name: str
) -> pb.EnrollReply:
    """The Enroll RPC over TLS verified against the pinned CA; gRPC errors become ours."""
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with aio.secure_channel(control_plane, credentials) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        request = pb.EnrollRequest(
            token=token, csr_pem=csr_pem, worker_name=name, worker_version=__version__
        )
        try:
            return await stub.Enroll(request, timeout=ENROLL_TIMEOUT_S)
        except aio.AioRpcError as error:
            raise _translate(control_plane, error) from None


def _translate(control_plane: str, error: aio.AioRpcError) -> ControlPlaneError:
    details = error.details() or ""
    code = error.code()
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        reason = dict(error.trailing_metadata() or ()).get(REASON_KEY, "")
        return enrollment_error(str(reason), details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CertificateError(f"the control plane refused the request: {details}")
    return ControlPlaneError(
        f"enrollment with the control plane at {control_plane} failed ({code.name}): {details}"
    )


def _write_identity(identity: Identity, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> None:
    """Write every file into a temporary directory, then rename it into place in one step."""
    state_dir = identity.directory.parent
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(dir=state_dir, prefix=f".{IDENTITY_DIR}-"))
    try:
        write_private_key(tmp / KEY_FILE, key_pem)
        (tmp / CERT_FILE).write_bytes(cert_pem)
        (tmp / CA_FILE).write_bytes(ca_pem)
        document = {
            "worker_id": identity.worker_id,
            "name": identity.name,
            "control_plane": identity.control_plane,
            "tunnel_port": identity.tunnel_port,
        }
        (tmp / IDENTITY_FILE).write_text(json.dumps(document, indent=2) + "\n")
        _refuse_existing(identity.directory)  # another enroll may have finished meanwhile
        os.rename(tmp, identity.directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(state_dir)
