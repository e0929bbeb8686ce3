"""One parser process of ``launcher.model.sql.pool``: started, asked, measured, stopped.

The child gets a minimal environment (this Python's module path, ``PATH``): the worker's own
environment may hold secrets that catalogs refer to, and a process parsing any client's SQL
has no use for them. It runs in a session of its own, so a Ctrl-C meant for the CLI does not
reach it; it exits by itself when its stdin closes, which also happens when the parent dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence

from ...resources import PACKAGE_DIR
from .parsed import HEADER

# The directory holding the ``launcher`` package: the child imports it from there.
_ROOT = str(PACKAGE_DIR.parent)
_PAGE = os.sysconf("SC_PAGE_SIZE")
_STOP_WAIT_S = 2.0


class Child:
    """A running parser process; one request at a time (the pool sees to it)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.pid = process.pid

    @classmethod
    async def spawn(cls, command: Sequence[str]) -> Child:
        """Start ``command``; raises OSError when it cannot be started."""
        env = {"PYTHONPATH": _ROOT, "PATH": os.environ.get("PATH", os.defpath)}
        if "LD_LIBRARY_PATH" in os.environ:  # a Python built against its own libraries
            env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,
            limit=2**20,
        )
        return cls(process)

    @property
    def alive(self) -> bool:
        """Running: not reaped, and not a zombie waiting to be (killed a moment ago)."""
        if self._process.returncode is not None:
            return False
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as stat:
                return stat.read().rsplit(b") ", 1)[-1][:1] not in (b"Z", b"X")
        except FileNotFoundError:
            return False
        except OSError:  # no /proc here: trust the return code
            return True

    async def ask(self, data: bytes) -> bytes:
        """Send one request and read its answer. Raises OSError or IncompleteReadError when
        the child is gone."""
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(HEADER.pack(len(data)))
        self._process.stdin.write(data)
        await self._process.stdin.drain()
        (size,) = HEADER.unpack(await self._process.stdout.readexactly(HEADER.size))
        return await self._process.stdout.readexactly(size)

    def rss_bytes(self) -> int:
        """The child's resident memory now (0 when it cannot be read: no /proc, or gone)."""
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as statm:
                return int(statm.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return 0

    async def ended(self) -> str:
        """How the child ended ("exit code 3", "killed by SIGKILL"), once it has."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._process.wait(), _STOP_WAIT_S)
        code = self._process.returncode
        if code is None:
            return "it closed its pipes"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def stop(self) -> None:
        """Close its stdin (it exits), kill it if it has not within a moment, reap it."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), _STOP_WAIT_S)
        except TimeoutError:
            self.kill()
            await self._process.wait()
