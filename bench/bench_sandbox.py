#!/usr/bin/env python3
"""What per-query isolation costs, measured in one run on one machine.

Each case is measured against its baseline in the same run:

1. ``SELECT 42``: in-process DuckDB vs a warm-pool sandbox through the launcher vs a cold
   ``docker run --rm`` of the same image with the same hardening flags.
2. A 10M-row aggregation: in-process (``SET threads=1``, like the default policy's sandbox)
   vs a warm-pool sandbox.
3. Sustained per-query throughput through the launcher while the pool refills, vs the engine's
   own create+start+remove churn of the same image, flags and concurrency.
4. Through the reference control plane and the worker's mTLS tunnel vs the local path, on the
   same warm pool: ``SELECT 42`` latency added, and the throughput of a 10M-row result
   (``--skip-tunnel`` leaves it out).

Between warm-pool repetitions the pool is left to refill and settle, untimed, so a repetition
measures checkout + query and never its own container start. Two diagnostics say where the
time goes: warm-pool reps with the pool's warm size at 0 during the query, so no container
start can run beside it (``1b*``, ``2b*``), and a sandbox start breakdown (create, start,
socket, runner Ready, remove) with the runner dialled at once, as the launcher does, and
once its socket exists.

Everything the run creates carries the label ``duckcell.launcher=bench-<pid>`` and is removed
at the end, whatever happens. Progress goes to stderr, the table to stdout, JSON to
``<output>/sandbox-<UTC>.json`` and ``<output>/latest-sandbox.json``.

This script parses the flags and wires the run; the measurements live in ``cases.py`` (the
baselines and the launcher) and ``engine.py`` (sandbox starts, engine churn, the machine), the
targets, table and JSON in ``report.py``, the tunnel case in ``tunnel.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import docker

# Run as a script from a checkout: the launcher package and bench/ sit in the repo root,
# installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cases import (
    AGGREGATE,
    POLICY,
    SELECT_42,
    InProcess,
    breakdown,
    cold_docker_run,
    paired_case,
    sustained,
)
from bench.engine import engine_churn, machine_info, sandbox_starts
from bench.entry import add_image_and_output, run_benchmark
from bench.report import render, targets
from bench.stats import Json, Progress, summarize
from bench.tunnel import tunnel_cases
from launcher.config import LauncherConfig, load_config
from launcher.host import LocalLauncher
from launcher.model.policy import PolicySet, load_policies
from launcher.sandbox.backend.base import LABEL_LAUNCHER
from launcher.sandbox.backend.docker_engine import DockerBackend


@dataclass(frozen=True, slots=True)
class Plan:
    repeat: int
    cold_repeat: int
    start_repeat: int
    sustained_queries: int
    concurrencies: tuple[int, ...]
    tunnel_repeat: int  # 0: --skip-tunnel
    tunnel_wide_repeat: int
    image: str
    output: Path


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
        result["targets"] = targets(result["cases"], result["sustained"], result.get("tunnel"))
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
    async with LocalLauncher(
        config,
        DockerBackend.for_config(config),
        policies=policies,
        warm_override=2,
        progress=progress,
    ) as lau:
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
    tunnel: Json = {}
    if plan.tunnel_repeat:
        progress(
            f"4 control plane + tunnel vs local: SELECT 42 x{plan.tunnel_repeat}, "
            f"10M-row result x{plan.tunnel_wide_repeat}"
        )
        tunnel["tunnel"] = await tunnel_cases(
            config,
            policies,
            plan.tunnel_repeat,
            plan.tunnel_wide_repeat,
            config.state_dir / "tunnel",
            progress,
        )
    throughput = []
    for concurrency in plan.concurrencies:
        throughput.append(await throughput_pair(plan, config, policies, api, concurrency, progress))
    return {"cases": cases, "sandbox_start": starts, "sustained": throughput} | tunnel


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
    parser.add_argument(
        "--skip-tunnel",
        action="store_true",
        help="leave out the control plane + tunnel vs local path case",
    )
    add_image_and_output(parser)
    args = parser.parse_args(argv)
    repeat = args.repeat or (5 if args.quick else 30)
    return Plan(
        repeat=repeat,
        cold_repeat=min(3 if args.quick else 10, repeat),
        start_repeat=2 if args.quick else 5,
        sustained_queries=10 if args.quick else 40,
        concurrencies=(2,) if args.quick else (2, 4),
        tunnel_repeat=0 if args.skip_tunnel else repeat,
        tunnel_wide_repeat=0 if args.skip_tunnel else (2 if args.quick else 5),
        image=args.image,
        output=args.output,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return run_benchmark(
        lambda launcher_id, progress: run(plan, launcher_id, progress),
        prefix="bench",
        render=render,
        output=plan.output,
        name="sandbox",
    )


if __name__ == "__main__":
    sys.exit(main())
