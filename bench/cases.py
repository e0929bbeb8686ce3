"""The latency and throughput cases: in-process DuckDB and a cold ``docker run`` as the
baselines, and queries through the launcher's warm pool.

Between warm-pool repetitions the pool is left to refill and settle, untimed, so a repetition
measures checkout + query and never its own container start.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.ipc

from bench.stats import Json, Progress, summarize
from launcher.config import LauncherConfig
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.model.policy import PolicySet
from launcher.sandbox.backend.docker_engine import DockerBackend
from launcher.sandbox.pool import SandboxPool

POLICY = "default"
SELECT_42 = "SELECT 42"
AGGREGATE = "SELECT count(*), sum(i % 7), avg(i * 0.5) FROM range(10000000) t(i)"
SETTLE_TIMEOUT_S = 60.0


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
    parts: list[bytes] = []
    first = started
    async with launcher.run_query(sql, policy=POLICY) as execution:
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
        config,
        DockerBackend.for_config(config),
        policies=policies,
        warm_override=concurrency,
        progress=progress,
    ) as launcher:
        pool = await launcher.warm(POLICY)
        await settle(pool)
        latencies: list[float] = []
        queued: list[float] = []
        tickets = iter(range(n))  # shared: each worker takes the next query number

        async def worker() -> None:
            for _ in tickets:
                started = time.perf_counter()
                async with launcher.run_query(SELECT_42, policy=POLICY) as execution:
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
