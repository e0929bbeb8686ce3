"""A control-plane client in a process of its own, for the tunnel and load benchmarks.

A real client is not in the worker's process. In the bench's process it would share the
worker's event loop and GIL: the result of a query would wait there while the worker releases
its sandbox and refills its pool, work the local path does after its timer stops. So the
tunnel path's client runs here, driven over stdin/stdout one line per request:

    bench -> client:  {"sql": "...", "policy": "..."}
    client -> bench:  {"seconds": s, "first_chunk": s, "bytes": n, "rows": n, "chunks": n}
                      or {"error": "..."}

The load benchmark sends a whole script instead, which the client runs back to back with no
pipe between its statements (in one session when ``session`` names a session policy: opened
first, closed last); every statement is answered, failed ones too, with the error's class,
its ``reason`` and the gRPC status code the client got:

    bench -> client:  {"script": ["...", ...], "policy": "...", "session": "" | "agent-session"}
    client -> bench:  {"queries": [{"started": epoch s, "seconds": s, "rows": n,
                                    "error": null | {"class", "reason", "code", "message"}}],
                       "session": null | {"open_s": s, "open_error": null | {...},
                                          "close_s": s, "close_error": null | {...}}}

It times each query itself (``bench.transfer.consume``: call to the last chunk decoded), so the
pipe is not in the figure. The API key comes in the environment (``BENCH_API_KEY``), never on
the command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from grpc import aio

from bench.controlplane_process import wait_or_kill
from bench.transfer import consume
from launcher.cli.allocator import tune_allocator
from launcher.client import ControlPlaneClient

STOP_TIMEOUT_S = 10.0
API_KEY_ENV = "BENCH_API_KEY"
# A script's statement that has no answer by then fails as DEADLINE_EXCEEDED, so a stuck
# query shows up in the load bench's errors instead of hanging it.
QUERY_DEADLINE_S = 300.0


class ClientProcess:
    """``async with ClientProcess(address, ca_pem, api_key) as client``; ``await
    client.run(sql, policy)`` -> the client's own timing of that query (a dict); ``await
    client.run_script(statements, policy, session=...)`` -> the script's answer (a dict)."""

    def __init__(self, address: str, ca_pem: bytes, api_key: str, work_dir: Path) -> None:
        self._argv = [sys.executable, "-m", "bench.client_process", address, str(work_dir)]
        self._ca_pem = ca_pem
        self._env = os.environ | {API_KEY_ENV: api_key}
        self._work_dir = work_dir
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ClientProcess:
        self._work_dir.mkdir(parents=True, exist_ok=True)
        (self._work_dir / "ca.pem").write_bytes(self._ca_pem)
        self._process = await asyncio.create_subprocess_exec(
            *self._argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
            cwd=Path(__file__).resolve().parent.parent,
            limit=1 << 20,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        process.stdin.close()  # end of input: the client exits
        await wait_or_kill(process, STOP_TIMEOUT_S)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def run(self, sql: str, policy: str) -> dict[str, float]:
        answer = await self._request({"sql": sql, "policy": policy})
        if "error" in answer:
            raise RuntimeError(f"the bench client's query failed: {answer['error']}")
        return dict(answer)

    async def run_script(
        self, statements: list[str], policy: str, *, session: str = ""
    ) -> dict[str, Any]:
        return await self._request({"script": statements, "policy": policy, "session": session})

    async def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(request).encode() + b"\n")
        await process.stdin.drain()
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench client exited ({await process.wait()})")
        return dict(json.loads(line))


async def serve(address: str, work_dir: Path) -> None:
    ca_pem = (work_dir / "ca.pem").read_bytes()
    loop = asyncio.get_running_loop()
    async with ControlPlaneClient(address, os.environ[API_KEY_ENV], ca_pem) as client:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            if "script" in request:
                answer = await run_script(client, request)
            else:
                try:
                    transfer = await consume(client.chunks(request["sql"], request["policy"]))
                    answer = asdict(transfer)
                except Exception as error:  # reported to the bench, which stops the run
                    answer = {"error": f"{type(error).__name__}: {error}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()


async def run_script(client: ControlPlaneClient, request: dict[str, Any]) -> dict[str, Any]:
    """Every statement back to back, each timed and answered, failed ones too."""
    session_id, session = "", None
    if request.get("session"):
        started = time.perf_counter()
        try:
            session_id = await client.open_session(request["session"], timeout_s=QUERY_DEADLINE_S)
        except Exception as error:  # nothing runs without its session
            failed = {"open_s": time.perf_counter() - started, "open_error": error_fields(error)}
            return {"queries": [], "session": failed}
        session = {"open_s": time.perf_counter() - started, "open_error": None}
    queries = []
    policy = "" if session_id else request["policy"]  # a session's own policy applies
    for sql in request["script"]:
        started_at, started = time.time(), time.perf_counter()
        try:
            chunks = client.chunks(sql, policy, timeout_s=QUERY_DEADLINE_S, session_id=session_id)
            rows, error = (await consume(chunks)).rows, None
        except Exception as failure:  # counted by class in the bench's table
            rows, error = 0, error_fields(failure)
        elapsed = time.perf_counter() - started
        queries.append({"started": started_at, "seconds": elapsed, "rows": rows, "error": error})
    if session is not None:
        started, session["close_error"] = time.perf_counter(), None
        try:
            await client.close_session(session_id, timeout_s=QUERY_DEADLINE_S)
        except Exception as error:
            session["close_error"] = error_fields(error)
        session["close_s"] = time.perf_counter() - started
    return {"queries": queries, "session": session}


def error_fields(error: Exception) -> dict[str, str]:
    """What the load bench counts a failure by: the duckcell error class, its ``reason``, and
    the gRPC status code the client got. ``ControlPlaneClient`` raises its translation ``from
    None``, which hides the ``AioRpcError`` from tracebacks but keeps it as the context."""
    rpc = error if isinstance(error, aio.AioRpcError) else error.__context__
    code = rpc.code().name if isinstance(rpc, aio.AioRpcError) else ""
    return {
        "class": type(error).__name__,
        "reason": str(getattr(error, "reason", "")),
        "code": code,
        "message": str(error)[:300],
    }


if __name__ == "__main__":
    tune_allocator()  # as `duckcell query` does
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2])))
