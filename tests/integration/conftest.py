"""Integration tier: the real Docker engine, the real sandbox image, real DuckDB.

A missing engine or image is a failure here, never a skip. Every sandbox a test creates is
labelled with a launcher id starting with ``test-``; at the end of the session any such
container still present fails the run (and is removed so the next run starts clean).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import docker
import pytest

from launcher.config import LauncherConfig, load_config
from launcher.executor import QueryExecution
from launcher.host import LocalLauncher
from launcher.sandbox.backend.base import SandboxBackend
from launcher.sandbox.backend.docker_engine import DockerBackend
from launcher.sandbox.image.build import ImageBuilder
from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX

T = TypeVar("T")
IMAGE = os.environ.get("DUCKCELL_TEST_IMAGE", "duckcell-sandbox:latest")
REPO = Path(__file__).resolve().parents[2]

# Small limits so memory, timeout and result-limit tests finish in seconds.
_TIGHT = """\
name: {name}
isolation: {isolation}
runtime: runc
limits:
  cpus: 1
  memory: 256MiB
  pids: 128
  scratch: 64MiB
  statement_timeout: 2s
  max_result_rows: 100000
  max_result_bytes: 64MiB
duckdb:
  threads: 1
  memory_limit: 128MiB
  max_temp_directory_size: 32MiB
session:
  idle_ttl: 30s
  max_lifetime: 5m
pool:
  warm: 0
"""


@pytest.fixture(scope="session")
def policies_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped policies plus two tight ones for the limit tests."""
    directory = tmp_path_factory.mktemp("policies")
    for shipped in (REPO / "policies").glob("*.yaml"):
        (directory / shipped.name).write_text(shipped.read_text())
    (directory / "tight.yaml").write_text(_TIGHT.format(name="tight", isolation="query"))
    (directory / "tight-session.yaml").write_text(
        _TIGHT.format(name="tight-session", isolation="session")
    )
    return directory


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as error:
        pytest.fail(f"no Docker engine answers ({error}); run scripts/ensure-docker.sh")
    volumes_before = {v.name for v in client.volumes.list()}
    yield client
    new_volumes = sorted({v.name for v in client.volumes.list()} - volumes_before)
    assert not new_volumes, f"tests left volumes behind: {new_volumes}"
    leftovers = [
        c
        # Sparse: one list call, no inspect per container (which races with removals).
        for c in client.containers.list(
            all=True, sparse=True, filters={"label": "duckcell.launcher"}
        )
        # Only this run's: another test run on the same engine may be going on.
        if (c.attrs.get("Labels") or {})
        .get("duckcell.launcher", "")
        .startswith(f"{TEST_LAUNCHER_PREFIX}{RUN_ID}")
    ]
    for container in leftovers:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
    assert not leftovers, f"tests left sandboxes behind: {[c.attrs['Names'] for c in leftovers]}"
    client.close()


@pytest.fixture(scope="session")
def image(engine: docker.DockerClient) -> str:
    if os.environ.get("DUCKCELL_TEST_IMAGE"):
        engine.images.get(IMAGE)
        return IMAGE
    ImageBuilder(client=engine, tag=IMAGE).build()
    return IMAGE


def make_config(image: str, policies: Path, **overrides: object) -> LauncherConfig:
    flags: dict[str, object] = {
        "state_dir": tempfile.mkdtemp(prefix="dct"),
        "image": image,
        "launcher_id": f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-{uuid.uuid4().hex[:6]}",
        "policies_dir": policies,
        "queue_timeout_s": 60,
    }
    flags.update(overrides)
    return load_config(flags=flags, env={})


@pytest.fixture
def config(image: str, policies_dir: Path) -> LauncherConfig:
    return make_config(image, policies_dir)


@pytest.fixture
def cached_config(image: str, policies_dir: Path, tmp_path: Path) -> LauncherConfig:
    """The test policies with a cache directory of the test's own."""
    cache = tmp_path / "cache"
    cache.mkdir()
    return make_config(image, policies_dir, cache_dir=cache)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def with_launcher(
    config: LauncherConfig,
    body: Callable[[LocalLauncher], Awaitable[T]],
    *,
    warm: int | None = 0,
    backend: SandboxBackend | None = None,
) -> T:
    """``body`` on a started launcher over the engine (or over ``backend``, which it then owns)."""
    chosen = backend if backend is not None else DockerBackend.for_config(config)
    async with LocalLauncher(config, chosen, warm_override=warm) as launcher:
        return await body(launcher)


async def until_in_sandbox(
    execution: QueryExecution, task: asyncio.Future, timeout: float = 60
) -> None:
    """Wait until a query has its sandbox (it is running there), failing fast if it ended."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not execution.record.sandbox:
        if task.done():
            task.result()
            raise AssertionError("query ended before it reached a sandbox")
        assert asyncio.get_running_loop().time() < deadline, "query never reached a sandbox"
        await asyncio.sleep(0.02)


def containers_of(engine: docker.DockerClient, launcher_id: str) -> list[str]:
    """Names of the launcher's containers, from one list call: the SDK's ``containers.list``
    inspects each one after listing, which fails (NotFound) when a pool removes one between
    the two calls (seen in CI)."""
    found = engine.api.containers(all=True, filters={"label": f"duckcell.launcher={launcher_id}"})
    return [name.lstrip("/") for c in found for name in c["Names"][:1]]


async def until_no_container(
    engine: docker.DockerClient, launcher_id: str, deadline_s: float = 60.0
) -> None:
    """Wait until the engine lists no container of ``launcher_id`` (its sandboxes are gone);
    fails the test after ``deadline_s``. The engine call runs in a thread: the test's loop
    goes on serving the code that removes them."""
    async with asyncio.timeout(deadline_s):
        while await asyncio.to_thread(containers_of, engine, launcher_id):
            await asyncio.sleep(0.2)


QUERY_STARTED = re.compile(rb"runner: query \S+ started")


def sandboxes_that_started_a_query(engine: docker.DockerClient, launcher_id: str) -> set[str]:
    """Names of the launcher's sandboxes whose runner logged that it started a query. One list
    call (no inspect per container); a sandbox removed since the listing is skipped."""
    found = engine.api.containers(all=True, filters={"label": f"duckcell.launcher={launcher_id}"})
    started = set()
    for container in found:
        with contextlib.suppress(docker.errors.NotFound):
            if QUERY_STARTED.search(engine.api.logs(container["Id"])):
                started.add(container["Names"][0].lstrip("/"))
    return started
