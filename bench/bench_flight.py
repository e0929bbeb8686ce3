#!/usr/bin/env python3
"""What the Flight SQL surface costs a real client, measured in one run on one machine.

Three paths fetch the same results as Arrow (``flight_paths.py``): in-process DuckDB, a one-hop
Flight server beside DuckDB in this process (the bar a GizmoSQL-style server sets), and the whole
chain through ADBC: control plane Flight SQL (TLS, API key) -> mTLS tunnel -> worker -> a
warm-pool sandbox, the control plane in a process of its own (``controlplane_process``).
A fourth, diagnostic path runs the worker's launcher on the same pool with no Flight SQL
and no tunnel, to show what the sandbox itself costs in the same conditions.

* ``SELECT 42`` latency with a warm pool (the target's figure): before every query the pool is
  refilled and settled (untimed), so the query finds a ready sandbox and no container start
  competes with it for the two cores; the paths take turns query by query.
* ``SELECT 42`` in bursts (reported beside it): queries with no pause between them, each burst
  as long as the warm pool is deep, so every chain query still checks out a ready sandbox but
  runs while the engine replaces the ones used before it, as under sustained load.
* A 10M-row two-int64 result: MB/s from the call to the whole table in client memory, the paths
  interleaved rep by rep, the pool settled before each chain rep.

Every container carries the label ``duckcell.launcher=flight-<pid>`` and is removed at the end,
whatever happens. Progress goes to stderr, the table to stdout, JSON to
``<output>/flight-<UTC>.json`` and ``<output>/latest-flight.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

# Run as a script from a checkout: the launcher package and bench/ sit in the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import POLICY, SELECT_42, settle
from bench.controlplane_process import ControlPlaneProcess
from bench.entry import add_image_and_output, run_benchmark
from bench.flight_paths import (
    ChainClient,
    Fetch,
    InProcessDuckDB,
    OneHopClient,
    OneHopServer,
    timed,
)
from bench.report import flight_summary, render_flight
from bench.stats import Json, Progress
from bench.tunnel import CONNECT_TIMEOUT_S
from launcher.config import load_config
from launcher.controlplane.datadir import ControlPlaneData
from launcher.executor import QueryRecord, collect_table
from launcher.host import LocalLauncher
from launcher.sandbox.pool import SandboxPool
from launcher.worker.daemon import Worker
from launcher.worker.enroll import enroll

WIDE = "SELECT i AS a, i * 2 AS b FROM range(10000000) t(i)"
WIDE_ROWS = 10_000_000
PATHS = ("in_process", "one_hop", "one_hop_tls", "worker_local", "chain")
Fetcher = Callable[[str], pa.Table]


@dataclass(frozen=True, slots=True)
class Plan:
    reps: int  # SELECT 42 reps per path
    warm: int  # the warm pool's size, and the length of a pause-free burst
    wide_reps: int
    image: str
    output: Path


async def run(plan: Plan, launcher_id: str, progress: Progress) -> Json:
    """Set up a state directory and the machine facts around ``serve``'s measurements."""
    started_utc = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    loadavg_start = os.getloadavg()[0]
    state_dir = Path(tempfile.mkdtemp(prefix="dcf"))
    try:
        samples = await serve(plan, launcher_id, state_dir, progress)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    plan_json = asdict(plan) | {"output": str(plan.output), "launcher_id": launcher_id}
    return summary(samples) | {
        "schema": 1,
        "date_utc": started_utc,
        "nproc": os.cpu_count(),
        "loadavg": [loadavg_start, os.getloadavg()[0]],
        "plan": plan_json,
        "queries": {"select42": SELECT_42, "wide": WIDE},
    }


async def serve(plan: Plan, launcher_id: str, state_dir: Path, progress: Progress) -> Samples:
    """The control plane with Flight SQL, an enrolled worker whose tunnel runs on this loop,
    its warm pool, and an ADBC connection; torn down in reverse order."""
    flags = {"state_dir": state_dir, "image": plan.image, "launcher_id": launcher_id}
    config = load_config(flags=flags | {"max_sandboxes": plan.warm + 2})
    data = ControlPlaneData(state_dir / "cp")
    async with ControlPlaneProcess(data, flight=True) as control_plane:
        identity = await enroll(control_plane.address, data.tokens().create(), state_dir / "w", "b")
        finished: list[QueryRecord] = []  # sandbox queries the tunnel ran
        async with Worker(
            identity,
            config,
            warm_override=plan.warm,
            progress=progress,
            on_finished=finished.append,
        ) as worker:
            worker.start()
            await worker.connected(CONNECT_TIMEOUT_S)
            key = data.api_keys().create("analyst")
            chain = await asyncio.to_thread(
                ChainClient, control_plane.flight_location, data.ca().cert_pem(), key
            )
            try:
                tls = data.ca().issue_server_cert(["127.0.0.1"]), data.ca().cert_pem()
                return await measure(plan, worker.host, chain.fetch, finished, progress, tls)
            finally:
                chain.close()


def summary(samples: Samples) -> Json:
    """Plain seconds and bytes for ``report.flight_summary``, which knows no fetch paths."""
    return flight_summary(
        {name: [f.seconds for f in fetches] for name, fetches in samples.latency.items()},
        {name: [f.seconds for f in fetches] for name, fetches in samples.wide.items()},
        samples.wide["in_process"][0].bytes,
        bursts_s={name: [f.seconds for f in fetches] for name, fetches in samples.bursts.items()},
    ) | {"sandbox_queries_per_chain_select42": samples.sandbox_queries_per_chain_query}


@dataclass(frozen=True, slots=True)
class Samples:
    latency: dict[str, list[Fetch]]  # each query on a settled warm pool
    bursts: dict[str, list[Fetch]]  # pause-free bursts, the pool refilling meanwhile
    wide: dict[str, list[Fetch]]
    sandbox_queries_per_chain_query: float  # does an ADBC execute cost more than one sandbox?


async def measure(
    plan: Plan,
    launcher: LocalLauncher,
    chain: Fetcher,
    finished: list[QueryRecord],
    progress: Progress,
    tls: tuple[tuple[bytes, bytes], bytes],
) -> Samples:
    """Both cases over the paths; the one-hop servers live only for the measurement.
    ``tls``: a certificate and key for the TLS one-hop server, and the CA to verify it with."""
    (server_pair, ca_pem), local = tls, InProcessDuckDB()
    server, tls_server = OneHopServer(), OneHopServer(server_pair)
    one_hop, one_hop_tls = OneHopClient(server), OneHopClient(tls_server, ca_pem)
    pool = await launcher.warm(POLICY)
    fetchers = {
        "in_process": local.fetch,
        "one_hop": one_hop.fetch,
        "one_hop_tls": one_hop_tls.fetch,
        "worker_local": worker_local(launcher, asyncio.get_running_loop()),
        "chain": chain,
    }
    try:
        for fetch in fetchers.values():  # warm-ups: first RPCs, lazy imports
            await settle(pool)
            await asyncio.to_thread(timed, fetch, SELECT_42)
        before = len(finished)
        latency = await settled_case(plan, pool, fetchers, progress)
        await settle(pool)  # every chain query's record is in once its sandbox is replaced
        per_query = (len(finished) - before) / len(latency["chain"])
        bursts = await burst_case(plan, pool, fetchers, progress)
        wide = await wide_case(plan, pool, fetchers, progress)
    finally:
        for closing in (one_hop, server, one_hop_tls, tls_server, local):
            closing.close()
    return Samples(latency, bursts, wide, per_query)


def worker_local(launcher: LocalLauncher, loop: asyncio.AbstractEventLoop) -> Fetcher:
    """Diagnostic path: the worker's own launcher on the same warm pool, no Flight SQL and no
    tunnel, called from a thread like the others (one hop onto the bench's loop). The chain
    minus this is what Flight SQL, the control plane and the tunnel add."""

    async def query(sql: str) -> pa.Table:
        async with launcher.run_query(sql, policy=POLICY) as execution:
            return await collect_table(execution)

    def fetch(sql: str) -> pa.Table:
        return asyncio.run_coroutine_threadsafe(query(sql), loop).result()

    return fetch


def burst(fetch: Fetcher, n: int) -> list[Fetch]:
    """``n`` queries back to back in one thread: no pause, no hop to the event loop between."""
    return [timed(fetch, SELECT_42) for _ in range(n)]


async def settled_case(
    plan: Plan, pool: SandboxPool, fetchers: dict[str, Fetcher], progress: Progress
) -> dict[str, list[Fetch]]:
    samples: dict[str, list[Fetch]] = {name: [] for name in PATHS}
    for i in range(plan.reps):
        for name in PATHS:
            await settle(pool)  # untimed: a ready sandbox, and no start or destroy in flight
            samples[name].append(await asyncio.to_thread(timed, fetchers[name], SELECT_42))
        if (i + 1) % 10 == 0 or i + 1 == plan.reps:
            progress(f"SELECT 42 on a settled pool {i + 1}/{plan.reps}: " + _medians(samples))
    return samples


def _medians(samples: dict[str, list[Fetch]]) -> str:
    return ", ".join(
        f"{name} {sorted(f.seconds for f in fetches)[len(fetches) // 2] * 1000:.2f} ms"
        for name, fetches in samples.items()
    )


async def burst_case(
    plan: Plan, pool: SandboxPool, fetchers: dict[str, Fetcher], progress: Progress
) -> dict[str, list[Fetch]]:
    samples: dict[str, list[Fetch]] = {name: [] for name in PATHS}
    while len(samples["chain"]) < plan.reps:
        n = min(plan.warm, plan.reps - len(samples["chain"]))
        for name in PATHS:
            await settle(pool)  # untimed: every chain query of the burst finds a warm sandbox
            samples[name] += await asyncio.to_thread(burst, fetchers[name], n)
        progress(f"SELECT 42 in bursts {len(samples['chain'])}/{plan.reps}: " + _medians(samples))
    return samples


async def wide_case(
    plan: Plan, pool: SandboxPool, fetchers: dict[str, Fetcher], progress: Progress
) -> dict[str, list[Fetch]]:
    samples: dict[str, list[Fetch]] = {name: [] for name in PATHS}
    for i in range(plan.wide_reps):
        for name in PATHS:
            await settle(pool)
            fetch = await asyncio.to_thread(timed, fetchers[name], WIDE)
            if fetch.rows != WIDE_ROWS:
                raise RuntimeError(f"{name}: the 10M-row result had {fetch.rows} rows")
            samples[name].append(fetch)
        progress(
            f"10M-row result {i + 1}/{plan.wide_reps}: "
            + ", ".join(
                f"{name} {samples[name][-1].bytes / samples[name][-1].seconds / 1e6:.0f} MB/s"
                for name in PATHS
            )
        )
    return samples


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="Benchmark Flight SQL through ADBC and the whole chain against in-process "
        "DuckDB and a one-hop Flight server."
    )
    parser.add_argument("--reps", type=int, default=50, help="SELECT 42 reps per path (50)")
    parser.add_argument("--warm", type=int, default=10, help="warm pool size = burst length (10)")
    parser.add_argument("--wide-reps", type=int, default=5, help="10M-row reps per path (5)")
    parser.add_argument("--quick", action="store_true", help="10 SELECT 42 reps, 2 10M-row reps")
    add_image_and_output(parser)
    args = parser.parse_args(argv)
    if min(args.reps, args.warm, args.wide_reps) < 1:
        parser.error("--reps, --warm and --wide-reps must be at least 1")
    return Plan(
        reps=10 if args.quick else args.reps,
        warm=args.warm,
        wide_reps=2 if args.quick else args.wide_reps,
        image=args.image,
        output=args.output,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return run_benchmark(
        lambda launcher_id, progress: run(plan, launcher_id, progress),
        prefix="flight",
        render=render_flight,
        output=plan.output,
        name="flight",
    )


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
