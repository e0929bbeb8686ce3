#!/usr/bin/env python3
"""What ``duckcell mcp`` (local mode, stdio) costs an agent client, measured in one run.

The client is the real MCP SDK's ``Client`` spawning ``python -m launcher.cli mcp`` as an agent
client does (the repository's sample catalog, policy ``agent-session``, no warm pool), once
per conversation. Per conversation:

* server start + ``initialize`` handshake (``Client`` entered: process start, imports, the
  embedded launcher, the handshake);
* the first ``run_sql`` (``SELECT 42``), which opens the conversation's session sandbox;
* ``SELECT 42`` through ``run_sql`` in that session, N times, interleaved call by call with the
  same statement in a session sandbox of the same policy opened by this process without MCP:
  ``LocalBackend.chunks`` (what the tool calls: the sample catalog's data path, then
  ``Executor.run_query`` in the session) decoded to a table, and, as a diagnostic, plain
  ``Executor.run_query`` in that session with no data path;
* a result cut to the answer's bounds (``SELECT * FROM range(1000000)``: the tool returns the
  first rows and counts the rest): time and answer size, against the whole result fetched
  without MCP;
* close (``Client`` exited: stdin closed, the server ends the session and exits) and the time
  until the session's container is gone.

The MCP server's CPU (``/proc``) over the ``SELECT 42`` calls is read per call: on these two
cores the server's Python is what a call costs beyond the sandbox.

Every container carries a ``duckcell.launcher=mcp-<pid>`` label (``...-srv`` for the servers')
and is removed at the end, whatever happens. Progress goes to stderr, the table to stdout, JSON
to ``<output>/mcp-<UTC>.json`` and ``<output>/latest-mcp.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pyarrow as pa
import pyarrow.ipc
from mcp import Client, StdioServerParameters

# Run as a script from a checkout: the launcher package and bench/ sit in the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.engine import remove_leftovers
from bench.entry import add_image_and_output, run_benchmark
from bench.stats import Json, Progress, cpu_seconds_of, cpu_spent, process_tree, summarize
from launcher.cli.secrets import secret_store
from launcher.config import load_config
from launcher.data.cache import ObjectCache
from launcher.data.datapath import DataPath
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.mcp.local import LocalBackend
from launcher.model.catalog import load_catalog
from launcher.model.sql import ParserPool
from launcher.sandbox.backend.base import LABEL_LAUNCHER
from launcher.sandbox.backend.docker_engine import DockerBackend

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CATALOG = REPO / "sample_data" / "catalog.yaml"
POLICY = "agent-session"
SELECT_42 = "SELECT 42"
BIG = "SELECT * FROM range(1000000)"
BIG_ROWS = 1_000_000
GONE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Plan:
    conversations: int  # MCP servers started, one conversation each
    reps: int  # SELECT 42 calls per conversation, per path
    big_reps: int  # bounded-result calls per conversation, per path
    image: str
    output: Path


@dataclass(slots=True)
class Samples:
    start_s: list[float] = field(default_factory=list)
    first_s: list[float] = field(default_factory=list)
    close_s: list[float] = field(default_factory=list)
    gone_s: list[float] = field(default_factory=list)  # close -> no container left
    mcp_s: list[float] = field(default_factory=list)
    direct_s: list[float] = field(default_factory=list)
    direct_no_catalog_s: list[float] = field(default_factory=list)
    big_mcp_s: list[float] = field(default_factory=list)
    big_direct_s: list[float] = field(default_factory=list)
    big_answer_bytes: list[int] = field(default_factory=list)
    big_answer: Json = field(default_factory=dict)
    big_direct_bytes: int = 0
    server_cpu_s: float = 0.0  # the MCP servers' CPU over every SELECT 42 call
    bench_cpu_s: float = 0.0  # this process's CPU (client and the direct path) over the same
    sessions_per_conversation: list[int] = field(default_factory=list)


async def run(plan: Plan, launcher_id: str, progress: Progress) -> Json:
    started_utc = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    loadavg_start = os.getloadavg()[0]
    state_dir = Path(tempfile.mkdtemp(prefix="dcm"))
    server_id = f"{launcher_id}-srv"
    try:
        samples = await measure(plan, launcher_id, server_id, state_dir, progress)
    finally:
        remove_leftovers(server_id)  # the servers' containers carry their own launcher id
        shutil.rmtree(state_dir, ignore_errors=True)
    plan_json = asdict(plan) | {"output": str(plan.output), "launcher_id": launcher_id}
    return summary(samples) | {
        "schema": 1,
        "date_utc": started_utc,
        "nproc": os.cpu_count(),
        "loadavg": [loadavg_start, os.getloadavg()[0]],
        "plan": plan_json,
        "policy": POLICY,
        "queries": {"select42": SELECT_42, "big": BIG},
    }


def summary(s: Samples) -> Json:
    mcp, direct = summarize(s.mcp_s), summarize(s.direct_s)
    calls = len(s.mcp_s)
    return {
        "start_initialize": summarize(s.start_s),
        "first_statement": summarize(s.first_s),
        "select42": {
            "mcp": mcp,
            "direct": direct,
            "direct_no_catalog": summarize(s.direct_no_catalog_s),
        },
        "added_p50_ms": mcp["median_ms"] - direct["median_ms"],
        "added_p95_ms": mcp["p95_ms"] - direct["p95_ms"],
        "ratio_p50": mcp["median_ms"] / direct["median_ms"],
        "server_cpu_ms_per_call": s.server_cpu_s / calls * 1000,
        "bench_cpu_ms_per_rep": s.bench_cpu_s / calls * 1000,
        "big": {
            "mcp": summarize(s.big_mcp_s),
            "direct": summarize(s.big_direct_s),
            "answer_bytes": max(s.big_answer_bytes),
            "answer": s.big_answer,
            "direct_arrow_bytes": s.big_direct_bytes,
        },
        "close": summarize(s.close_s),
        "close_to_no_container": summarize(s.gone_s),
        "sessions_per_conversation": s.sessions_per_conversation,
    }


def server_env(plan: Plan, server_id: str, state_dir: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": str(REPO),
        "DUCKCELL_IMAGE": plan.image,
        "DUCKCELL_STATE_DIR": str(state_dir / "mcp"),
        "DUCKCELL_LAUNCHER_ID": server_id,
        "GRPC_VERBOSITY": "ERROR",
    }


async def measure(
    plan: Plan, launcher_id: str, server_id: str, state_dir: Path, progress: Progress
) -> Samples:
    """The direct path's launcher and session live for the whole run; an MCP server per
    conversation beside it."""
    flags = {"state_dir": state_dir / "direct", "image": plan.image, "launcher_id": launcher_id}
    config = load_config(flags=flags)
    parser = ParserPool(size=1)
    await parser.start()
    cache = ObjectCache(config.cache_root, budget_bytes=config.cache_budget_bytes)
    data = DataPath(
        load_catalog(SAMPLE_CATALOG), cache, parser=parser, secrets=secret_store(config.state_dir)
    )
    config = dataclasses.replace(config, cache_dir=cache.root)
    samples = Samples()
    api = docker.from_env().api
    try:
        async with LocalLauncher(
            config, DockerBackend.for_config(config), warm_override=0, progress=progress
        ) as launcher:
            backend = LocalBackend(launcher, data, POLICY)
            session_id = await backend.open_session()
            direct = DirectPath(launcher, backend, session_id)
            await direct.fetch(SELECT_42)  # warm-up: first RPC, lazy imports
            env = server_env(plan, server_id, state_dir)
            for n in range(plan.conversations):
                await conversation(plan, env, direct, samples, api, server_id, progress)
                progress(
                    f"conversation {n + 1}/{plan.conversations}: start "
                    f"{samples.start_s[-1] * 1000:.0f} ms, first statement "
                    f"{samples.first_s[-1] * 1000:.0f} ms, SELECT 42 p50 mcp "
                    f"{_p50(samples.mcp_s):.2f} ms / direct {_p50(samples.direct_s):.2f} ms, "
                    f"close {samples.close_s[-1] * 1000:.0f} ms"
                )
            await backend.close_session(session_id)
    finally:
        api.close()
        await cache.close()
        await parser.close()
    return samples


def _p50(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] * 1000


@dataclass(frozen=True, slots=True)
class DirectPath:
    """The same statement in a session sandbox of the same policy, with no MCP in between."""

    launcher: LocalLauncher
    backend: LocalBackend
    session_id: str

    async def fetch(self, sql: str) -> pa.Table:
        """What the ``run_sql`` tool runs (``LocalBackend.chunks``), decoded to a table."""
        parts = [chunk async for chunk in self.backend.chunks(sql, self.session_id)]
        return pa.ipc.open_stream(b"".join(parts)).read_all()

    async def fetch_no_catalog(self, sql: str) -> pa.Table:
        """Diagnostic: ``Executor.run_query`` in the session with no data path."""
        async with self.launcher.executor.run_query(sql, session_id=self.session_id) as run:
            return await collect_table(run)


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call()
    return time.perf_counter() - started, result


async def run_sql(client: Client, sql: str) -> Any:
    answer = await client.call_tool("run_sql", {"sql": sql})
    if answer.is_error:
        raise RuntimeError(f"run_sql {sql!r} failed: {answer.content[0].text}")
    return answer


async def conversation(
    plan: Plan,
    env: dict[str, str],
    direct: DirectPath,
    s: Samples,
    api: docker.APIClient,
    server_id: str,
    progress: Progress,
) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "launcher.cli", "mcp"], env=env, cwd=str(REPO)
    )
    client = Client(params, read_timeout_seconds=120)
    async with contextlib.AsyncExitStack() as stack:
        elapsed, _ = await timed(lambda: stack.enter_async_context(client))
        s.start_s.append(elapsed)
        server_pids = [pid for pid in process_tree(os.getpid()) if _is_mcp_server(pid)]
        elapsed, _ = await timed(lambda: run_sql(client, SELECT_42))
        s.first_s.append(elapsed)
        await run_sql(client, SELECT_42)  # the session's second call: out of the samples
        await direct.fetch(SELECT_42)
        watched = [*server_pids, os.getpid()]
        before = cpu_seconds_of(watched)
        for _ in range(plan.reps):
            elapsed, answer = await timed(lambda: run_sql(client, SELECT_42))
            if answer.structured_content["rows"] != [[42]]:
                raise RuntimeError(f"run_sql SELECT 42 answered {answer.structured_content}")
            s.mcp_s.append(elapsed)
            elapsed, table = await timed(lambda: direct.fetch(SELECT_42))
            if table.column(0).to_pylist() != [42]:
                raise RuntimeError(f"the direct path answered {table}")
            s.direct_s.append(elapsed)
            elapsed, _ = await timed(lambda: direct.fetch_no_catalog(SELECT_42))
            s.direct_no_catalog_s.append(elapsed)
        after = cpu_seconds_of(watched)
        s.server_cpu_s += cpu_spent(
            {p: before[p] for p in server_pids if p in before},
            {p: after[p] for p in server_pids if p in after},
        )
        s.bench_cpu_s += after.get(os.getpid(), 0.0) - before.get(os.getpid(), 0.0)
        for _ in range(plan.big_reps):
            elapsed, answer = await timed(lambda: run_sql(client, BIG))
            content = answer.structured_content
            if content["counted_rows"] != BIG_ROWS or not content["truncated"]:
                raise RuntimeError(f"the bounded result was not cut as expected: {content}")
            s.big_mcp_s.append(elapsed)
            s.big_answer_bytes.append(len(answer.model_dump_json(by_alias=True).encode()))
            s.big_answer = {
                k: content[k] for k in ("returned_rows", "total_rows", "counted_rows", "truncation")
            }
            elapsed, table = await timed(lambda: direct.fetch(BIG))
            if table.num_rows != BIG_ROWS:
                raise RuntimeError(f"the direct path returned {table.num_rows} rows")
            s.big_direct_s.append(elapsed)
            s.big_direct_bytes = table.nbytes
        s.sessions_per_conversation.append(len(_containers(api, server_id)))
        started = time.perf_counter()
    s.close_s.append(time.perf_counter() - started)
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while _containers(api, server_id):
        if time.monotonic() > deadline:
            raise RuntimeError("the MCP server's session container outlived its conversation")
        await asyncio.sleep(0.02)
    s.gone_s.append(time.perf_counter() - started)


def _is_mcp_server(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"launcher.cli" in argv and b"mcp" in argv


def _containers(api: docker.APIClient, launcher_id: str) -> list[Json]:
    return api.containers(all=True, filters={"label": f"{LABEL_LAUNCHER}={launcher_id}"})


def render(result: Json) -> str:
    def row(title: str, case: Json, extra: str = "") -> str:
        times = f"{case['median_ms']:>10.2f}{case['p95_ms']:>10.2f}"
        return f"{title:<58}{case['n']:>4}{times}  {extra}"

    s42, big = result["select42"], result["big"]
    lines = [
        f"duckcell MCP benchmark (local mode, stdio), {result['date_utc']}, nproc "
        f"{result['nproc']}, load average (1 min) {result['loadavg'][0]:.2f} at start, "
        f"{result['loadavg'][1]:.2f} at end; policy {result['policy']}, "
        f"{result['plan']['conversations']} conversations",
        "",
        f"{'case':<58}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}",
        row("server start + initialize handshake", result["start_initialize"]),
        row("first run_sql (opens the session sandbox)", result["first_statement"]),
        row(
            "SELECT 42 via MCP run_sql, in the session",
            s42["mcp"],
            f"{result['added_p50_ms']:+.2f} ms p50, {result['added_p95_ms']:+.2f} ms p95, "
            f"{result['ratio_p50']:.2f}x",
        ),
        row("SELECT 42 same session policy, no MCP (LocalBackend)", s42["direct"], "baseline"),
        row("diag: no MCP, no data path (Executor.run_query)", s42["direct_no_catalog"]),
        row(
            "range(1000000) via MCP, cut to the bounds",
            big["mcp"],
            f"answer {big['answer_bytes'] / 1000:.1f} kB, {big['answer']['returned_rows']} rows "
            f"of {big['answer']['counted_rows']} counted",
        ),
        row(
            "range(1000000) no MCP, whole result",
            big["direct"],
            f"{big['direct_arrow_bytes'] / 1e6:.0f} MB Arrow",
        ),
        row("close (stdin closed -> server exited)", result["close"]),
        row("close -> session container removed", result["close_to_no_container"]),
        "",
        f"MCP server CPU per SELECT 42 call: {result['server_cpu_ms_per_call']:.2f} ms; this "
        f"process (client + both direct paths) per rep: {result['bench_cpu_ms_per_rep']:.2f} ms",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Plan:
    parser = argparse.ArgumentParser(
        description="Benchmark `duckcell mcp` (local, stdio) with the MCP SDK's client against "
        "the same statements in a session sandbox without MCP."
    )
    parser.add_argument("--conversations", type=int, default=5, help="MCP servers started (5)")
    parser.add_argument("--reps", type=int, default=60, help="SELECT 42 per conversation (60)")
    parser.add_argument("--big-reps", type=int, default=3, help="bounded results per conv. (3)")
    parser.add_argument("--quick", action="store_true", help="1 conversation, 10 reps, 1 big")
    add_image_and_output(parser)
    args = parser.parse_args(argv)
    if min(args.conversations, args.reps, args.big_reps) < 1:
        parser.error("--conversations, --reps and --big-reps must be at least 1")
    return Plan(
        conversations=1 if args.quick else args.conversations,
        reps=10 if args.quick else args.reps,
        big_reps=1 if args.quick else args.big_reps,
        image=args.image,
        output=args.output,
    )


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    return run_benchmark(
        lambda launcher_id, progress: run(plan, launcher_id, progress),
        prefix="mcp",
        render=render,
        output=plan.output,
        name="mcp",
    )


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    sys.exit(main())
