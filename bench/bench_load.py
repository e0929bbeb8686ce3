#!/usr/bin/env python3
"""Many clients at once through the whole remote path, as issue 17's load run did.

The reference control plane (``controlplane_process``) and ``duckcell worker``
(``worker_process``) run in processes of their own, as deployed, with the shipped policies and
their own warm pools; N client processes (``client_process``), each with its own API key and
TLS channel to the control plane's gRPC ``Query`` service (``ControlPlaneClient``), run their
statements back to back, all clients at once:

* ``per_query``: M ``SELECT 42`` on ``default`` per client, each in a sandbox of its own;
* ``session``: each client opens a session on ``agent-session``, creates a temp table in it,
  reads it back M - 1 times (42 rows each, so the table really survived) and closes it.

Before the run each client sends one untimed ``SELECT 42`` (its channel's TLS handshake and
first call), and before each phase the worker's pools are left to refill and settle. Each
phase reports throughput (ok results per second of wall time), the clients' latency p50, p95
and p99, errors by gRPC status and error class, the audit rows each side wrote for the phase
against the statements sent, with their queue and run times (the worker's queue is the wait
for a sandbox), the most containers that existed at once, and CPU: the whole machine's busy
share (``/proc/stat``: on 2 cores the run is CPU-bound) and what the worker, the control plane
and the clients took of it. After the run the worker drains and exits, and the containers
still carrying the run's label are counted: there should be none.

Every container carries the label ``duckcell.launcher=load-<pid>`` and is removed at the end,
whatever happens. Progress goes to stderr, the table to stdout, JSON to
``<output>/load-<UTC>.json`` and ``<output>/latest-load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import docker

# Run as a script from a checkout: the launcher package and bench/ sit in the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import POLICY, SELECT_42
from bench.client_process import ClientProcess
from bench.controlplane_process import ControlPlaneProcess
from bench.engine import ContainerPeak, containers_by_policy
from bench.entry import add_image_and_output, run_benchmark
from bench.load_report import cpu_summary, phase_summary, render_load
from bench.stats import Json, MachineCpu, Progress, cpu_seconds_of, cpu_spent, process_tree
from bench.worker_process import WorkerProcess
from launcher.config import load_config
from launcher.controlplane.audit import AuditLog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.model.policy import load_policies
from launcher.sandbox.backend.base import LABEL_LAUNCHER

SESSION_POLICY = "agent-session"
SESSION_TABLE = "CREATE TEMP TABLE load_t AS SELECT i FROM range(1000) t(i)"
SESSION_READ = "SELECT i FROM load_t WHERE i < 42"
SETTLE_TIMEOUT_S = 120.0
AUDIT_TIMEOUT_S = 30.0
AUDIT_LIMIT = 10_000_000  # every row the run's fresh control plane holds
TICK_S = 10.0


@dataclass(frozen=True, slots=True)
class Plan:
    clients: int
    queries: int  # statements per client and phase
    image: str
    output: Path


@dataclass(frozen=True, slots=True)
class Phase:
    key: str
    title: str
    policy: str
    session: str  # a session policy: the script runs in one session; "": one sandbox each
    statements: tuple[str, ...]
    expected_rows: tuple[int | None, ...]  # None: not checked


def phases(plan: Plan) -> list[Phase]:
    m = plan.queries
    return [
        Phase(
            "per_query", f"per-query SELECT 42 ({POLICY})", POLICY, "", (SELECT_42,) * m, (1,) * m
        ),
        Phase(
            "session",
            f"session ({SESSION_POLICY}), temp table",
            SESSION_POLICY,
            SESSION_POLICY,
            (SESSION_TABLE,) + (SESSION_READ,) * (m - 1),
            (None,) + (42,) * (m - 1),
        ),
    ]


@dataclass(frozen=True, slots=True)
class Stack:
    """What a phase runs against and reads from."""

    control_plane: ControlPlaneProcess
    worker: WorkerProcess
    clients: list[ClientProcess]
    launcher_id: str
    warm: dict[str, int]  # each policy's warm pool size: what a settled worker holds


async def run(plan: Plan, launcher_id: str, progress: Progress) -> Json:
    started_utc = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    loadavg_start = os.getloadavg()[0]
    state_dir = Path(tempfile.mkdtemp(prefix="dcl"))  # short: sandbox socket paths live under it
    flags = {"state_dir": state_dir, "image": plan.image, "launcher_id": launcher_id}
    config = load_config(flags=flags)
    warm = {policy.name: policy.warm_pool for policy in load_policies(config.policies_dir)}
    label = f"{LABEL_LAUNCHER}={launcher_id}"
    try:
        data = ControlPlaneData(state_dir / "cp")
        async with ControlPlaneProcess(data) as control_plane:
            worker = WorkerProcess(control_plane, config, state_dir / "worker")
            async with worker:
                progress(f"worker online (pid {worker.pid}); starting {plan.clients} clients")
                async with client_processes(control_plane, plan.clients, state_dir) as clients:
                    stack = Stack(control_plane, worker, clients, launcher_id, warm)
                    await warm_up(clients, progress)
                    measured = {p.key: await measure(p, stack, progress) for p in phases(plan)}
            left = await asyncio.to_thread(count_containers, launcher_id)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    plan_json = {
        "clients": plan.clients,
        "queries": plan.queries,
        "image": plan.image,
        "output": str(plan.output),
        "launcher_id": launcher_id,
        "max_sandboxes": config.max_sandboxes,
        "warm": warm,
    }
    return {
        "schema": 1,
        "date_utc": started_utc,
        "nproc": os.cpu_count(),
        "loadavg": [loadavg_start, os.getloadavg()[0]],
        "plan": plan_json,
        "label": label,
        "phases": measured,
        "containers_left": left,
        "worker_exit": worker.returncode,
    }


@contextlib.asynccontextmanager
async def client_processes(
    control_plane: ControlPlaneProcess, n: int, state_dir: Path
) -> AsyncIterator[list[ClientProcess]]:
    """``n`` client processes, each with an API key of its own (as ``n`` users would)."""
    data, ca_pem = control_plane.data, control_plane.data.ca().cert_pem()
    async with contextlib.AsyncExitStack() as stack:
        clients = []
        for i in range(n):
            key = data.api_keys().create("analyst")
            client = ClientProcess(control_plane.address, ca_pem, key, state_dir / f"client{i}")
            clients.append(await stack.enter_async_context(client))
        yield clients


async def warm_up(clients: list[ClientProcess], progress: Progress) -> None:
    """One untimed SELECT 42 per client, one client at a time: imports, TLS, the first call."""
    for i, client in enumerate(clients):
        answer = await client.run_script([SELECT_42], POLICY)
        error = answer["queries"][0]["error"]
        if error is not None:
            raise RuntimeError(f"client {i}'s first SELECT 42 failed: {error}")
    progress(f"{len(clients)} clients warmed up (one SELECT 42 each, untimed)")


async def measure(phase: Phase, stack: Stack, progress: Progress) -> Json:
    """All clients run the phase's script at once; then both sides' audit rows are read."""
    settled = await settle(stack, progress)
    roles_before = role_cpu(stack)
    machine_before = MachineCpu.now()
    since, started = time.time(), time.perf_counter()
    progress(f"{phase.key}: {len(stack.clients)} clients x {len(phase.statements)} statements")
    script = list(phase.statements)
    with ContainerPeak(stack.launcher_id) as peak:
        ticker = asyncio.create_task(tick(phase, stack, since, progress))
        try:
            answers = await asyncio.gather(
                *(c.run_script(script, phase.policy, session=phase.session) for c in stack.clients)
            )
        finally:
            ticker.cancel()
    elapsed = time.perf_counter() - started
    machine = MachineCpu.now().since(machine_before)
    roles_after = role_cpu(stack)
    roles = {role: cpu_spent(roles_before[role], roles_after[role]) for role in roles_after}
    cpu = cpu_summary(machine.busy, machine.steal, elapsed, os.cpu_count() or 1, **roles)
    sent = sum(len(answer["queries"]) for answer in answers)
    audits = await phase_audits(stack, since, sent)
    summary = phase_summary(list(phase.expected_rows), answers, elapsed, audits, cpu, peak.peak)
    progress(
        f"{phase.key}: {summary['ok']}/{summary['sent']} ok in {elapsed:.1f} s, "
        f"{summary['queries_per_s']:.2f} q/s, p50 {summary['latency'].get('median_ms', 0):.0f} ms"
    )
    return summary | {
        "title": phase.title,
        "policy": phase.policy,
        "session_policy": phase.session,
        "statements": sorted(set(phase.statements)),
        "clients": len(stack.clients),
        "statements_per_client": len(phase.statements),
        "settled_before": settled,
        "container_samples": peak.samples,
    }


def role_cpu(stack: Stack) -> dict[str, dict[int, float]]:
    """CPU seconds so far of each process of each role (the worker with its SQL parsers)."""
    return {
        "worker_s": cpu_seconds_of(process_tree(stack.worker.pid)),
        "controlplane_s": cpu_seconds_of([stack.control_plane.pid]),
        "clients_s": cpu_seconds_of([client.pid for client in stack.clients]),
    }


async def tick(phase: Phase, stack: Stack, since: float, progress: Progress) -> None:
    total = len(stack.clients) * len(phase.statements)
    while True:
        await asyncio.sleep(TICK_S)
        done = sum(1 for row in stack.worker.audit() if float(row["started_at"]) >= since)
        progress(f"{phase.key}: {done}/{total} in the worker's audit")


async def settle(stack: Stack, progress: Progress) -> bool:
    """Until the worker holds exactly its warm pools (starts and removals done); False when it
    did not within ``SETTLE_TIMEOUT_S`` (the phase then starts anyway, and says so)."""
    want = {name: n for name, n in stack.warm.items() if n}
    api = docker.from_env().api
    try:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            counts = await asyncio.to_thread(containers_by_policy, api, stack.launcher_id)
            if counts == want:
                return True
            if time.monotonic() > deadline:
                progress(f"the worker's pools did not settle: {counts}, expected {want}")
                return False
            await asyncio.sleep(0.2)
    finally:
        api.close()


async def phase_audits(stack: Stack, since: float, sent: int) -> dict[str, list[Json]]:
    """Both sides' audit rows of queries started since ``since``, once each side has one per
    statement sent or ``AUDIT_TIMEOUT_S`` has passed (then whatever is there)."""
    deadline = time.monotonic() + AUDIT_TIMEOUT_S
    while True:
        with contextlib.closing(stack.control_plane.data.database()) as conn:
            records = AuditLog(conn).recent(AUDIT_LIMIT)
        rows = {
            "controlplane": [r.as_dict() for r in records if r.started_at >= since],
            "worker": [r for r in stack.worker.audit() if float(r["started_at"]) >= since],
        }
        if min(len(side) for side in rows.values()) >= sent or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.2)


def count_containers(launcher_id: str) -> int:
    api = docker.from_env().api
    try:
        return sum(containers_by_policy(api, launcher_id).values())
    finally:
        api.close()


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="Load: N client processes x M statements through the control plane and a "
        "worker process, per-query SELECT 42 and then a session run."
    )
    parser.add_argument("--clients", type=int, default=20, help="client processes (20)")
    parser.add_argument(
        "--queries", type=int, default=50, help="statements per client and phase (50)"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 clients x 5")
    add_image_and_output(parser)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.queries < 2:
        parser.error("--clients must be at least 1 and --queries at least 2")
    return Plan(
        clients=2 if args.quick else args.clients,
        queries=5 if args.quick else args.queries,
        image=args.image,
        output=args.output,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return run_benchmark(
        lambda launcher_id, progress: run(plan, launcher_id, progress),
        prefix="load",
        render=render_load,
        output=plan.output,
        name="load",
    )


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
