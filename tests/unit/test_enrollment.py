"""Enrollment round trip over real TLS on loopback: the control plane runs in-process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from launcher.cli.main import main
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.registry import WorkerRegistry
from launcher.controlplane.server import ControlPlaneServer
from launcher.errors import (
    CaMismatchError,
    CertificateError,
    ControlPlaneError,
    ExpiredTokenError,
    MalformedTokenError,
    UsedTokenError,
    WorkerNameTakenError,
)
from launcher.link.pki import verify_chain
from launcher.link.tokens import parse_token
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc
from launcher.worker.enroll import Identity, enroll


@dataclass
class RunningControlPlane:
    data: ControlPlaneData
    address: str

    def token(self, **kwargs: float) -> str:
        return self.data.tokens().create(**kwargs)

    def registry(self) -> WorkerRegistry:
        return WorkerRegistry(self.data.database())


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[RunningControlPlane]:
    """The server on its own event loop in a thread, so tests and the CLI can use asyncio.run."""
    data = ControlPlaneData(tmp_path / "cp")
    server = ControlPlaneServer(data, "127.0.0.1:0")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
        yield RunningControlPlane(data, server.address)
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def _enroll(cp: RunningControlPlane, token: str, state: Path, name: str = "w1") -> Identity:
    return asyncio.run(enroll(cp.address, token, state, name))


def _contents(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*")) if directory.exists() else []


def test_round_trip_writes_a_verified_identity(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    token = control_plane.token()
    identity = _enroll(control_plane, token, tmp_path / "worker", name="db-host-1")

    assert identity.worker_id.startswith("wkr-")
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    ca_pem = control_plane.data.ca().cert_pem()
    assert identity.ca_path.read_bytes() == ca_pem
    cert = verify_chain(identity.cert_path.read_bytes(), ca_pem)
    document = json.loads((identity.directory / "identity.json").read_text())
    assert document == {
        "worker_id": identity.worker_id,
        "name": "db-host-1",
        "control_plane": control_plane.address,
        "tunnel_port": identity.tunnel_port,
    }
    assert identity.tunnel_port > 0
    assert Identity.load(tmp_path / "worker") == identity
    identity.key_path.chmod(0o640)  # restored from a backup without its mode: not used
    with pytest.raises(CertificateError, match="readable by other users: run `chmod 600"):
        Identity.load(tmp_path / "worker")
    identity.key_path.chmod(0o600)
    key = identity.key_path.read_bytes()
    identity.key_path.unlink()  # lost: say what to do, not "run enroll" (it would refuse)
    with pytest.raises(ControlPlaneError, match=r"worker\.key is missing: restore it"):
        Identity.load(tmp_path / "worker")
    identity.key_path.write_bytes(key)
    identity.key_path.chmod(0o600)
    assert _contents(tmp_path / "worker") == [
        identity.directory,
        *sorted(identity.directory.iterdir()),
    ]

    (worker,) = control_plane.registry().list()
    assert worker.worker_id == identity.worker_id
    assert worker.name == "db-host-1"
    assert worker.cert_serial == cert.serial_number
    assert worker.token_id == parse_token(token).token_id
    assert worker.revoked_at is None
    assert control_plane.registry().get(identity.worker_id) == worker


def test_replayed_token_is_refused_and_writes_nothing(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    token = control_plane.token()
    _enroll(control_plane, token, tmp_path / "first")
    with pytest.raises(UsedTokenError, match="already used"):
        _enroll(control_plane, token, tmp_path / "second")
    assert _contents(tmp_path / "second") == []
    assert len(control_plane.registry().list()) == 1


def test_a_name_another_worker_holds_is_refused_until_that_worker_is_revoked(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    """Pins name a worker by name or id: a second `db-east` (or a worker calling itself by
    the first's id) would be handed the first one's pinned queries."""
    first = _enroll(control_plane, control_plane.token(), tmp_path / "first", name="db-east")
    token = control_plane.token()
    for name in ("db-east", first.worker_id):
        with pytest.raises(WorkerNameTakenError, match=f"taken by worker {first.worker_id}"):
            _enroll(control_plane, token, tmp_path / "second", name=name)
        assert _contents(tmp_path / "second") == []
    assert [w.worker_id for w in control_plane.registry().list()] == [first.worker_id]
    control_plane.registry().revoke(first.worker_id)
    again = _enroll(control_plane, token, tmp_path / "second", name="db-east")  # still unused
    assert again.worker_id != first.worker_id


def test_expired_token_is_refused(control_plane: RunningControlPlane, tmp_path: Path) -> None:
    token = control_plane.token(ttl_s=60, now=time.time() - 3600)
    with pytest.raises(ExpiredTokenError, match="expired"):
        _enroll(control_plane, token, tmp_path / "worker")
    assert _contents(tmp_path / "worker") == []
    assert control_plane.registry().list() == []


def test_token_of_another_control_plane_is_refused_before_sending_it(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    other = ControlPlaneData(tmp_path / "other-cp")
    token = other.tokens().create()
    with pytest.raises(CaMismatchError) as refused:
        _enroll(control_plane, token, tmp_path / "worker")
    message = str(refused.value)
    # The worker's own wording: the control plane never saw the token.
    assert f"the control plane at {control_plane.address} presents CA" in message
    assert control_plane.data.ca().fingerprint() in message
    assert other.ca().fingerprint() in message
    assert parse_token(token).secret not in message
    assert _contents(tmp_path / "worker") == []
    assert control_plane.registry().list() == []
    other.tokens().redeem(token)  # still unused: it never reached any control plane


@pytest.mark.parametrize("cut", [1, 30])
def test_malformed_token_is_refused_without_echoing_it(
    control_plane: RunningControlPlane, tmp_path: Path, cut: int
) -> None:
    token = control_plane.token()
    broken = token[:-cut]
    with pytest.raises(MalformedTokenError) as refused:
        _enroll(control_plane, broken, tmp_path / "worker")
    assert parse_token(token).secret not in str(refused.value)
    assert broken not in str(refused.value)
    assert _contents(tmp_path / "worker") == []


def test_existing_identity_is_kept(control_plane: RunningControlPlane, tmp_path: Path) -> None:
    state = tmp_path / "worker"
    first = _enroll(control_plane, control_plane.token(), state)
    before = {path: path.read_bytes() for path in first.directory.iterdir()}
    second_token = control_plane.token()
    with pytest.raises(ControlPlaneError, match="already holds an enrolled worker identity"):
        _enroll(control_plane, second_token, state)
    assert {path: path.read_bytes() for path in first.directory.iterdir()} == before
    assert _contents(state) == [first.directory, *sorted(first.directory.iterdir())]
    control_plane.data.tokens().redeem(second_token)  # refused before it was sent


def test_cli_enroll_reads_the_token_file(
    control_plane: RunningControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(control_plane.token() + "\n")
    state = tmp_path / "worker"
    argv = ["enroll", "--control-plane", control_plane.address, "--token-file", str(token_file)]
    assert main([*argv, "--state", str(state), "--name", "cli-worker"]) == 0
    out = capsys.readouterr().out
    (worker,) = control_plane.registry().list()
    assert out == worker.worker_id + "\n"
    assert json.loads((state / "identity" / "identity.json").read_text())["name"] == "cli-worker"

    assert main([*argv, "--state", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "already used" in err and len(err.strip().splitlines()) == 1
    assert _contents(tmp_path / "again") == []


def test_cli_enroll_without_a_token_says_where_to_put_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DUCKCELL_ENROLL_TOKEN", raising=False)
    argv = ["enroll", "--control-plane", "localhost:1", "--state", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "DUCKCELL_ENROLL_TOKEN" in err and len(err.strip().splitlines()) == 1


def _raw_enroll(cp: RunningControlPlane, token: str, csr_pem: bytes) -> grpc.RpcError:
    credentials = grpc.ssl_channel_credentials(root_certificates=cp.data.ca().cert_pem())
    with grpc.secure_channel(cp.address, credentials) as channel:
        stub = pb_grpc.EnrollmentStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Enroll(pb.EnrollRequest(token=token, csr_pem=csr_pem), timeout=30)
    return failed.value


def test_server_maps_refusals_to_grpc_status(control_plane: RunningControlPlane) -> None:
    token = control_plane.token()
    error = _raw_enroll(control_plane, token, b"not a csr")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "certificate signing request" in error.details()

    error = _raw_enroll(control_plane, token, b"not a csr")  # the token was spent above
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in error.details()
    assert parse_token(token).secret not in error.details()
    assert ("duckcell-reason", "used") in tuple(error.trailing_metadata())
    assert control_plane.registry().list() == []


def test_cli_enroll_reads_the_environment(
    control_plane: RunningControlPlane,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DUCKCELL_ENROLL_TOKEN", control_plane.token())
    state = tmp_path / "worker"
    assert main(["enroll", "--control-plane", control_plane.address, "--state", str(state)]) == 0
    worker_id = capsys.readouterr().out.strip()
    assert json.loads((state / "identity" / "identity.json").read_text())["worker_id"] == worker_id


def test_cli_serve_announces_itself_and_stops_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    command = [sys.executable, "-m", "launcher.cli", "controlplane", "serve"]
    process = subprocess.Popen(
        [*command, "--data", str(data), "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # the server is up once it has said so
        fingerprint = ControlPlaneData(data).ca().fingerprint()
        assert "listening on 127.0.0.1:" in line and fingerprint in line
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()
