"""The reference control plane in a process of its own, as it is deployed, for the benchmarks.

Started as ``python -m launcher.cli controlplane serve`` on free loopback ports, ready once it
prints its "listening" line, stopped with SIGTERM (then SIGKILL after a deadline). Its data
directory is shared with the bench, which mints the enrollment token and the API key through
``ControlPlaneData`` (SQLite allows both processes).

In one process with the worker, the control plane's loop and the worker's share one GIL and
two cores' worth of scheduling: every hop of a query waits for the other side's Python. A
process of its own measures what a user deploying it gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path

from launcher.controlplane.datadir import ControlPlaneData

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
_READY = "control plane listening on"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ControlPlaneProcess:
    """``async with ControlPlaneProcess(data, flight=True) as cp``: ``cp.address`` (clients,
    enrollment), ``cp.flight_location`` (ADBC) and ``cp.data``."""

    def __init__(self, data: ControlPlaneData, *, flight: bool = False) -> None:
        self.data = data
        self.address = f"127.0.0.1:{free_port()}"
        self.tunnel_address = f"127.0.0.1:{free_port()}"
        self.flight_address = f"127.0.0.1:{free_port()}" if flight else ""
        self._process: asyncio.subprocess.Process | None = None
        self._log: list[str] = []

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def flight_location(self) -> str:
        if not self.flight_address:
            raise RuntimeError("this control plane was started without Flight SQL")
        return f"grpc+tls://{self.flight_address}"

    async def __aenter__(self) -> ControlPlaneProcess:
        self.data.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        command = [
            sys.executable,
            "-m",
            "launcher.cli",
            "controlplane",
            "serve",
            "--data",
            str(self.data.root),
            "--listen",
            self.address,
            "--tunnel-listen",
            self.tunnel_address,
        ]
        if self.flight_address:
            command += ["--flight-listen", self.flight_address]
        self._process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            await asyncio.wait_for(self._ready(), READY_TIMEOUT_S)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _ready(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        while True:
            line = await self._process.stderr.readline()
            if not line:
                log = "".join(self._log[-20:])
                raise RuntimeError(f"the control plane exited before it was ready:\n{log}")
            text = line.decode(errors="replace")
            self._log.append(text)
            if _READY in text:
                # Keep reading its log, or a full pipe would block the control plane.
                asyncio.get_running_loop().create_task(self._drain_log())
                return

    async def _drain_log(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        while await self._process.stderr.readline():
            pass

    async def _stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        await wait_or_kill(process, STOP_TIMEOUT_S)


async def wait_or_kill(process: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Wait for ``process`` to exit once told to; kill it if it has not within ``timeout_s``."""
    try:
        await asyncio.wait_for(process.wait(), timeout_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
