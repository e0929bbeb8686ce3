"""docker-compose.yml for real: the real engine, Debian's docker-compose (or Compose v2), the
duckcell and sandbox images, and the real ADBC client on the published loopback port.

One stack (a project name of this module's own, ports picked free) is brought up once and
shared in order: first query, no listener, restart, stop while a query runs, kill mid-query,
down/up. The worker's state is a named volume and its cache a host directory (bind mount), so both
ways of placing sandboxes' mounts are exercised. The refusals (a used token, no engine socket,
a read-only state volume, a state directory on no mount) run as extra worker services of the
same project (``_FAILING``), each with its own volume and no restart.
Teardown is ``down -v`` whatever happened; the engine fixture then checks that no volume was
left.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import adbc_driver_flightsql.dbapi as adbc_flightsql
import docker
import pytest
from adbc_driver_flightsql import DatabaseOptions
from adbc_driver_manager import AdbcStatusCode

from launcher.sandbox.image.build import ImageBuilder
from launcher.sandbox.image.recipe import DUCKCELL_TAG, duckcell_recipe
from tests.integration.conftest import REPO

pytestmark = pytest.mark.docker

UP_DEADLINE_S = 120.0
STEP_DEADLINE_S = 90.0
FIRST_QUERY = "SELECT count(*) AS trips FROM trips"
# Long enough to be killed mid-way; the marker finds it in the worker's audit log.
LONG_QUERY = (
    "SELECT 'i19-kill-marker' AS m, sum(hash(a.range * b.range)) "
    "FROM range(200000) a, range(200000) b"
)
# A few seconds of work on one core: still running when `stop` arrives, done within the grace.
DRAIN_QUERY = "SELECT 'i19-drain-marker' AS m, sum(hash(range)) FROM range(1200000000)"
_FAILING = """
services:
  worker:
    volumes: ["{cache}:/var/lib/duckcell/cache"]  # a host directory, the state a named volume
  worker-used-token:
    image: ${DUCKCELL_IMAGE_TAG:-duckcell:latest}
    restart: "no"
    command: [worker, --enroll-token-file=/run/duckcell-enroll/token,
              --enroll-address=controlplane:7443]
    environment: {DUCKCELL_HOST_PATHS: auto, DUCKCELL_IMAGE: "${DUCKCELL_SANDBOX_IMAGE}"}
    volumes:
      - /var/run/docker.sock:/var/run/docker.sock
      - fail-state-1:/var/lib/duckcell
      - enroll:/run/duckcell-enroll:ro
  worker-no-socket:
    image: ${DUCKCELL_IMAGE_TAG:-duckcell:latest}
    restart: "no"
    command: [worker]
    environment: {DUCKCELL_HOST_PATHS: auto, DUCKCELL_ENROLL_TOKEN: unused}
    volumes: [fail-state-2:/var/lib/duckcell]
  worker-read-only:
    image: ${DUCKCELL_IMAGE_TAG:-duckcell:latest}
    restart: "no"
    command: [worker]
    environment: {DUCKCELL_HOST_PATHS: auto}
    volumes:
      - /var/run/docker.sock:/var/run/docker.sock
      - fail-state-3:/var/lib/duckcell:ro
  worker-no-volume:
    image: ${DUCKCELL_IMAGE_TAG:-duckcell:latest}
    restart: "no"
    command: [worker]
    environment: {DUCKCELL_HOST_PATHS: auto}
    volumes: [/var/run/docker.sock:/var/run/docker.sock]
volumes:
  fail-state-1:
  fail-state-2:
  fail-state-3:
"""


def _compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    done = subprocess.run(["docker", "compose", "version"], capture_output=True)
    if done.returncode == 0:
        return ["docker", "compose"]
    pytest.fail("neither docker-compose nor `docker compose` is installed (.ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Stack:
    """One compose project of this module: run compose, read state, query over ADBC."""

    project: str
    override: Path
    engine: docker.DockerClient
    env: dict[str, str] = field(default_factory=dict)
    cache: Path = Path()  # the worker's cache: a host directory (bind mount)
    started: float = 0.0  # when `up` began

    def compose(self, *args: str, check: bool = True, timeout: float = 180) -> str:
        command = [*_compose_command(), "-p", self.project, "-f", str(REPO / "docker-compose.yml")]
        command += ["-f", str(self.override), *args]
        done = subprocess.run(
            command, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    def container(self, service: str) -> docker.models.containers.Container:
        found = self.engine.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        assert len(found) == 1, f"{service}: {len(found)} containers"
        return found[0]

    def exec(self, service: str, *command: str) -> str:
        result = self.container(service).exec_run(list(command))
        assert result.exit_code == 0, result.output.decode(errors="replace")
        return result.output.decode()

    def volume_path(self, name: str) -> Path:
        return Path(self.engine.volumes.get(f"{self.project}_{name}").attrs["Mountpoint"])

    @functools.cached_property
    def launcher_id(self) -> str:
        """The label of the worker's sandboxes (``launcher.cli.worker``: the engine's path of
        the state volume, hashed)."""
        digest = hashlib.sha256(str(self.volume_path("worker-state")).encode()).hexdigest()
        return f"container-{digest[:12]}"

    def sandboxes(self) -> list[str]:
        return [
            c.id
            for c in self.engine.containers.list(
                all=True, sparse=True, filters={"label": f"duckcell.launcher={self.launcher_id}"}
            )
        ]

    def healthy(self, service: str) -> bool:
        container = self.container(service)
        container.reload()
        return (container.attrs["State"].get("Health") or {}).get("Status") == "healthy"

    def wait(self, condition: object, what: str, deadline_s: float = STEP_DEADLINE_S) -> None:
        end = time.monotonic() + deadline_s
        while not condition():  # type: ignore[operator]
            if time.monotonic() > end:
                logs = self.compose("logs", "--tail=30", check=False)
                raise AssertionError(f"{what} did not happen within {deadline_s:g} s\n{logs}")
            time.sleep(0.2)

    def worker_ids(self) -> list[str]:
        listing = self.exec("controlplane", "duckcell", "controlplane", "workers")
        return [line.split()[0] for line in listing.splitlines()[1:] if line.strip()]

    def connect(self) -> adbc_flightsql.Connection:
        ca = self.exec("controlplane", "duckcell", "controlplane", "ca")
        key = self.exec("controlplane", "cat", "/var/lib/duckcell-controlplane/first-api-key")
        options = {
            DatabaseOptions.TLS_ROOT_CERTS.value: ca,
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {key.strip()}",
        }
        location = f"grpc+tls://127.0.0.1:{self.env['DUCKCELL_FLIGHT_PORT']}"
        return adbc_flightsql.connect(location, db_kwargs=options, autocommit=True)

    def query(self, sql: str = FIRST_QUERY) -> list[tuple[object, ...]]:
        with self.connect() as connection, connection.cursor() as cursor:
            cursor.execute(sql)
            return list(cursor.fetchall())


@pytest.fixture(scope="module")
def stack(
    engine: docker.DockerClient, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    ImageBuilder(client=engine, tag=DUCKCELL_TAG, recipe=duckcell_recipe()).build()
    override = tmp_path_factory.mktemp("compose") / "failing.yml"
    cache = tmp_path_factory.mktemp("worker-cache")
    override.write_text(_FAILING.replace("{cache}", str(cache)))
    env = {
        **os.environ,
        "DUCKCELL_QUERY_PORT": str(_free_port()),
        "DUCKCELL_FLIGHT_PORT": str(_free_port()),
        "DUCKCELL_SANDBOX_IMAGE": image,
    }
    built = Stack(f"dctest{uuid.uuid4().hex[:8]}", override, engine, env, cache, time.monotonic())
    try:
        built.compose("up", "-d", "controlplane", "worker")
        assert built.launcher_id  # known before `down -v` removes its volume
        yield built
    finally:
        built.compose("down", "-v", "--timeout", "60", check=False)
        leftovers = built.sandboxes()
        for container in leftovers:
            engine.api.remove_container(container, force=True)
        assert not leftovers, f"compose down left sandboxes behind: {leftovers}"


def test_up_answers_a_first_adbc_query_on_the_loopback_port(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack.wait(lambda: stack.healthy("controlplane") and stack.healthy("worker"), "both healthy")
    rows = None
    end = time.monotonic() + UP_DEADLINE_S
    while rows is None:
        try:
            rows = stack.query()
        except adbc_flightsql.Error:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    elapsed = time.monotonic() - stack.started
    with capsys.disabled():  # in the test log (CI's), not only on failure
        print(f"\ncompose up to the first ADBC query answered: {elapsed:.1f} s")
    assert rows == [(24000,)]
    assert len(stack.worker_ids()) == 1
    placed = stack.compose("logs", "--no-color", "worker")
    assert f"/var/lib/duckcell -> {stack.volume_path('worker-state')}" in placed
    assert f"/var/lib/duckcell/cache -> {stack.cache}" in placed
    assert any(stack.cache.joinpath(".sandboxes").iterdir()), "no sandbox directory in the cache"


def test_the_worker_publishes_no_port_and_listens_on_loopback_only(stack: Stack) -> None:
    worker = stack.container("worker")
    worker.reload()
    assert not worker.attrs["HostConfig"].get("PortBindings")
    assert not any(worker.attrs["NetworkSettings"]["Ports"].values())
    # /proc/net/tcp{,6}: listening sockets (state 0A) with their local address, hex.
    tables = stack.exec("worker", "cat", "/proc/net/tcp", "/proc/net/tcp6")
    listening = [
        line.split()[1].rsplit(":", 1)[0]
        for line in tables.splitlines()
        if len(line.split()) > 3 and line.split()[3] == "0A"
    ]
    # 127.0.0.0/8 (Docker's DNS answers on 127.0.0.11 in every container) or ::1.
    outside = [a for a in listening if not a.endswith("7F") and a != "0" * 24 + "01000000"]
    assert listening and not outside, f"non-loopback listeners: {outside}"
    # The control plane publishes, on loopback only, and runs without root or capabilities.
    control = stack.container("controlplane").attrs
    published = control["HostConfig"]["PortBindings"]
    assert {b["HostIp"] for bindings in published.values() for b in bindings} == {"127.0.0.1"}
    assert control["Config"]["User"] == "65534:65534"
    assert control["HostConfig"]["ReadonlyRootfs"] is True
    assert control["HostConfig"]["CapDrop"] == ["ALL"]


def test_restart_keeps_the_worker_and_reaps_the_old_sandboxes(stack: Stack) -> None:
    before_ids = stack.worker_ids()
    stack.wait(lambda: bool(stack.sandboxes()), "the warm pool filling")
    old = set(stack.sandboxes())
    stack.compose("restart", "worker")
    stack.wait(lambda: stack.healthy("worker"), "the worker healthy again")
    stack.wait(lambda: not old & set(stack.sandboxes()), "the old sandboxes removed")
    assert stack.worker_ids() == before_ids
    assert stack.query() == [(24000,)]
    # `duckcell sandboxes list` in the worker's container knows the worker's label.
    listed = stack.exec("worker", "duckcell", "sandboxes", "list")
    names = {
        str(c["Names"][0]).lstrip("/")
        for c in stack.engine.api.containers(
            all=True, filters={"label": f"duckcell.launcher={stack.launcher_id}"}
        )
    }
    shown = {line.split()[0] for line in listed.splitlines() if line.strip()}
    assert shown and shown & names, (listed, names)  # the pool may refill in between


def test_stop_drains_a_running_query_and_leaves_no_sandbox(stack: Stack) -> None:
    audit = stack.volume_path("worker-state") / "audit.jsonl"
    results: list[object] = []

    def drained_query() -> None:
        try:
            results.append(stack.query(DRAIN_QUERY))
        except BaseException as error:
            results.append(error)

    client = threading.Thread(target=drained_query, daemon=True)
    client.start()
    stack.wait(
        lambda: audit.exists() and "i19-drain-marker" in audit.read_text(), "the query running"
    )
    stack.compose("stop", "--timeout", "60", "worker")
    client.join(STEP_DEADLINE_S)
    assert len(results) == 1 and isinstance(results[0], list), results
    assert results[0][0][0] == "i19-drain-marker"
    assert not stack.sandboxes(), "the stopped worker left sandboxes"
    stack.compose("start", "worker")
    stack.wait(lambda: stack.healthy("worker"), "the worker back after stop")


def test_kill_mid_query_is_unavailable_and_leaves_no_sandbox(stack: Stack) -> None:
    audit = stack.volume_path("worker-state") / "audit.jsonl"
    failure: list[BaseException] = []

    def long_query() -> None:
        try:
            stack.query(LONG_QUERY)
        except BaseException as error:
            failure.append(error)

    client = threading.Thread(target=long_query, daemon=True)
    client.start()
    stack.wait(
        lambda: audit.exists() and "i19-kill-marker" in audit.read_text(), "the query running"
    )
    running = set(stack.sandboxes())
    stack.container("worker").kill(signal="KILL")
    client.join(STEP_DEADLINE_S)
    assert not client.is_alive(), "the client hangs after the worker died"
    # ADBC's words for gRPC UNAVAILABLE: status IO, "Unavailable" in the detail.
    assert failure and isinstance(failure[0], adbc_flightsql.OperationalError), failure
    assert failure[0].status_code == AdbcStatusCode.IO, failure
    assert "disconnected during the query: run it again" in str(failure[0])
    assert "Detail: Unavailable" in str(failure[0])
    stack.compose("start", "worker")
    stack.wait(lambda: stack.healthy("worker"), "the worker back")
    stack.wait(lambda: not running & set(stack.sandboxes()), "the killed worker's sandboxes reaped")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert any(line.get("event") == "start" and line.get("lost") for line in lines)
    assert stack.query() == [(24000,)]


def test_down_then_up_keeps_identity_catalog_audit_and_cache(stack: Stack) -> None:
    ids = stack.worker_ids()
    marker = stack.cache / f"kept-{uuid.uuid4().hex[:6]}"
    marker.write_text("kept")
    audited = stack.exec("controlplane", "duckcell", "controlplane", "audit", "--json")
    assert json.loads(audited), "no audit record before down"
    stack.compose("down", "--timeout", "60")
    assert not stack.sandboxes(), "down left sandboxes"
    stack.compose("up", "-d", "controlplane", "worker")
    stack.wait(lambda: stack.healthy("worker"), "the worker healthy after up")
    assert stack.worker_ids() == ids
    assert marker.read_text() == "kept"
    after = json.loads(stack.exec("controlplane", "duckcell", "controlplane", "audit", "--json"))
    assert len(after) >= len(json.loads(audited))
    assert stack.query() == [(24000,)]


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("worker-used-token", "enrollment at start failed"),
        ("worker-no-socket", "no Docker engine socket at /var/run/docker.sock: mount"),
        ("worker-read-only", "is not writable (Read-only file system): mount a writable volume"),
        ("worker-no-volume", "cannot place sandboxes: the state directory /var/lib/duckcell is"),
    ],
)
def test_a_worker_that_cannot_start_says_why_in_one_line(
    stack: Stack, service: str, expected: str
) -> None:
    stack.compose("up", "-d", "--no-deps", service)
    container = stack.container(service)

    def exited() -> bool:
        container.reload()
        return container.status == "exited"

    stack.wait(exited, f"{service} exiting")
    assert container.attrs["State"]["ExitCode"] != 0
    logs = stack.compose("logs", "--no-color", service)
    errors = [line for line in logs.splitlines() if "duckcell: error:" in line]
    assert len(errors) == 1 and expected in errors[0], logs
    assert "Traceback" not in logs
