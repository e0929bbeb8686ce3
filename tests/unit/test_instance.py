"""Orphan reaping: only sandboxes whose launcher process is gone are removed."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

from launcher.sandbox.backend.base import SandboxSpec
from launcher.sandbox.instance import InstanceLock, instance_alive, reap_orphans
from tests.support.fakes import FakeBackend


def _hold_lock_and_die(instances_dir: str, queue: multiprocessing.Queue) -> None:
    lock = InstanceLock(Path(instances_dir))
    queue.put(lock.instance_id)  # exits without releasing: like a crash


def _spec(name: str, instance: str) -> SandboxSpec:
    return SandboxSpec(
        name=name,
        image="img",
        runtime="runc",
        user="1",
        cpus=1,
        memory_bytes=1,
        pids=1,
        scratch_bytes=1,
        tmp_bytes=1,
        nofile=1,
        files_dir=None,
        labels={"duckcell.launcher": "L", "duckcell.instance": instance},
        environment={"DUCKCELL_RUNNER_CONFIG": "{}"},
    )


def test_reaps_dead_instances_only(tmp_path: Path) -> None:
    instances = tmp_path / "instances"
    queue: multiprocessing.Queue = multiprocessing.Queue()
    process = multiprocessing.Process(target=_hold_lock_and_die, args=(str(instances), queue))
    process.start()
    dead = queue.get(timeout=10)
    process.join()
    live = InstanceLock(instances)
    me = InstanceLock(instances)
    assert instance_alive(instances, live.instance_id)
    assert not instance_alive(instances, dead)

    backend = FakeBackend()

    async def scenario() -> None:
        await backend.create(_spec("duckcell-dead", dead))
        await backend.create(_spec("duckcell-live", live.instance_id))
        await backend.create(_spec("duckcell-mine", me.instance_id))
        report = await reap_orphans(
            backend,
            launcher_id="L",
            instances_dir=instances,
            run_dir=tmp_path / "run",
            own_instance=me.instance_id,
        )
        assert report.removed == ("duckcell-dead",)
        assert report.kept_live == 2

    asyncio.run(scenario())
    assert not (instances / f"{dead}.lock").exists()
    live.release()
    me.release()
