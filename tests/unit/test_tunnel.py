"""The worker's tunnel over real mutual TLS on loopback; the control plane runs in-process.

The server runs on its own event loop in a thread (as in test_enrollment.py); each test drives
the worker on its own loop and waits on conditions with deadlines, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio

from launcher.cli.main import main
from launcher.controlplane.ca import CertificateAuthority
from launcher.controlplane.tunnel import HeartbeatWatch
from launcher.errors import TunnelRefusedError
from launcher.link.pki import generate_worker_key_and_csr
from launcher.protocol import controlplane_pb2 as pb
from launcher.protocol import controlplane_pb2_grpc as pb_grpc
from launcher.worker.dialing import Backoff, Keepalive, ProxyConfig
from launcher.worker.enroll import Identity
from launcher.worker.tunnel import TunnelClient
from tests.support.controlplane import DEADLINE_S, FAST, INTERVAL_S, ControlPlane
from tests.support.waiting import eventually, run


def test_worker_is_online_within_a_heartbeat_and_offline_after_it_stops(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        client = TunnelClient(identity, labels={"zone": "a"}, backoff=FAST)
        running = asyncio.create_task(client.run())
        await asyncio.wait_for(client.connected.wait(), DEADLINE_S)
        first = control_plane.worker(identity.worker_id).last_heartbeat
        assert first is not None and control_plane.worker(identity.worker_id).online
        await eventually(
            lambda: (control_plane.worker(identity.worker_id).last_heartbeat or 0) > first,
            "heartbeats keep arriving",
        )
        worker = control_plane.worker(identity.worker_id)
        assert worker.labels == {"zone": "a"}

        assert main(["controlplane", "workers", "--data", str(control_plane.data.root)]) == 0
        out = capsys.readouterr().out
        assert identity.worker_id in out and "online" in out and "s ago" in out

        client.stop()
        await asyncio.wait_for(running, DEADLINE_S)
        await eventually(
            lambda: not control_plane.worker(identity.worker_id).online, "offline after stop"
        )
        assert client.connections == 1 and client.refusal is None

    run(scenario)


def _raw_credentials(
    ca_pem: bytes, key_pem: bytes | None, cert_pem: bytes | None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)


async def _raw_connect(address: str, credentials: grpc.ChannelCredentials) -> aio.AioRpcError:
    """Open Connect, send Hello and read until the server ends the stream with an error."""
    async with aio.secure_channel(address, credentials) as channel:
        call = pb_grpc.TunnelStub(channel).Connect()
        # A write racing the server's abort fails locally; reading gives the real status.
        with contextlib.suppress(aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(pb.WorkerMessage(hello=pb.Hello(worker_version="0.1.0")))
        with pytest.raises(aio.AioRpcError) as failed:
            while await call.read() is not aio.EOF:
                pass
    return failed.value


def test_certificates_of_another_ca_and_no_certificate_are_refused(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        assert control_plane.server is not None
        ca_pem = control_plane.data.ca().cert_pem()
        other = CertificateAuthority.load_or_create(tmp_path / "other-ca")
        key_pem, csr_pem = generate_worker_key_and_csr("intruder")
        forged, _ = other.sign_worker_csr(csr_pem, worker_id=identity.worker_id)
        tunnel = control_plane.server.tunnel_address

        error = await _raw_connect(tunnel, _raw_credentials(ca_pem, key_pem, forged))
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        error = await _raw_connect(tunnel, _raw_credentials(ca_pem, None, None))
        assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        # The enrollment port does not ask for a certificate, so there the tunnel says why.
        address = control_plane.server.address
        error = await _raw_connect(address, _raw_credentials(ca_pem, key_pem, forged))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "client certificate" in (error.details() or "")
        assert not control_plane.worker(identity.worker_id).online

    run(scenario)


def test_a_certificate_other_than_the_enrolled_one_is_refused(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        assert control_plane.server is not None
        key_pem, csr_pem = generate_worker_key_and_csr("copy")
        ca = control_plane.data.ca()
        second, _ = ca.sign_worker_csr(csr_pem, worker_id=identity.worker_id)
        credentials = _raw_credentials(ca.cert_pem(), key_pem, second)
        error = await _raw_connect(control_plane.server.tunnel_address, credentials)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "is not the one worker" in (error.details() or "")

    run(scenario)


def test_revoked_worker_is_disconnected_and_not_let_back(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        client = TunnelClient(identity, backoff=FAST)
        running = asyncio.create_task(client.run())
        await asyncio.wait_for(client.connected.wait(), DEADLINE_S)

        await control_plane.revoke(identity.worker_id)
        with pytest.raises(TunnelRefusedError, match="was revoked") as refused:
            await asyncio.wait_for(running, DEADLINE_S)
        assert refused.value.reason == "revoked" and client.refusal is refused.value
        assert client.connections == 1  # it did not try again
        await eventually(lambda: not control_plane.worker(identity.worker_id).online, "offline")

        again = TunnelClient(identity, backoff=FAST)
        with pytest.raises(TunnelRefusedError, match="was revoked"):
            await asyncio.wait_for(again.run(), DEADLINE_S)
        assert again.connections == 0

    run(scenario)


def test_revocation_by_the_cli_closes_the_tunnel_within_a_heartbeat(
    control_plane: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        client = TunnelClient(identity, backoff=FAST)
        running = asyncio.create_task(client.run())
        await asyncio.wait_for(client.connected.wait(), DEADLINE_S)

        data = str(control_plane.data.root)
        assert main(["controlplane", "worker", "revoke", "--data", data, identity.worker_id]) == 0
        assert f"revoked {identity.worker_id}" in capsys.readouterr().out
        with pytest.raises(TunnelRefusedError) as refused:
            await asyncio.wait_for(running, DEADLINE_S)
        assert refused.value.reason == "revoked"
        assert main(["controlplane", "workers", "--data", data]) == 0
        assert "revoked" in capsys.readouterr().out

    run(scenario)


def test_incompatible_version_is_refused_naming_both(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        client = TunnelClient(identity, backoff=FAST, version="9.0.0")
        with pytest.raises(TunnelRefusedError) as refused:
            await asyncio.wait_for(client.run(), DEADLINE_S)
        assert refused.value.reason == "version"
        assert "9.0.0" in str(refused.value) and "0.1.0" in str(refused.value)

    run(scenario)


def test_silent_worker_is_marked_offline_after_three_missed_heartbeats(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        assert control_plane.server is not None
        credentials = _raw_credentials(
            identity.ca_path.read_bytes(),
            identity.key_path.read_bytes(),
            identity.cert_path.read_bytes(),
        )
        # Hello, then silence: the watchdog ends the stream with UNAVAILABLE.
        error = await _raw_connect(control_plane.server.tunnel_address, credentials)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "no heartbeat" in (error.details() or "")
        assert not control_plane.worker(identity.worker_id).online

    run(scenario)


def test_messages_other_than_heartbeats_do_not_keep_a_worker_online(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream that carries traffic but no heartbeat (a wedged heartbeat task, say) is ended
    after three intervals all the same."""

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        assert control_plane.server is not None
        credentials = _raw_credentials(
            identity.ca_path.read_bytes(),
            identity.key_path.read_bytes(),
            identity.cert_path.read_bytes(),
        )
        async with aio.secure_channel(control_plane.server.tunnel_address, credentials) as channel:
            call = pb_grpc.TunnelStub(channel).Connect()
            await call.write(pb.WorkerMessage(hello=pb.Hello(worker_version="0.1.0")))
            assert (await call.read()).HasField("welcome")

            async def chatter() -> None:
                with contextlib.suppress(aio.AioRpcError, asyncio.InvalidStateError):
                    while True:  # pacing, twice per interval: more than enough traffic
                        await call.write(pb.WorkerMessage(draining=pb.Draining()))
                        await asyncio.sleep(INTERVAL_S / 2)

            talking = asyncio.create_task(chatter())
            try:
                with pytest.raises(aio.AioRpcError) as ended:
                    while await call.read() is not aio.EOF:
                        pass
            finally:
                talking.cancel()
        # A write racing the server's end can turn the status the reader sees into a local
        # INTERNAL; the server's log says why it ended the stream either way.
        assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        assert f"worker {identity.worker_id} missed 3 heartbeats" in caplog.text
        await eventually(lambda: not control_plane.worker(identity.worker_id).online, "offline")

    run(scenario)


@pytest.mark.parametrize(
    ("beats", "now", "overdue"),
    [
        ([], 0.29, False),  # welcomed at 0: three intervals of 0.1 s allowed
        ([], 0.31, True),
        ([0.25], 0.54, False),  # each heartbeat restarts the count
        ([0.25], 0.56, True),
        ([0.1, 0.2, 0.3], 0.59, False),
    ],
)
def test_a_worker_is_overdue_three_intervals_after_its_last_heartbeat(
    beats: list[float], now: float, overdue: bool
) -> None:
    watch = HeartbeatWatch(interval_s=0.1, last_beat=0.0)
    for at in beats:
        watch.beat(at)
    assert watch.overdue(now) is overdue
    assert watch.deadline == pytest.approx((beats[-1] if beats else 0.0) + 0.3)


def test_worker_reconnects_by_itself_after_a_control_plane_restart(
    control_plane: ControlPlane, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        delays: list[float] = []

        async def sleep(delay: float) -> None:
            delays.append(delay)
            await asyncio.sleep(delay)

        client = TunnelClient(identity, backoff=FAST, sleep=sleep)
        running = asyncio.create_task(client.run())
        await asyncio.wait_for(client.connected.wait(), DEADLINE_S)

        await control_plane.stop()
        await eventually(lambda: not client.connected.is_set(), "the tunnel dropped")
        await eventually(lambda: len(delays) >= 2, "it retried while the control plane was down")
        await control_plane.start()
        await eventually(lambda: client.connections == 2, "it reconnected by itself")
        assert control_plane.worker(identity.worker_id).online
        assert all(0 <= delay <= FAST.cap_s for delay in delays)
        # The operator sees the link come back and how long it was down.
        assert re.search(r"tunnel to \S+ back up after \d+\.\d s down", caplog.text)

        client.stop()
        await asyncio.wait_for(running, DEADLINE_S)

    run(scenario)


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that records each target it was asked to reach.

    ``frozen``: it keeps every connection open but forwards nothing more, the way a dead NAT
    or a vanished host looks from one end (no FIN, no RST).
    """

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None
        self.frozen = False

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
        assert method == "CONNECT"
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if not self.frozen:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def test_the_worker_dials_out_through_https_proxy_unless_no_proxy_names_the_host(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """Upper-case HTTPS_PROXY/NO_PROXY, which gRPC by itself ignores, through a real proxy."""

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        proxy = ConnectProxy()
        url = await proxy.start()
        try:
            await _connect_and_stop(identity, ProxyConfig.from_env({"HTTPS_PROXY": url}))
            assert proxy.targets == [identity.tunnel_address]  # through the proxy

            env = {"HTTPS_PROXY": url, "NO_PROXY": "example.com, 127.0.0.1"}
            await _connect_and_stop(identity, ProxyConfig.from_env(env))
            assert proxy.targets == [identity.tunnel_address]  # the second dial went direct
        finally:
            await proxy.close()

    run(scenario)


def test_a_half_open_tunnel_is_noticed_by_keepalive(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The path to the control plane goes silent without closing: heartbeats still "send"
    (into the void), so only keepalive pings can tell. Short keepalive numbers keep the test
    fast; with the defaults (10 s + 10 s) the same scenario took 20.1 s."""

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        proxy = ConnectProxy()
        client = TunnelClient(
            identity,
            backoff=FAST,
            proxy=ProxyConfig(await proxy.start()),
            keepalive=Keepalive(time_s=0.5, timeout_s=0.5),
        )
        running = asyncio.create_task(client.run())
        try:
            await asyncio.wait_for(client.connected.wait(), DEADLINE_S)
            proxy.frozen = True
            silent_since = time.monotonic()
            await eventually(lambda: not client.connected.is_set(), "the dead tunnel was noticed")
            assert time.monotonic() - silent_since < 3.0
        finally:
            client.stop()
            await asyncio.wait_for(running, DEADLINE_S)
            await proxy.close()

    run(scenario)


async def _connect_and_stop(identity: Identity, proxy: ProxyConfig) -> None:
    client = TunnelClient(identity, backoff=FAST, proxy=proxy)
    running = asyncio.create_task(client.run())
    await asyncio.wait_for(client.connected.wait(), DEADLINE_S)
    client.stop()
    await asyncio.wait_for(running, DEADLINE_S)


@pytest.mark.parametrize(
    ("env", "address", "options"),
    [
        ({}, "cp:7444", ()),
        ({"HTTPS_PROXY": "http://p:3128"}, "cp:7444", (("grpc.http_proxy", "http://p:3128"),)),
        (
            {"https_proxy": "http://a:1", "HTTPS_PROXY": "http://b:2"},
            "cp:1",
            (("grpc.http_proxy", "http://a:1"),),
        ),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"},
            "cp.example.com:1",
            (("grpc.enable_http_proxy", 0),),
        ),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": ".example.com"},
            "example.com:1",
            (("grpc.enable_http_proxy", 0),),
        ),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"},
            "badexample.com:1",
            (("grpc.http_proxy", "http://p:1"),),
        ),
        ({"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, "cp:1", (("grpc.enable_http_proxy", 0),)),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "::1"},
            "[::1]:7444",
            (("grpc.enable_http_proxy", 0),),
        ),
    ],
)
def test_proxy_choice_follows_https_proxy_and_no_proxy(
    env: dict[str, str], address: str, options: tuple[tuple[str, object], ...]
) -> None:
    assert ProxyConfig.from_env(env).channel_options(address) == options


@pytest.mark.parametrize(
    ("draw", "attempt", "expected"),
    [(0.0, 5, 0.0), (0.999, 0, 0.4995), (0.5, 3, 2.0), (1.0, 10, 30.0), (1.0, 1000, 30.0)],
)
def test_backoff_is_exponential_with_full_jitter_and_capped(
    draw: float, attempt: int, expected: float
) -> None:
    backoff = Backoff(base_s=0.5, cap_s=30.0, random=lambda: draw)
    assert backoff.delay(attempt) == pytest.approx(expected)
