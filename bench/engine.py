"""Sandbox starts and the engine alone: where a sandbox start goes, phase by phase, and the
engine's own create+start+remove churn with the sandbox's flags; plus what the run records about
the machine, and the last sweep for leftover containers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import docker
import docker.errors
import duckdb
import grpc
import pyarrow as pa

from bench.stats import Json, Progress, summarize
from launcher.config import LauncherConfig
from launcher.model.policy import Policy
from launcher.sandbox.backend.base import LABEL_LAUNCHER, LABEL_POLICY, SandboxSpec
from launcher.sandbox.backend.docker_engine import DockerBackend, container_config
from launcher.sandbox.runner_client import RunnerClient
from launcher.sandbox.spec import build_spec, new_sandbox_name


async def sandbox_starts(
    config: LauncherConfig, policy: Policy, reps: int, run_dir: Path, progress: Progress
) -> Json:
    """Where a sandbox start goes, through the launcher's own backend and runner client.

    Each rep starts two sandboxes: one dialled at once after ``start``, as the factory does,
    and one dialled only once the runner's socket file exists, to show what dialling costs.
    """
    backend = DockerBackend(run_dir, timeout_s=config.engine_timeout_s)
    sandbox_duckdb = ""
    modes = {"dial_at_once": False, "dial_after_socket": True}
    rows: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    try:
        for i in range(reps):
            for mode, after_socket in modes.items():
                spec = sandbox_spec(config, policy)
                phases, sandbox_duckdb = await start_one(backend, spec, config, after_socket)
                rows[mode].append(phases)
            ready = "  ".join(f"{m} {rows[m][-1]['ready'] * 1000:.0f} ms" for m in modes)
            progress(f"sandbox start breakdown {i + 1}/{reps}: start -> ready {ready}")
    finally:
        backend.close()
    result: Json = {
        mode: {phase: summarize([row[phase] for row in samples]) for phase in samples[0]}
        for mode, samples in rows.items()
    }
    return result | {"sandbox_duckdb": sandbox_duckdb}


async def start_one(
    backend: DockerBackend, spec: SandboxSpec, config: LauncherConfig, after_socket: bool
) -> tuple[dict[str, float], str]:
    t0 = time.perf_counter()
    handle = await backend.create(spec)
    t1 = time.perf_counter()
    watcher = asyncio.create_task(path_appears(Path(handle.runner_target.removeprefix("unix://"))))
    client: RunnerClient | None = None
    try:
        await backend.start(handle)
        t2 = time.perf_counter()
        if after_socket:
            await asyncio.wait_for(asyncio.shield(watcher), config.start_timeout_s)
        client = RunnerClient(handle.runner_target)
        info = await client.wait_ready(config.start_timeout_s)
        t3 = time.perf_counter()
        socket_seen = await asyncio.wait_for(watcher, 1.0)
    finally:
        watcher.cancel()
        if client is not None:
            await client.close()
        t4 = time.perf_counter()
        await backend.remove(handle)
        t5 = time.perf_counter()
    phases = {
        "create": t1 - t0,
        "start": t2 - t1,
        "socket": socket_seen - t2,  # start returned -> runner.sock exists
        "ready": t3 - t2,  # start returned -> the runner answered Ready
        "runner_startup": info.startup_seconds,  # the runner's own, from its main()
        "remove": t5 - t4,
    }
    return phases, info.duckdb_version


async def path_appears(path: Path) -> float:
    """When ``path`` first exists (polled every 2 ms; the caller bounds the wait)."""
    while not path.exists():
        await asyncio.sleep(0.002)
    return time.perf_counter()


def sandbox_spec(config: LauncherConfig, policy: Policy) -> SandboxSpec:
    return build_spec(
        policy,
        name=new_sandbox_name(),
        slot=uuid.uuid4().hex[:16],
        image=config.image,
        launcher_id=config.launcher_id,
        instance_id="bench-probe",
        files_dir=None,
    )


def churn_one(api: docker.APIClient, spec: SandboxSpec, socket_dir: Path) -> float:
    """create + start + remove(force) with the launcher's own container config."""
    socket_dir.mkdir(mode=0o777)
    os.chmod(socket_dir, 0o777)
    started = time.perf_counter()
    container = api.create_container(**container_config(api, spec, socket_dir))
    try:
        api.start(container["Id"])
    finally:
        api.remove_container(container["Id"], force=True, v=True)
        shutil.rmtree(socket_dir, ignore_errors=True)
    return time.perf_counter() - started


def engine_churn(
    api: docker.APIClient,
    config: LauncherConfig,
    policy: Policy,
    n: int,
    concurrency: int,
    socket_root: Path,
    stop: threading.Event,
) -> Json:
    """The engine's own container churn: ``n`` create+start+remove, ``concurrency`` at a time.

    ``stop`` ends it early: each thread finishes (and removes) its current container first.
    """
    tickets = iter(range(n))
    lock = threading.Lock()
    cycles: list[float] = []

    def worker() -> None:
        while True:
            with lock:
                if stop.is_set() or next(tickets, None) is None:
                    return
            spec = sandbox_spec(config, policy)
            cycles.append(churn_one(api, spec, socket_root / spec.name.rsplit("-", 1)[-1]))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency, thread_name_prefix="churn") as threads:
        for future in [threads.submit(worker) for _ in range(concurrency)]:
            future.result()
    elapsed = time.perf_counter() - started
    return {
        "containers": n,
        "concurrency": concurrency,
        "elapsed_s": elapsed,
        "containers_per_s": n / elapsed,
        "cycle": summarize(cycles),
    }


def remove_leftovers(launcher_id: str) -> list[str]:
    """The last sweep, after the event loop and every thread are done: nothing may remain."""
    api = docker.from_env().api
    try:
        found = api.containers(all=True, filters={"label": f"{LABEL_LAUNCHER}={launcher_id}"})
        for item in found:
            with contextlib.suppress(docker.errors.APIError):
                api.remove_container(item["Id"], force=True, v=True)
    finally:
        api.close()
    return [str(item.get("Names", ["?"])[0]).lstrip("/") for item in found]


def containers_by_policy(api: docker.APIClient, launcher_id: str) -> dict[str, int]:
    """How many containers with the launcher's label exist now (any state), per policy label."""
    found = api.containers(all=True, filters={"label": f"{LABEL_LAUNCHER}={launcher_id}"})
    counts: dict[str, int] = {}
    for item in found:
        policy = (item.get("Labels") or {}).get(LABEL_POLICY, "")
        counts[policy] = counts.get(policy, 0) + 1
    return counts


class ContainerPeak:
    """The most containers of one launcher that existed at once, sampled on a thread every
    ``interval_s`` while the block runs (a container that lives between two samples is missed:
    a lower bound)."""

    def __init__(self, launcher_id: str, interval_s: float = 0.5) -> None:
        self._launcher_id = launcher_id
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="container-peak", daemon=True)
        self.peak = 0
        self.samples = 0

    def __enter__(self) -> ContainerPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        api = docker.from_env().api
        try:
            while not self._stop.is_set():
                with contextlib.suppress(docker.errors.APIError):
                    counts = containers_by_policy(api, self._launcher_id)
                    self.peak = max(self.peak, sum(counts.values()))
                    self.samples += 1
                self._stop.wait(self._interval_s)
        finally:
            api.close()


def machine_info(api: docker.APIClient, image: str, policy: Policy) -> Json:
    version, info = api.version(), api.info()
    return {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": os.getloadavg(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "grpcio": grpc.__version__,
        "docker_sdk": docker.__version__,
        "docker_server": version.get("Version"),
        "docker_api": version.get("ApiVersion"),
        "engine_default_runtime": info.get("DefaultRuntime"),
        "runtime": policy.runtime.value,
        "cgroup_version": info.get("CgroupVersion"),
        "storage_driver": info.get("Driver"),
        "kernel": info.get("KernelVersion"),
        "image": image,
        "image_id": api.inspect_image(image)["Id"],
        "policy": {
            "name": policy.name,
            "cpus": policy.limits.cpus,
            "memory_bytes": policy.limits.memory_bytes,
            "duckdb_threads": policy.duckdb.threads,
        },
    }
