"""A control-plane client in a process of its own, for the tunnel benchmark.

A real client is not in the worker's process. In the bench's process it would share the
worker's event loop and GIL: the result of a query would wait there while the worker releases
its sandbox and refills its pool, work the local path does after its timer stops. So the
tunnel path's client runs here, driven over stdin/stdout one line per query:

    bench -> client:  {"sql": "...", "policy": "..."}
    client -> bench:  {"seconds": s, "first_chunk": s, "bytes": n, "rows": n, "chunks": n}
                      or {"error": "..."}

It times each query itself (``bench.tunnel.consume``: call to the last chunk decoded), so the
pipe is not in the figure. The API key comes in the environment (``BENCH_API_KEY``), never on
the command line.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from bench.controlplane_process import wait_or_kill
from launcher.cli.allocator import tune_allocator
from launcher.client import ControlPlaneClient

STOP_TIMEOUT_S = 10.0
API_KEY_ENV = "BENCH_API_KEY"


class ClientProcess:
    """``async with ClientProcess(address, ca_pem, api_key) as client``; ``await
    client.run(sql, policy)`` -> the client's own timing of that query (a dict)."""

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

    async def run(self, sql: str, policy: str) -> dict[str, float]:
        process = self._process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps({"sql": sql, "policy": policy}).encode() + b"\n")
        await process.stdin.drain()
        line = await process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench client exited ({await process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the bench client's query failed: {answer['error']}")
        return dict(answer)


async def serve(address: str, work_dir: Path) -> None:
    from bench.tunnel import consume  # not at the top: bench.tunnel imports this module

    ca_pem = (work_dir / "ca.pem").read_bytes()
    loop = asyncio.get_running_loop()
    async with ControlPlaneClient(address, os.environ[API_KEY_ENV], ca_pem) as client:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            try:
                transfer = await consume(client.chunks(request["sql"], request["policy"]))
                answer = asdict(transfer)
            except Exception as error:  # reported to the bench, which stops the run
                answer = {"error": f"{type(error).__name__}: {error}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    tune_allocator()  # as `duckcell query` does
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2])))
