#!/usr/bin/env python3
"""What per-query isolation costs, measured in one run on one machine.

Each case is measured against its baseline in the same run:

1. ``SELECT 42``: in-process DuckDB vs a warm-pool sandbox through the launcher vs a cold
   ``docker run --rm`` of the same image with the same hardening flags.
2. A 10M-row aggregation: in-process (``SET threads=1``, like the default policy's sandbox)
   vs a warm-pool sandbox.
3. Sustained per-query throughput through the launcher while the pool refills, vs the engine's
   own create+start+remove churn of the same image, flags and concurrency.

Between warm-pool repetitions the pool is left to refill and settle, untimed, so a repetition
measures checkout + query and never its own container start. Two diagnostics say where the
time goes: warm-pool reps with the pool's refill held back until the query ends (``1b*``,
``2b*``), and a sandbox start breakdown (create, start, socket, runner Ready, remove) with the
runner dialled at once, as the launcher does, and once its socket exists.

Everything the run creates carries the label ``duckcell.launcher=bench-<pid>`` and is removed
at the end, whatever happens. Progress goes to stderr, the table to stdout, JSON to
``<output>/sandbox-<UTC>.json`` and ``<output>/latest-sandbox.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import duckdb
import grpc
import pyarrow as pa
import pyarrow.ipc

# Run as a script from a checkout: the launcher package sits beside bench/, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher.backend.base import LABEL_LAUNCHER, SandboxSpec
from launcher.backend.docker_engine import RUNNER_DIR, DockerBackend, new_sandbox_name
from launcher.config import LauncherConfig, load_config
from launcher.errors import DuckcellError
from launcher.executor import collect_table
from launcher.local import LocalLauncher
from launcher.policy import Policy, PolicySet, load_policies
from launcher.pool import SandboxPool
from launcher.runner_client import RunnerClient
from launcher.sandbox import build_spec

POLICY = "default"
SELECT_42 = "SELECT 42"
AGGREGATE = "SELECT count(*), sum(i % 7), avg(i * 0.5) FROM range(10000000) t(i)"
SETTLE_TIMEOUT_S = 60.0

Progress = Callable[[str], None]
Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Plan:
    repeat: int
    cold_repeat: int
    start_repeat: int
    sustained_queries: int
    concurrencies: tuple[int, ...]
    image: str
    output: Path


@dataclass(frozen=True, slots=True)
class QueryTiming:
    """One warm-pool query, split where the time goes (seconds)."""

    total: float  # execute() to a decoded table, as collect_table does it
    checkout: float  # pool.acquire: the launcher's own QueryRecord.queued_s
    first_chunk: float  # checkout done -> first IPC chunk (call setup, parse, plan, schema)
    stream: float  # checkout done -> last IPC chunk (the whole RPC)
    runner: float  # the runner's execute_seconds, inside the sandbox, sends included
    decode: float  # Arrow IPC bytes -> pa.Table on the launcher side
    chunks: int  # IPC messages received


def summarize(samples_s: list[float]) -> Json:
    """Median and nearest-rank p95 in milliseconds, plus the raw samples."""
    ms = sorted(sample * 1000 for sample in samples_s)
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p95_ms": ms[max(0, math.ceil(0.95 * len(ms)) - 1)],
        "min_ms": ms[0],
        "max_ms": ms[-1],
        "samples_ms": [round(value, 4) for value in ms],
    }


def make_progress() -> Progress:
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


# --- baselines that need no launcher --------------------------------------------------------
class InProcess:
    """The baseline: one DuckDB connection reused across reps, fetched as Arrow."""

    def __init__(self, threads: int | None = None) -> None:
        self._con = duckdb.connect()
        if threads is not None:
            self._con.execute(f"SET threads={threads}")

    def time(self, sql: str) -> float:
        started = time.perf_counter()
        self._con.sql(sql).to_arrow_reader().read_all()
        return time.perf_counter() - started

    def close(self) -> None:
        self._con.close()


def cold_run_command(image: str, label: str) -> list[str]:
    code = "import duckdb; print(duckdb.connect().sql('SELECT 42').fetchall())"
    return [
        "docker", "run", "--rm", "--network", "none", "--read-only", "--user", "65534:65534",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/scratch",
        "--label", label, "--entrypoint", "python3", image, "-c", code,
    ]  # fmt: skip


def cold_docker_run(image: str, label: str, reps: int, progress: Progress) -> list[float]:
    command = cold_run_command(image, label)
    samples = []
    for i in range(reps + 1):  # the first run warms the page cache and is not kept
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0 or "42" not in done.stdout:
            raise RuntimeError(f"cold docker run failed ({done.returncode}): {done.stderr.strip()}")
        if i:
            samples.append(elapsed)
            progress(f"1c cold docker run: {i}/{reps} {elapsed * 1000:.0f} ms")
    return samples


# --- the launcher ---------------------------------------------------------------------------
async def settle(pool: SandboxPool) -> None:
    """Untimed: the pool refilled to its warm size, with no start or destroy in flight."""
    if pool.stats()["ready"] < pool.warm:
        await pool.wait_warm(SETTLE_TIMEOUT_S)
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        stats = pool.stats()
        if (
            stats["ready"] >= pool.warm
            and stats["starting"] == 0
            and stats["live"] == stats["ready"]
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pool {pool.policy.name} did not settle: {stats}")
        await asyncio.sleep(0.02)


async def timed_query(launcher: LocalLauncher, sql: str) -> QueryTiming:
    started = time.perf_counter()
    execution = launcher.execute(sql, policy=POLICY)
    parts: list[bytes] = []
    first = started
    async for chunk in execution.chunks():
        if not parts:
            first = time.perf_counter()
        parts.append(chunk)
    received = time.perf_counter()
    pa.ipc.open_stream(b"".join(parts)).read_all()
    decoded = time.perf_counter()
    record = execution.record
    return QueryTiming(
        total=decoded - started,
        checkout=record.queued_s,
        first_chunk=first - started - record.queued_s,
        stream=received - started - record.queued_s,
        runner=record.summary.execute_seconds if record.summary else math.nan,
        decode=decoded - received,
        chunks=len(parts),
    )


@dataclass(slots=True)
class PairedSamples:
    in_process: list[float] = field(default_factory=list)
    warm_pool: list[QueryTiming] = field(default_factory=list)
    refill_held: list[QueryTiming] = field(default_factory=list)


async def paired_case(
    launcher: LocalLauncher,
    pool: SandboxPool,
    local: InProcess,
    sql: str,
    reps: int,
    name: str,
    progress: Progress,
) -> PairedSamples:
    """In-process and warm-pool reps interleaved, so both see the same background load.

    Before each warm-pool rep the pool is refilled and settled (untimed), so a rep measures
    checkout + query, never its own container start. The pool starts the replacement sandbox
    at checkout, though, so that start runs beside the query. A third, diagnostic rep holds
    the refill back until the query is over, to show what that overlap costs.
    """
    await settle(pool)
    local.time(sql)
    await timed_query(launcher, sql)  # warm-ups: first RPC of this process, lazy imports
    samples = PairedSamples()
    for i in range(reps):
        await settle(pool)
        samples.in_process.append(local.time(sql))
        samples.warm_pool.append(await timed_query(launcher, sql))
        await settle(pool)
        with refill_held(pool):
            samples.refill_held.append(await timed_query(launcher, sql))
        if (i + 1) % 10 == 0 or i + 1 == reps:
            progress(f"{name}: {i + 1}/{reps}")
    return samples


@contextlib.contextmanager
def refill_held(pool: SandboxPool) -> Iterator[None]:
    """Diagnostic only: with ``warm`` at 0 the filler starts nothing until it is restored."""
    warm, pool.warm = pool.warm, 0
    try:
        yield
    finally:
        pool.warm = warm


def breakdown(timings: list[QueryTiming]) -> Json:
    parts = ("total", "checkout", "first_chunk", "stream", "runner", "decode")
    result: Json = {
        f"{part}_median_ms": statistics.median(getattr(t, part) for t in timings) * 1000
        for part in parts
    }
    return result | {"chunks_median": statistics.median(t.chunks for t in timings)}


async def sustained(
    config: LauncherConfig, policies: PolicySet, n: int, concurrency: int, progress: Progress
) -> Json:
    """``n`` SELECT 42 queries, ``concurrency`` at a time, as fast as they complete."""
    async with LocalLauncher(
        config, policies=policies, warm_override=concurrency, progress=progress
    ) as launcher:
        pool = await launcher.warm(POLICY)
        await settle(pool)
        latencies: list[float] = []
        queued: list[float] = []
        tickets = iter(range(n))  # shared: each worker takes the next query number

        async def worker() -> None:
            for _ in tickets:
                started = time.perf_counter()
                execution = launcher.execute(SELECT_42, policy=POLICY)
                await collect_table(execution)
                latencies.append(time.perf_counter() - started)
                queued.append(execution.record.queued_s)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "queries": n,
        "concurrency": concurrency,
        "warm": concurrency,
        "capacity": config.max_sandboxes,
        "elapsed_s": elapsed,
        "queries_per_s": n / elapsed,
        "latency": summarize(latencies),
        "queued": summarize(queued),
    }


# --- sandbox starts and the engine alone ----------------------------------------------------
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
        cache_dir=None,
    )


def churn_one(api: docker.APIClient, spec: SandboxSpec, socket_dir: Path) -> float:
    """create + start + remove(force) with the flags of launcher/backend/docker_engine.py."""
    socket_dir.mkdir(mode=0o777)
    os.chmod(socket_dir, 0o777)
    host_config = api.create_host_config(
        binds={str(socket_dir): {"bind": RUNNER_DIR, "mode": "rw"}},
        network_mode="none",
        read_only=True,
        tmpfs={
            "/scratch": f"rw,nosuid,nodev,noexec,size={spec.scratch_bytes},mode=1777",
            "/tmp": f"rw,nosuid,nodev,noexec,size={spec.tmp_bytes},mode=1777",
        },
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        pids_limit=spec.pids,
        mem_limit=spec.memory_bytes,
        memswap_limit=spec.memory_bytes,
        nano_cpus=int(spec.cpus * 1e9),
        ulimits=[docker.types.Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile)],
        runtime=spec.runtime,
        ipc_mode="private",
    )
    started = time.perf_counter()
    container = api.create_container(
        image=spec.image,
        name=spec.name,
        user=spec.user,
        environment=dict(spec.environment),
        labels=dict(spec.labels),
        host_config=host_config,
        network_disabled=True,
        detach=True,
    )
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


# --- the run --------------------------------------------------------------------------------
async def run(plan: Plan, launcher_id: str, progress: Progress) -> Json:
    state_dir = Path(tempfile.mkdtemp(prefix="dcb"))
    flags = {"state_dir": state_dir, "image": plan.image, "launcher_id": launcher_id}
    config = load_config(flags=flags | {"max_sandboxes": 8})
    policies = load_policies(config.policies_dir)
    policy = policies.get(POLICY)
    api = docker.from_env(timeout=int(config.engine_timeout_s)).api
    try:
        result: Json = {
            "schema": 1,
            "machine": machine_info(api, plan.image, policy),
            "plan": asdict(plan) | {"output": str(plan.output), "launcher_id": launcher_id},
            "queries": {"select42": SELECT_42, "aggregate": AGGREGATE},
        }
        result.update(await measure(plan, config, policies, api, progress))
        result["machine"]["loadavg_at_end"] = os.getloadavg()
        result["targets"] = targets(result["cases"], result["sustained"])
        return result
    finally:
        api.close()
        shutil.rmtree(state_dir, ignore_errors=True)


async def measure(
    plan: Plan,
    config: LauncherConfig,
    policies: PolicySet,
    api: docker.APIClient,
    progress: Progress,
) -> Json:
    policy = policies.get(POLICY)
    threads = policy.duckdb.threads
    cases: Json = {}
    progress(f"1c cold docker run x{plan.cold_repeat} (+1 untimed)")
    label = f"{LABEL_LAUNCHER}={config.launcher_id}"
    cold = cold_docker_run(plan.image, label, plan.cold_repeat, progress)
    cases["select42_cold_docker_run"] = summarize(cold)

    pairs = (
        ("select42", SELECT_42, None, "1a/1b SELECT 42"),
        ("aggregate", AGGREGATE, threads, f"2a/2b 10M-row aggregate (threads={threads})"),
    )
    async with LocalLauncher(config, policies=policies, warm_override=2, progress=progress) as lau:
        pool = await lau.warm(POLICY)
        for key, sql, local_threads, name in pairs:
            progress(f"{name}: in-process and warm-pool interleaved x{plan.repeat}")
            local = InProcess(local_threads)
            try:
                samples = await paired_case(lau, pool, local, sql, plan.repeat, name, progress)
            finally:
                local.close()
            cases[f"{key}_in_process"] = summarize(samples.in_process)
            for variant, timings in (
                ("warm_pool", samples.warm_pool),
                ("warm_pool_refill_held", samples.refill_held),
            ):
                cases[f"{key}_{variant}"] = summarize([t.total for t in timings])
                cases[f"{key}_{variant}"]["breakdown"] = breakdown(timings)

    progress(f"sandbox start breakdown x{plan.start_repeat} (2 sandboxes each)")
    starts = await sandbox_starts(
        config, policy, plan.start_repeat, config.state_dir / "probe", progress
    )
    throughput = []
    for concurrency in plan.concurrencies:
        throughput.append(await throughput_pair(plan, config, policies, api, concurrency, progress))
    return {"cases": cases, "sandbox_start": starts, "sustained": throughput}


async def throughput_pair(
    plan: Plan,
    config: LauncherConfig,
    policies: PolicySet,
    api: docker.APIClient,
    concurrency: int,
    progress: Progress,
) -> Json:
    n = plan.sustained_queries
    progress(f"3 sustained: {n} x SELECT 42 through the launcher, concurrency {concurrency}")
    launcher_run = await sustained(config, policies, n, concurrency, progress)
    progress(f"3 engine churn: {n} x create+start+remove, concurrency {concurrency}")
    socket_root = config.state_dir / "churn"
    socket_root.mkdir(exist_ok=True, mode=0o700)
    policy = policies.get(POLICY)
    stop = threading.Event()
    try:
        churn = await asyncio.to_thread(
            engine_churn, api, config, policy, n, concurrency, socket_root, stop
        )
    finally:
        stop.set()  # if this task is cancelled, the churn threads must not go on
    qps, cps = launcher_run["queries_per_s"], churn["containers_per_s"]
    progress(f"3 concurrency {concurrency}: {qps:.2f} queries/s vs {cps:.2f} containers/s")
    return {"launcher": launcher_run, "engine_churn": churn, "ratio": qps / cps}


def target(name: str, value: float, op: str, limit: float, unit: str = "x") -> Json:
    met = value <= limit if op == "<=" else value >= limit
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "target": f"{op} {limit:g}{unit}",
        "met": met,
    }


def targets(cases: Json, throughput: list[Json]) -> list[Json]:
    p50 = {key: float(row["median_ms"]) for key, row in cases.items()}
    warm = p50["select42_warm_pool"]
    added = warm - p50["select42_in_process"]
    rows = [
        target("SELECT 42: warm-pool p50 added over in-process", added, "<=", 10, " ms"),
        target(
            "SELECT 42: cold docker run p50 / warm-pool p50",
            p50["select42_cold_docker_run"] / warm,
            ">=",
            50,
        ),
        target(
            "aggregate: warm-pool p50 / in-process p50",
            p50["aggregate_warm_pool"] / p50["aggregate_in_process"],
            "<=",
            1.2,
        ),
    ]
    for row in throughput:
        concurrency = row["launcher"]["concurrency"]
        name = f"sustained, concurrency {concurrency}: launcher q/s / engine churn c/s"
        rows.append(target(name, row["ratio"], ">=", 0.9))
    return rows


# --- reporting ------------------------------------------------------------------------------
_CASES = (
    ("1a", "select42_in_process", "SELECT 42, in-process DuckDB"),
    ("1b", "select42_warm_pool", "SELECT 42, warm-pool sandbox"),
    ("1b*", "select42_warm_pool_refill_held", "SELECT 42, warm pool, refill held (diag.)"),
    ("1c", "select42_cold_docker_run", "SELECT 42, cold docker run --rm"),
    ("2a", "aggregate_in_process", "10M-row aggregate, in-process, threads=1"),
    ("2b", "aggregate_warm_pool", "10M-row aggregate, warm-pool sandbox"),
    ("2b*", "aggregate_warm_pool_refill_held", "aggregate, warm pool, refill held (diag.)"),
)
_PARTS = ("total", "checkout", "first_chunk", "stream", "runner", "decode")


def render(result: Json) -> str:
    machine, cases, pol = result["machine"], result["cases"], result["machine"]["policy"]
    threads = pol["duckdb_threads"]
    lines = [
        f"duckcell sandbox benchmark, {machine['date_utc']}, nproc {machine['nproc']}, "
        f"docker {machine['docker_server']}, runtime {machine['runtime']}, {machine['image']}",
        f"policy {pol['name']}: {pol['cpus']:g} CPU, DuckDB threads {threads}; the in-process "
        f"aggregate runs with SET threads={threads} to match",
        f"load average (1 min) {machine['loadavg_at_start'][0]:.2f} at start, "
        f"{machine['loadavg_at_end'][0]:.2f} at end; in-process and warm-pool reps are "
        "interleaved, so both see the same background load",
        "",
        f"{'case':<48}{'n':>4}{'median ms':>11}{'p95 ms':>10}{'vs 1a/2a':>10}",
    ]
    for tag, key, title in _CASES:
        row = cases[key]
        base = cases["aggregate_in_process" if tag[0] == "2" else "select42_in_process"]
        ratio = row["median_ms"] / base["median_ms"]
        lines.append(
            f"{tag:<4}{title:<44}{row['n']:>4}{row['median_ms']:>11.2f}{row['p95_ms']:>10.2f}"
            f"{ratio:>9.1f}x"
        )
    lines += ["", "warm-pool query, where the time goes (medians, ms)"]
    lines.append(f"{'':<22}" + "".join(f"{part:>12}" for part in _PARTS) + f"{'chunks':>8}")
    for tag, key, title in _CASES:
        if "breakdown" in cases[key]:
            parts = cases[key]["breakdown"]
            values = "".join(f"{parts[part + '_median_ms']:>12.2f}" for part in _PARTS)
            lines.append(f"{tag:<4}{title.split(',')[0]:<18}{values}{parts['chunks_median']:>8g}")
    lines.append(
        "1b*/2b*: diagnostic, the pool's refill held back until the query ends (the pool starts "
        "the replacement sandbox at checkout, beside the query)"
    )
    lines += ["", *render_throughput(result), "", "targets"]
    for row in result["targets"]:
        value = f"{row['value']:.2f}{row['unit']}"
        verdict = "met" if row["met"] else "MISSED"
        lines.append(f"  {row['name']:<62}{value:>9}  target {row['target']:<9} {verdict}")
    return "\n".join(lines)


def render_throughput(result: Json) -> list[str]:
    starts = result["sandbox_start"]
    phases = ("create", "start", "socket", "ready", "runner_startup", "remove")
    n = starts["dial_at_once"]["create"]["n"]
    lines = [
        f"sandbox start, n={n} each (medians, ms; socket and ready count from start's return)",
        f"{'':<36}"
        + "".join(f"{phase:>9}" for phase in phases[:-2])
        + f"{'runner':>9}{'remove':>9}",
    ]
    for mode, title in (
        ("dial_at_once", "dial at once (as the factory)"),
        ("dial_after_socket", "dial once runner.sock exists"),
    ):
        values = "".join(f"{starts[mode][phase]['median_ms']:>9.0f}" for phase in phases)
        lines.append(f"  {title:<34}{values}")
    lines += [
        "",
        f"{'sustained SELECT 42':<20}{'conc':>5}{'queries':>8}{'launcher q/s':>14}"
        f"{'engine c/s':>12}{'ratio':>7}{'query p50 ms':>14}{'queued p50 ms':>15}",
    ]
    for row in result["sustained"]:
        run_, churn = row["launcher"], row["engine_churn"]
        lines.append(
            f"{'':<20}{run_['concurrency']:>5}{run_['queries']:>8}{run_['queries_per_s']:>14.2f}"
            f"{churn['containers_per_s']:>12.2f}{row['ratio']:>7.2f}"
            f"{run_['latency']['median_ms']:>14.0f}{run_['queued']['median_ms']:>15.0f}"
        )
    lines.append(
        "engine c/s: create + start + remove(force) with the sandbox's flags via the docker SDK; "
        "it never waits for the runner"
    )
    return lines


def write_results(result: Json, output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    path = output / f"sandbox-{stamp}.json"
    path.write_text(text)
    (output / "latest-sandbox.json").write_text(text)
    return path


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text}")
    return value


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="Benchmark per-query sandboxes against in-process DuckDB and docker run."
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        help="repetitions per latency case (default 30, 5 with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--image", default="duckcell-sandbox:latest", help="sandbox image tag")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the JSON results (default bench/results)",
    )
    args = parser.parse_args(argv)
    repeat = args.repeat or (5 if args.quick else 30)
    return Plan(
        repeat=repeat,
        cold_repeat=min(3 if args.quick else 10, repeat),
        start_repeat=2 if args.quick else 5,
        sustained_queries=10 if args.quick else 40,
        concurrencies=(2,) if args.quick else (2, 4),
        image=args.image,
        output=args.output,
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that SIGTERM (a killed `make bench`) also cleans up


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    progress = make_progress()
    launcher_id = f"bench-{os.getpid()}"
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = asyncio.run(run(plan, launcher_id, progress))
    except (DuckcellError, RuntimeError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; no results written", file=sys.stderr)
        return 130
    finally:
        leftovers = remove_leftovers(launcher_id)
        if leftovers:
            progress(f"removed {len(leftovers)} leftover container(s): {', '.join(leftovers)}")
    print(render(result))
    path = write_results(result, plan.output)
    progress(f"wrote {path} and {path.with_name('latest-sandbox.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
