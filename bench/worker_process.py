"""``duckcell worker`` in a process of its own, as it is deployed, for the load benchmark.

The bench enrolls it first (``launcher.worker.enroll.enroll`` with a token it mints, as
``tunnel.py`` does), then starts ``python -m launcher.cli ... worker --state STATE`` with the
bench's launcher settings, and waits until the control plane's registry says it is online. The
worker fills its warm pools at start, keeps its own audit (``STATE/audit.jsonl``) and drains on
SIGTERM: it takes no new query, lets running ones end within ``--drain-grace``, removes its
sandboxes and exits 0 (then SIGKILL after a deadline).

Its log goes to ``STATE/worker.log``, a file rather than a pipe, so a worker that logs a lot
under load can never block on a bench that is busy elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.controlplane_process import ControlPlaneProcess, wait_or_kill
from launcher.config import LauncherConfig
from launcher.controlplane.registry import WorkerRegistry
from launcher.worker.audit import AUDIT_FILE, read_audit
from launcher.worker.enroll import enroll

ONLINE_TIMEOUT_S = 60.0
DRAIN_GRACE_S = 10.0
STOP_TIMEOUT_S = DRAIN_GRACE_S + 30.0  # the drain, then removing the sandboxes
LOG_FILE = "worker.log"
AUDIT_READ_ATTEMPTS = 5


class WorkerProcess:
    """``async with WorkerProcess(control_plane, config, state) as worker``: ``worker.pid``,
    ``worker.audit()`` (its audit records so far); leaving the block drains and stops it."""

    def __init__(self, control_plane: ControlPlaneProcess, config: LauncherConfig, state: Path):
        self._control_plane = control_plane
        self._config = config
        self.state = state
        self._process: asyncio.subprocess.Process | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def audit(self) -> list[dict[str, Any]]:
        """One record per query that has ended so far (``launcher.worker.audit.read_audit``: the
        file as its tools read it). A line caught half-written is read again a moment later."""
        for _ in range(AUDIT_READ_ATTEMPTS - 1):
            with contextlib.suppress(json.JSONDecodeError):
                return read_audit(self.state / AUDIT_FILE)
            time.sleep(0.01)
        return read_audit(self.state / AUDIT_FILE)

    def log_tail(self, lines: int = 20) -> str:
        path = self.state / LOG_FILE
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])

    async def __aenter__(self) -> WorkerProcess:
        data = self._control_plane.data
        token = data.tokens().create()
        identity = await enroll(self._control_plane.address, token, self.state, "bench-load")
        config = self._config
        argv = [sys.executable, "-m", "launcher.cli", "--state-dir", str(config.state_dir)]
        argv += ["--policies-dir", str(config.policies_dir), "--image", config.image]
        argv += ["--launcher-id", config.launcher_id, "worker", "--state", str(self.state)]
        argv += ["--drain-grace", f"{DRAIN_GRACE_S:g}"]
        with (self.state / LOG_FILE).open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=Path(__file__).resolve().parent.parent,
            )
        try:
            with contextlib.closing(data.database()) as conn:
                await self._online(WorkerRegistry(conn), identity.worker_id)
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stop()

    async def _online(self, registry: WorkerRegistry, worker_id: str) -> None:
        """Until the control plane records the worker's Hello (its registry, in SQLite)."""
        assert self._process is not None
        deadline = time.monotonic() + ONLINE_TIMEOUT_S
        while True:
            worker = registry.get(worker_id)
            if worker is not None and worker.online:
                return
            if self._process.returncode is not None:
                raise RuntimeError(f"the worker exited before it was online:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker was not online in time:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    async def _stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)  # drain: the worker removes its own sandboxes
        await wait_or_kill(process, STOP_TIMEOUT_S)
        self.returncode = process.returncode
