#!/usr/bin/env python3
"""What a Flight SQL connection session costs and saves, measured in one run on one machine.

The chain is ``bench_flight.py``'s: ADBC (TLS with the control plane's CA) -> control plane
Flight SQL in a process of its own (``controlplane_process``) -> mTLS tunnel -> a worker in
this process -> a sandbox. The control plane holds the shipped ``default`` and
``agent-session`` policies and a catalog with two roles: ``analyst`` on ``default`` (per-query:
every statement in a fresh sandbox) and ``notebook`` on ``agent-session`` (session mode: each
connection is one session, one sandbox opened at its first statement; docs/clients.md).

* ``SELECT 42`` on one connection of each role, taking turns query by query: the per-query role
  with the bearer key (as ``bench_flight.py``) and, as a diagnostic, after a handshake; the
  session-mode role after an ADBC handshake (``username``/``password``), every statement in the
  connection's one sandbox. The ``default`` pool is settled (untimed) before each query, so a
  per-query statement finds a ready sandbox and no replacement's start runs beside any of them.
  In-process DuckDB in the same turns is the floor; the worker's own time per statement
  (``QueryRecord.total_s``) is read beside each.
* The first statement of a session-mode connection: connect (the handshake), the first
  ``SELECT 42`` (the control plane opens the session on the worker, which takes a sandbox from
  the ``agent-session`` warm pool), and close (``CloseSession``), a fresh connection per rep,
  the pool settled before each.

Every container carries the label ``duckcell.launcher=sessions-<pid>`` and is removed at the
end, whatever happens. Progress goes to stderr, the table to stdout, JSON to
``<output>/sessions-<UTC>.json`` and ``<output>/latest-sessions.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from adbc_driver_flightsql import DatabaseOptions
from adbc_driver_flightsql import dbapi as adbc_flightsql

# Run as a script from a checkout: the launcher package and bench/ sit in the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import SELECT_42, settle
from bench.controlplane_process import ControlPlaneProcess
from bench.entry import add_image_and_output, run_benchmark
from bench.flight_paths import ChainClient, InProcessDuckDB
from bench.stats import Json, Progress, summarize
from bench.tunnel import CONNECT_TIMEOUT_S
from launcher.config import load_config
from launcher.controlplane.catalogs import apply_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.policies import apply_policies
from launcher.executor import QueryRecord
from launcher.sandbox.pool import SandboxPool
from launcher.worker.daemon import Worker
from launcher.worker.enroll import Identity, enroll

REPO = Path(__file__).resolve().parent.parent
PER_QUERY, SESSION = "default", "agent-session"
CATALOG = f"roles:\n  analyst: {{policy: {PER_QUERY}}}\n  notebook: {{policy: {SESSION}}}\n"
CLOSED_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Plan:
    reps: int  # SELECT 42 per role
    opens: int  # session-mode connections opened, each for its first statement
    image: str
    output: Path


@dataclass(slots=True)
class Samples:
    in_process: list[float] = field(default_factory=list)
    per_query: list[float] = field(default_factory=list)
    per_query_handshake: list[float] = field(default_factory=list)  # diag: the token path
    session: list[float] = field(default_factory=list)
    connect: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    close: list[float] = field(default_factory=list)
    per_query_sandboxes: list[str] = field(default_factory=list)  # sandbox names, one a query
    worker_per_query: list[float] = field(default_factory=list)  # the worker's QueryRecord.total_s
    worker_session: list[float] = field(default_factory=list)
    session_ids: set[str] = field(default_factory=set)  # of the steady connection's queries


async def run(plan: Plan, launcher_id: str, progress: Progress) -> Json:
    started_utc = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    loadavg_start = os.getloadavg()[0]
    state_dir = Path(tempfile.mkdtemp(prefix="dcs"))
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
        "policies": {"per_query": PER_QUERY, "session": SESSION},
        "query": SELECT_42,
    }


def summary(s: Samples) -> Json:
    per_query, session = summarize(s.per_query), summarize(s.session)
    return {
        "select42": {
            "in_process": summarize(s.in_process),
            "per_query": per_query,
            "per_query_handshake": summarize(s.per_query_handshake),
            "session": session,
        },
        "worker_total": {
            "per_query": summarize(s.worker_per_query),
            "session": summarize(s.worker_session),
        },
        "session_saves_p50_ms": per_query["median_ms"] - session["median_ms"],
        "per_query_over_session_p50": per_query["median_ms"] / session["median_ms"],
        "open": {
            "connect": summarize(s.connect),
            "first_statement": summarize(s.first),
            "close": summarize(s.close),
        },
        "per_query_role_sandbox_queries": len(s.per_query_sandboxes),
        "distinct_sandboxes_per_query_role": len(set(s.per_query_sandboxes)),
        "sessions_seen_on_the_steady_connection": len(s.session_ids),
    }


def prepare_control_plane(data: ControlPlaneData, state_dir: Path) -> None:
    """The shipped policies and a catalog whose two roles run under them (before it starts)."""
    data.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    policies = [REPO / "policies" / f"{name}.yaml" for name in (PER_QUERY, SESSION)]
    apply_policies(data.root, policies)
    catalog = state_dir / "catalog.yaml"
    catalog.write_text(CATALOG)
    apply_catalog(data.root, catalog, policies=[PER_QUERY, SESSION])


def session_connect(location: str, ca_pem: bytes, api_key: str) -> adbc_flightsql.Connection:
    """An ADBC connection that handshakes (basic auth, the key as password): a session-mode
    role's connection is then one session."""
    options = {
        DatabaseOptions.TLS_ROOT_CERTS.value: ca_pem.decode(),
        "username": "bench",
        "password": api_key,
    }
    return adbc_flightsql.connect(location, db_kwargs=options, autocommit=True)


async def serve(plan: Plan, launcher_id: str, state_dir: Path, progress: Progress) -> Samples:
    flags = {"state_dir": state_dir, "image": plan.image, "launcher_id": launcher_id}
    config = load_config(flags=flags | {"max_sandboxes": 6})
    data = ControlPlaneData(state_dir / "cp")
    prepare_control_plane(data, state_dir)
    async with ControlPlaneProcess(data, flight=True) as control_plane:
        identity = await enroll_worker(control_plane, state_dir)
        finished: list[QueryRecord] = []
        async with Worker(
            identity, config, warm_override=1, progress=progress, on_finished=finished.append
        ) as worker:
            worker.start()
            await worker.connected(CONNECT_TIMEOUT_S)
            pools = (await worker.host.warm(PER_QUERY), await worker.host.warm(SESSION))
            location, ca_pem = control_plane.flight_location, data.ca().cert_pem()
            analyst, notebook = (
                data.api_keys().create("analyst"),
                data.api_keys().create("notebook"),
            )
            samples = Samples()
            await opens_case(plan, location, ca_pem, notebook, pools[1], worker, samples, progress)
            per_query = await asyncio.to_thread(ChainClient, location, ca_pem, analyst)
            try:
                connections = (
                    session_connect(location, ca_pem, analyst),
                    session_connect(location, ca_pem, notebook),
                )
                await steady_case(plan, per_query, connections, pools, samples, finished, progress)
            finally:
                per_query.close()
    return samples


async def enroll_worker(control_plane: ControlPlaneProcess, state_dir: Path) -> Identity:
    token = control_plane.data.tokens().create()
    return await enroll(control_plane.address, token, state_dir / "w", "bench")


def fetch_with(cursor: adbc_flightsql.Cursor) -> Callable[[str], pa.Table]:
    def fetch(sql: str) -> pa.Table:
        cursor.execute(sql)
        return cursor.fetch_arrow_table()

    return fetch


async def timed(fetch: Callable[[str], pa.Table], sql: str = SELECT_42) -> float:
    def call() -> float:
        started = time.perf_counter()
        table = fetch(sql)
        elapsed = time.perf_counter() - started
        if table.column(0).to_pylist() != [42]:
            raise RuntimeError(f"SELECT 42 answered {table}")
        return elapsed

    return await asyncio.to_thread(call)


async def opens_case(
    plan: Plan,
    location: str,
    ca_pem: bytes,
    api_key: str,
    pool: SandboxPool,
    worker: Worker,
    s: Samples,
    progress: Progress,
) -> None:
    """A fresh session-mode connection per rep: connect, first statement, close."""
    for i in range(plan.opens + 1):  # the first is a warm-up (first handshake, lazy imports)
        await settle(pool)

        def one() -> tuple[float, float, float]:
            started = time.perf_counter()
            conn = session_connect(location, ca_pem, api_key)
            cursor = conn.cursor()
            connected = time.perf_counter()
            cursor.execute(SELECT_42)
            if cursor.fetch_arrow_table().column(0).to_pylist() != [42]:
                raise RuntimeError("the first statement did not answer 42")
            first = time.perf_counter()
            cursor.close()
            conn.close()
            return connected - started, first - connected, time.perf_counter() - first

        connect, first, close = await asyncio.to_thread(one)
        await wait_no_session(worker)
        if i:
            s.connect.append(connect)
            s.first.append(first)
            s.close.append(close)
            progress(
                f"session open {i}/{plan.opens}: connect {connect * 1000:.1f} ms, first "
                f"statement {first * 1000:.1f} ms, close {close * 1000:.1f} ms"
            )


async def wait_no_session(worker: Worker) -> None:
    deadline = time.monotonic() + CLOSED_TIMEOUT_S
    while len(worker.host.sessions):
        if time.monotonic() > deadline:
            raise RuntimeError("a closed connection's session was still open on the worker")
        await asyncio.sleep(0.01)


async def steady_case(
    plan: Plan,
    per_query: ChainClient,
    connections: tuple[adbc_flightsql.Connection, adbc_flightsql.Connection],
    pools: tuple[SandboxPool, SandboxPool],
    s: Samples,
    finished: list[QueryRecord],
    progress: Progress,
) -> None:
    """``connections``: a per-query role's and a session-mode role's, both after a handshake."""
    local = InProcessDuckDB()
    cursors = [conn.cursor() for conn in connections]
    handshake, session = fetch_with(cursors[0]), fetch_with(cursors[1])
    try:
        await timed(session)  # opens the session: the opens case measures that
        for warm_up in (per_query.fetch, handshake):
            await settle(pools[0])
            await timed(warm_up)
        await settle(pools[0])  # its record is in
        before = len(finished)
        for i in range(plan.reps):
            await settle(pools[0])  # untimed: a ready sandbox, no start or destroy in flight
            s.in_process.append(await timed(local.fetch))
            s.per_query.append(await timed(per_query.fetch))
            await settle(pools[0])
            s.per_query_handshake.append(await timed(handshake))
            await settle(pools[0])  # the replacement's start would compete with the session's
            s.session.append(await timed(session))
            if (i + 1) % 10 == 0 or i + 1 == plan.reps:
                progress(
                    f"SELECT 42 {i + 1}/{plan.reps}: per-query p50 "
                    f"{sorted(s.per_query)[len(s.per_query) // 2] * 1000:.2f} ms, session p50 "
                    f"{sorted(s.session)[len(s.session) // 2] * 1000:.2f} ms"
                )
        await settle(pools[0])  # every per-query record is in once its sandbox is replaced
        for record in finished[before:]:
            if record.session_id is not None:
                s.session_ids.add(record.session_id)
                s.worker_session.append(record.total_s)
            else:
                s.per_query_sandboxes.append(record.sandbox)
                s.worker_per_query.append(record.total_s)
    finally:
        for cursor in cursors:
            cursor.close()
        for conn in connections:
            conn.close()
        local.close()


def render(result: Json) -> str:
    rows, opened = result["select42"], result["open"]
    base = rows["in_process"]["median_ms"]
    lines = [
        f"duckcell Flight SQL sessions benchmark, {result['date_utc']}, nproc {result['nproc']}, "
        f"load average (1 min) {result['loadavg'][0]:.2f} at start, "
        f"{result['loadavg'][1]:.2f} at end",
        f"ADBC -> control plane -> tunnel -> worker; per-query role on {PER_QUERY} (pool "
        f"settled before each query), session-mode role on {SESSION} (one connection)",
        "",
        f"{'SELECT 42, one connection each':<52}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p50 added':>11}",
    ]
    for key, title in (
        ("in_process", "in-process DuckDB (floor)"),
        ("per_query", f"per-query role ({PER_QUERY}): a sandbox per statement"),
        ("per_query_handshake", "diag: the same role, connected with a handshake"),
        ("session", f"session-mode role ({SESSION}): one sandbox"),
    ):
        row = rows[key]
        lines.append(
            f"{title:<52}{row['n']:>4}{row['median_ms']:>9.2f}{row['p95_ms']:>9.2f}"
            f"{row['median_ms'] - base:>+9.2f}ms"
        )
        if key in result["worker_total"]:
            inner = result["worker_total"][key]
            label = "  in the worker" + (" (both rows above)" if key == "per_query" else "")
            lines.append(
                f"{label:<52}{inner['n']:>4}{inner['median_ms']:>9.2f}{inner['p95_ms']:>9.2f}"
            )
    lines += [
        f"per-query / session p50: {result['per_query_over_session_p50']:.2f}x "
        f"({result['session_saves_p50_ms']:.2f} ms saved a statement); the per-query role's "
        f"{result['per_query_role_sandbox_queries']} sandbox queries ran in "
        f"{result['distinct_sandboxes_per_query_role']} sandboxes, sessions seen on the "
        f"session connection: {result['sessions_seen_on_the_steady_connection']}",
        "",
        f"{'a session-mode connection, fresh each rep':<52}{'n':>4}{'p50 ms':>9}{'p95 ms':>9}",
    ]
    for key, title in (
        ("connect", "connect (ADBC handshake)"),
        ("first_statement", "first SELECT 42 (opens the session's sandbox)"),
        ("close", "close (CloseSession)"),
    ):
        row = opened[key]
        lines.append(f"{title:<52}{row['n']:>4}{row['median_ms']:>9.2f}{row['p95_ms']:>9.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="Benchmark Flight SQL sessions: SELECT 42 on a per-query role against a "
        "session-mode role's connection, and a session's first statement."
    )
    parser.add_argument("--reps", type=int, default=80, help="SELECT 42 per role (80)")
    parser.add_argument("--opens", type=int, default=10, help="session connections opened (10)")
    parser.add_argument("--quick", action="store_true", help="10 reps, 3 opens")
    add_image_and_output(parser)
    args = parser.parse_args(argv)
    if min(args.reps, args.opens) < 1:
        parser.error("--reps and --opens must be at least 1")
    return Plan(
        reps=10 if args.quick else args.reps,
        opens=3 if args.quick else args.opens,
        image=args.image,
        output=args.output,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return run_benchmark(
        lambda launcher_id, progress: run(plan, launcher_id, progress),
        prefix="sessions",
        render=render,
        output=plan.output,
        name="sessions",
    )


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
