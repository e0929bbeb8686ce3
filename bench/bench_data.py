#!/usr/bin/env python3
"""What the data path costs: TPC-H SF1 Parquet in S3, read through the cache by sandboxes.

The issue's target: once the files are cached, is an isolated query within 1.15x of in-process
DuckDB on the same files? And what does the first (cold) query pay? TPC-H lineitem, orders,
customer and nation are generated with ``tpchgen-cli`` once into ``--data-dir`` and reused,
uploaded to a real S3 API server (moto, its own process) on loopback, and a ``LocalLauncher``
with a catalog over that bucket runs ``scan`` (TPC-H Q1) and ``join`` (TPC-H Q10), one fresh
sandbox per query, as a worker does:

- cold: cache emptied (untimed); timed: list the objects, download them, query, decode.
- warm: every object cached: list, lease (hits), query, decode. The catalog's default
  ``listing_ttl`` (0: every query lists every table, so it sees every object written before it),
  prepared early as a worker prepares it: the tables are bound to their last listings and the
  fresh LISTs run beside the sandbox, which holds its result until they agree.
- warm, listing reused: the same over a catalog whose connection sets ``listing_ttl``
  (``--listing-ttl``, default 60s): a query lists a table only when its last listing is older,
  so it may miss objects others wrote meanwhile (``launcher.data.listings``). Reported beside
  the default, never instead of it.
- in-process: DuckDB here with the policy's threads and memory limit, over the very cache
  files the sandbox reads, views made as the runner makes them, one connection reused; two
  diagnostics pay what a sandbox pays per query (a new connection; a new process).

Warm and in-process reps are interleaved so all see the same background load; before each
sandbox rep the pool is refilled and settled (untimed), so no container start runs beside a
timed query. Every result is checked against the in-process one. The policy is the bench's own
(``bench-data``: 2 CPUs, DuckDB 2 threads, 1 GiB buffer pool): the shipped ``default`` (1 CPU,
1 GiB, DuckDB 512 MiB) runs both queries at SF1 too, but a data-heavy deployment gives
sandboxes the machine.

Containers carry ``duckcell.launcher=bench-data-<pid>`` and are removed at the end. Progress on
stderr, the table on stdout, JSON in ``<output>/data-<UTC>.json`` and ``latest-data.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import boto3
import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import settle
from bench.entry import add_image_and_output, run_benchmark
from bench.report import render_data, target
from bench.stats import Json, Progress, process_cpu_seconds, summarize
from launcher.config import LauncherConfig, load_config
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.model.catalog import parse_catalog
from launcher.model.mounts import SANDBOX_CACHE
from launcher.model.policy import Policy, PolicySet, load_policies
from launcher.model.sql import ParserPool
from launcher.sandbox.backend.docker_engine import DockerBackend

TABLES = ("lineitem", "orders", "customer", "nation")
BUCKET = "tpch"
POLICY = "bench-data"
TARGET_WARM_RATIO = 1.15
QUERIES = {
    "scan": """
SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty,
       sum(l_extendedprice) AS sum_base_price,
       sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price,
       sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge,
       avg(l_quantity) AS avg_qty, avg(l_extendedprice) AS avg_price,
       avg(l_discount) AS avg_disc, count(*) AS count_order
FROM lineitem WHERE l_shipdate <= DATE '1998-12-01' - INTERVAL 90 DAY
GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus""",
    "join": """
SELECT c_custkey, c_name, sum(l_extendedprice * (1 - l_discount)) AS revenue, c_acctbal,
       n_name, c_address, c_phone, c_comment
FROM customer, orders, lineitem, nation
WHERE c_custkey = o_custkey AND l_orderkey = o_orderkey AND o_orderdate >= DATE '1993-10-01'
  AND o_orderdate < DATE '1993-10-01' + INTERVAL 3 MONTH AND l_returnflag = 'R'
  AND c_nationkey = n_nationkey
GROUP BY c_custkey, c_name, c_acctbal, c_phone, n_name, c_address, c_comment
ORDER BY revenue DESC, c_custkey LIMIT 20""",
}
# SF1 needs far less than this (Q1 aggregates into 4 groups, Q10's build side is ~60k
# orders), but a buffer pool of 1 GiB keeps spilling out of the measurement entirely.
BENCH_POLICY = f"""\
name: {POLICY}
description: The data benchmark's policy; the whole 2-core machine for one query.
isolation: query
runtime: runc
limits: {{cpus: 2, memory: 2GiB, pids: 128, scratch: 512MiB, statement_timeout: 120s}}
duckdb: {{threads: 2, memory_limit: 1GiB, max_temp_directory_size: 512MiB}}
access: {{catalogs: ["*"], connections: ["*"]}}
pool: {{warm: 1}}
"""
# Throwaway credentials for the loopback S3 server; they reach the S3 client only.
S3_ENV = {"BENCH_S3_KEY": "bench", "BENCH_S3_SECRET": "bench-secret"}


@dataclass(frozen=True, slots=True)
class Plan:
    scale: int
    cold_repeat: int
    warm_repeat: int
    data_dir: Path
    image: str
    output: Path
    listing_ttl: str


# --- data -----------------------------------------------------------------------------------
def tpch_files(plan: Plan, progress: Progress) -> Path:
    """The generated tables under ``data_dir/tpch-sf<N>``, generating them on first use."""
    target_dir = plan.data_dir / f"tpch-sf{plan.scale}"
    if (target_dir / ".complete").exists():
        progress(f"reusing TPC-H SF{plan.scale} Parquet in {target_dir}")
        return target_dir
    if shutil.which("tpchgen-cli") is None:
        raise RuntimeError("tpchgen-cli is not installed; run `pip install tpchgen-cli`")
    plan.data_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tpch-", dir=plan.data_dir))
    progress(f"generating TPC-H SF{plan.scale} Parquet with tpchgen-cli into {target_dir}")
    command = ["tpchgen-cli", "parquet", "-s", str(plan.scale), f"--tables={','.join(TABLES)}"]
    command += ["--parts=4", f"--output-dir={staging}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"tpchgen-cli failed ({done.returncode}): {done.stderr.strip()}")
    (staging / ".complete").touch()
    shutil.rmtree(target_dir, ignore_errors=True)  # an interrupted earlier run's leftovers
    staging.rename(target_dir)
    return target_dir


@dataclass(frozen=True, slots=True)
class S3Server:
    """The loopback S3 server's endpoint, the bytes it holds, and its process id."""

    endpoint: str
    data_bytes: int
    pid: int

    def cpu_seconds(self) -> float:
        """CPU the server process has used so far (user + system, from /proc)."""
        return process_cpu_seconds(self.pid)


@contextlib.contextmanager
def s3_server(files: Path, progress: Progress) -> Iterator[S3Server]:
    """A moto S3 server on loopback holding the tables.

    It runs as a process of its own, as an object store does: in this process its request
    handling would take the launcher's GIL, slowing the launcher as no real store would. It
    still shares this host's two cores with the sandbox, as a remote store would not: the CPU
    it spends during each sandbox rep is measured and reported beside the rep (``s3_cpu``).
    """
    with socket.socket() as probe:  # a free port (moto's CLI cannot report one it picked)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with tempfile.TemporaryFile() as log:  # its request log; shown only if it fails to start
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            endpoint = f"http://127.0.0.1:{port}"
            wait_listening(port, server, log)
            yield S3Server(endpoint, upload(endpoint, files, progress), server.pid)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def upload(endpoint: str, files: Path, progress: Progress) -> int:
    """Create the bucket and upload the tables; the bytes uploaded."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_ENV["BENCH_S3_KEY"],
        aws_secret_access_key=S3_ENV["BENCH_S3_SECRET"],
    )
    client.create_bucket(Bucket=BUCKET)
    total = 0
    for path in sorted(files.glob("*/*.parquet")):
        client.upload_file(str(path), BUCKET, f"{path.parent.name}/{path.name}")
        total += path.stat().st_size
    progress(f"uploaded {total / 1e6:.0f} MB to the S3 server at {endpoint}")
    return total


def wait_listening(
    port: int, server: subprocess.Popen[bytes], log: IO[bytes], timeout_s: float = 30
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip()[-800:]
            raise RuntimeError(f"the moto S3 server exited ({server.returncode}): {tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto did not listen in {timeout_s:g} s") from None
            time.sleep(0.05)


def catalog_text(endpoint: str, listing_ttl: str = "0s") -> str:
    """The bench's catalog; ``listing_ttl`` is the connection's (0s: the catalog default)."""
    tables = "\n".join(
        f"  {name}: {{connection: tpch, path: 's3://{BUCKET}/{name}/', format: parquet}}"
        for name in TABLES
    )
    return f"""\
connections:
  tpch: {{kind: s3, endpoint: "{endpoint}", region: us-east-1, path_style: true,
         access_key_id: {{env: BENCH_S3_KEY}}, secret_access_key: {{env: BENCH_S3_SECRET}},
         listing_ttl: "{listing_ttl}"}}
tables:
{tables}
"""


# --- the two sides --------------------------------------------------------------------------
class InProcess:
    """DuckDB in this process with the policy's threads and memory limit, over host files.

    ``run`` reuses one connection (the baseline the target is set against); the diagnostics
    pay what a sandbox pays per query: ``run_fresh`` a new connection and views, and
    ``run_new_process`` also a new process (its first real query: thread pool, allocator).
    """

    def __init__(self, policy: Policy, cache_root: Path, bindings: dict[str, list[str]]) -> None:
        self._settings = (
            f"SET threads={policy.duckdb.threads}; "
            f"SET memory_limit='{policy.duckdb.memory_limit_bytes}B';"
        )
        self._views = "".join(  # as the runner makes them, over the cache's host paths
            f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet(["
            + ", ".join(f"'{cache_root}/{p.removeprefix(SANDBOX_CACHE + '/')}'" for p in paths)
            + "]);"
            for name, paths in bindings.items()
        )
        self._con = duckdb.connect()
        self._con.execute(self._settings + self._views)

    def run(self, sql: str) -> tuple[float, list[tuple[object, ...]]]:
        started = time.perf_counter()
        table = self._con.sql(sql).to_arrow_reader().read_all()
        return time.perf_counter() - started, [tuple(r.values()) for r in table.to_pylist()]

    def run_fresh(self, sql: str) -> float:
        started = time.perf_counter()
        with duckdb.connect() as con:
            con.execute(self._settings + self._views)
            con.sql(sql).to_arrow_reader().read_all()
        return time.perf_counter() - started

    def run_new_process(self, sql: str) -> float:
        """Timed in the child, after its imports and a first ``SELECT 42`` (the runner's
        warm-up does as much before the sandbox is Ready)."""
        argv = [sys.executable, "-c", _CHILD, self._settings, self._views, sql]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"in-process child failed: {done.stderr.strip()[-500:]}")
        return float(done.stdout)

    def close(self) -> None:
        self._con.close()


# pyarrow is imported before the clock starts: DuckDB imports it lazily on the first
# Arrow fetch, which is not a cost a sandbox's query pays (the runner imports it at start).
_CHILD = """
import sys, time, duckdb, pyarrow
settings, views, sql = sys.argv[1:4]
con = duckdb.connect()
con.execute(settings)
con.sql("SELECT 42").fetchall()
started = time.perf_counter()
con.execute(views)
con.sql(sql).to_arrow_reader().read_all()
print(time.perf_counter() - started)
"""


@dataclass(frozen=True, slots=True)
class SandboxRun:
    """One sandbox query, timed whole and split where the time goes (seconds)."""

    total: float  # prepare + execute + decode, what a `duckcell query --catalog` user waits
    prepare: float  # list the tables' objects, lease them (download on a miss)
    checkout: float  # a ready sandbox from the pool
    runner: float  # the runner's own execute time inside the sandbox, sends included
    s3_cpu: float  # CPU the loopback S3 server spent meanwhile (its LISTs and GETs)
    rows: list[tuple[object, ...]]


async def in_sandbox(
    launcher: LocalLauncher, data: DataPath, policy: Policy, sql: str, server: S3Server
) -> SandboxRun:
    """List, lease (downloading what is missing), run in a fresh sandbox, decode: timed."""
    server_cpu = server.cpu_seconds()
    started = time.perf_counter()
    files = await data.prepare(sql, policy, early=True)  # as a worker does
    prepared = time.perf_counter()
    async with launcher.executor.run_query(sql, policy=policy, tables=files) as execution:
        table = await collect_table(execution)
    total = time.perf_counter() - started
    record = execution.record
    runner = record.summary.execute_seconds if record.summary else math.nan
    s3_cpu = server.cpu_seconds() - server_cpu
    rows = [tuple(r.values()) for r in table.to_pylist()]
    return SandboxRun(total, prepared - started, record.queued_s, runner, s3_cpu, rows)


def split(runs: list[SandboxRun]) -> Json:
    """Medians of the parts of sandbox runs, and the S3 server's mean CPU per run (its
    clock ticks are 10 ms: a median would round to them), in milliseconds."""
    parts = ("prepare", "checkout", "runner")
    medians = {
        f"{p}_median_ms": statistics.median(getattr(r, p) for r in runs) * 1e3 for p in parts
    }
    return medians | {"s3_cpu_mean_ms": statistics.fmean(r.s3_cpu for r in runs) * 1e3}


# --- the run --------------------------------------------------------------------------------
async def measure_query(
    name: str,
    plan: Plan,
    launcher: LocalLauncher,
    paths: tuple[DataPath, DataPath],
    server: S3Server,
    progress: Progress,
) -> Json:
    """Cold reps, then warm (both listing settings) and in-process reps interleaved, then the
    new-process diagnostic. ``paths``: the default catalog's data path, and the one whose
    connection reuses listings; they share one cache."""
    data, reusing = paths
    policy = launcher.policies.get(POLICY)
    sql = QUERIES[name]
    pool = await launcher.warm(POLICY)
    cold: list[SandboxRun] = []
    for i in range(plan.cold_repeat):
        await asyncio.to_thread(data.cache.evict, all=True)  # untimed: empty the cache
        await settle(pool)
        cold.append(await in_sandbox(launcher, data, policy, sql, server))
        progress(f"{name} cold {i + 1}/{plan.cold_repeat}: {cold[-1].total * 1000:.0f} ms")
    async with await data.prepare(sql, policy) as files:  # the files the sandbox read
        bindings = {b.name: list(b.paths) for b in files.bindings}
    local = InProcess(policy, data.cache.root, bindings)
    try:
        _, expected = local.run(sql)  # warm-up: page cache, Parquet metadata
        if cold and cold[-1].rows != expected:
            raise RuntimeError(f"{name}: the sandbox and in-process results differ")
        warm: list[SandboxRun] = []
        warm_reused: list[SandboxRun] = []
        in_process: list[float] = []
        fresh: list[float] = []
        for i in range(plan.warm_repeat):
            await settle(pool)
            warm.append(await in_sandbox(launcher, data, policy, sql, server))
            local_seconds, local_rows = local.run(sql)
            in_process.append(local_seconds)
            fresh.append(local.run_fresh(sql))
            await settle(pool)
            warm_reused.append(await in_sandbox(launcher, reusing, policy, sql, server))
            if expected != local_rows or any(r[-1].rows != expected for r in (warm, warm_reused)):
                raise RuntimeError(f"{name}: rep {i + 1} returned a different result")
        progress(f"{name} warm/in-process x{plan.warm_repeat} done; new-process diagnostic")
        new_process = [local.run_new_process(sql) for _ in range(plan.warm_repeat)]
    finally:
        local.close()
    return {
        "in_process": summarize(in_process),
        "warm": summarize([r.total for r in warm]) | split(warm),
        "warm_listing_reused": summarize([r.total for r in warm_reused])
        | split(warm_reused)
        | {"listing_ttl": plan.listing_ttl},
        "cold": summarize([r.total for r in cold]) | split(cold),
        "in_process_fresh_connection": summarize(fresh),
        "in_process_new_process": summarize(new_process),
        "rows": len(expected),
    }


async def run(plan: Plan, launcher_id: str, progress: Progress) -> Json:
    files = tpch_files(plan, progress)
    load_at_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="dcbd"))
    try:
        (work / "policies").mkdir()
        (work / "policies" / f"{POLICY}.yaml").write_text(BENCH_POLICY)
        policies = load_policies(work / "policies")
        flags = {"state_dir": work / "state", "image": plan.image, "launcher_id": launcher_id}
        config = load_config(flags=flags | {"cache_dir": work / "cache"}, env={})
        with s3_server(files, progress) as server:
            catalogs = [
                parse_catalog(catalog_text(server.endpoint, ttl), str(work / "catalog.yaml"))
                for ttl in ("0s", plan.listing_ttl)
            ]
            cache = ObjectCache(config.cache_root, budget_bytes=config.cache_budget_bytes)
            parser = ParserPool()  # the worker's: every query's SQL is parsed in its children
            await parser.start()
            data = DataPath(catalogs[0], cache, parser=parser, environ=S3_ENV)
            reusing = DataPath(catalogs[1], cache, parser=parser, environ=S3_ENV)
            try:
                cases = await measure_all(plan, config, policies, (data, reusing), server, progress)
            finally:
                await cache.close()
                await parser.close()
        return {
            "schema": 1,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "nproc": os.cpu_count(),
            "loadavg": {"start": load_at_start, "end": os.getloadavg()},
            "plan": asdict(plan) | {"data_dir": str(plan.data_dir), "output": str(plan.output)},
            "policy_name": POLICY,
            "policy": BENCH_POLICY,
            "data_bytes": server.data_bytes,
            "queries": QUERIES,
            "cases": cases,
            "targets": [
                target(f"{name}: warm p50 / in-process p50", ratio(row), "<=", TARGET_WARM_RATIO)
                for name, row in cases.items()
            ]
            + [
                target(
                    f"{name}: warm, listing_ttl {plan.listing_ttl} / in-proc",
                    ratio(row, "warm_listing_reused"),
                    "<=",
                    TARGET_WARM_RATIO,
                )
                for name, row in cases.items()
            ],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def measure_all(
    plan: Plan,
    config: LauncherConfig,
    policies: PolicySet,
    paths: tuple[DataPath, DataPath],
    server: S3Server,
    progress: Progress,
) -> Json:
    async with LocalLauncher(
        config, DockerBackend.for_config(config), policies=policies, progress=progress
    ) as launcher:
        return {
            name: await measure_query(name, plan, launcher, paths, server, progress)
            for name in QUERIES
        }


def ratio(row: Json, case: str = "warm") -> float:
    return float(row[case]["median_ms"] / row["in_process"]["median_ms"])


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="Benchmark catalog queries through the cache against in-process DuckDB."
    )
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run")
    parser.add_argument("--repeat", type=int, help="warm reps per query (default 10, quick 3)")
    parser.add_argument("--cold-repeat", type=int, help="cold reps per query (default 3)")
    parser.add_argument("--scale", type=int, default=1, help="TPC-H scale factor (default 1)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path.home() / ".cache" / "duckcell" / "bench",
        help="where generated TPC-H data is kept and reused (default ~/.cache/duckcell/bench)",
    )
    parser.add_argument(
        "--listing-ttl",
        default="60s",
        help="the connection's listing_ttl for the 'listing reused' warm case (default 60s; the "
        "main warm case always uses the catalog default, 0s)",
    )
    add_image_and_output(parser)
    args = parser.parse_args(argv)
    return Plan(
        scale=args.scale,
        cold_repeat=args.cold_repeat or (1 if args.quick else 3),
        warm_repeat=args.repeat or (3 if args.quick else 10),
        data_dir=args.data_dir,
        image=args.image,
        output=args.output,
        listing_ttl=args.listing_ttl,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return run_benchmark(
        lambda launcher_id, progress: run(plan, launcher_id, progress),
        prefix="bench-data",
        render=render_data,
        output=plan.output,
        name="data",
    )


if __name__ == "__main__":
    sys.exit(main())
