"""A real ``Worker`` over ``FakeBackend``: the unit tier's worker, wired the way the CLI wires one.

``fake_worker`` enrolls a worker with the control plane of ``tests.support.controlplane``, starts
it (host, audit log, tunnel) with sandboxes that are real runners and real DuckDB in-process
(``FakeBackend``, no Docker), waits until its tunnel is up and, on the way out, stops it and
checks it left no sandbox behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from launcher.config import load_config
from launcher.executor import QueryRecord
from launcher.model.policy import PolicySet, load_policy_text
from launcher.worker.audit import AUDIT_FILE
from launcher.worker.daemon import Worker

from .controlplane import DEADLINE_S, FAST, ControlPlane
from .fakes import FakeBackend


@asynccontextmanager
async def fake_worker(
    control_plane: ControlPlane,
    state: Path,
    policies: Sequence[str],
    *,
    capacity: int = 8,
    drain_grace_s: float = 30.0,
    warm_override: int | None = None,
    on_finished: Callable[[QueryRecord], None] | None = None,
) -> AsyncIterator[Worker]:
    """A connected worker whose state (identity, audit log ``AUDIT_FILE``) is in ``state``.
    Its pools warm as the policies say, in the background, unless ``warm_override`` is given
    (0: every sandbox starts on demand, so the live ones are the ones queries hold)."""
    identity = await control_plane.enroll(state)
    config = load_config(
        flags={"state_dir": state, "image": "img", "max_sandboxes": capacity, "kill_grace_s": 1},
        env={},
    )
    backend = FakeBackend()
    worker = Worker(
        identity,
        config,
        backend=backend,
        policies=PolicySet([load_policy_text(text, "<test>") for text in policies]),
        audit_file=state / AUDIT_FILE,
        backoff=FAST,
        drain_grace_s=drain_grace_s,
        warm_override=warm_override,
        on_finished=on_finished,
    )
    async with worker:  # leaving it stops the tunnel (unless stopped) and closes the host
        worker.start()
        await worker.connected(DEADLINE_S)
        yield worker
    assert backend.live() == 0, "the worker left a sandbox behind"
