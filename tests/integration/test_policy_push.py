"""A policy edited on the control plane reaches a running worker, with real sandboxes.

One worker enrolls and connects; it starts with its own policies (the ``tight`` ones of the
integration tier). The control plane then gets its own ``tight`` and ``tight-session``, with
other DuckDB settings, while the worker runs: the next query shows the new settings, read back
with ``current_setting``, over the same tunnel (no restart, no reconnect). The idle warm
sandbox of the old version is removed; a query running across the edit, and a session opened
before it, keep the old version until they end; once the worker stops none of its sandboxes is
left in ``docker ps -a``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import docker
import pytest

from launcher.client import ControlPlaneClient
from launcher.config import LauncherConfig
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.policies import apply_policies
from launcher.sandbox.backend.base import LABEL_LAUNCHER, LABEL_POLICY
from launcher.worker.daemon import Worker
from tests.support.controlplane import DEADLINE_S, FAST, ControlPlane
from tests.support.waiting import eventually

from .conftest import containers_of, make_config

pytestmark = pytest.mark.docker

SETTINGS = (
    "SELECT current_setting('threads')::INT AS threads, "
    "current_setting('memory_limit') AS memory_limit"
)


def _edited(policies_dir: Path, target: Path, name: str) -> Path:
    """The worker's own policy with other DuckDB settings, as an admin would edit it."""
    text = (policies_dir / f"{name}.yaml").read_text()
    text = text.replace("threads: 1", "threads: 2").replace(
        "memory_limit: 128MiB", "memory_limit: 96MiB"
    )
    assert "threads: 2" in text and "96MiB" in text
    target.mkdir(exist_ok=True)
    path = target / f"{name}.yaml"
    path.write_text(text)
    return path


def _of_policy(engine: docker.DockerClient, config: LauncherConfig, policy: str) -> set[str]:
    labels = [f"{LABEL_LAUNCHER}={config.launcher_id}", f"{LABEL_POLICY}={policy}"]
    # Sparse: no inspect per container, which would race with the removals under test.
    found = engine.containers.list(all=True, sparse=True, filters={"label": labels})
    return {c.id for c in found}


def test_a_policy_edit_on_the_control_plane_reaches_a_running_worker(
    image: str, policies_dir: Path, engine: docker.DockerClient, tmp_path: Path
) -> None:
    data = ControlPlaneData(tmp_path / "cp")
    control_plane = ControlPlane(data)
    config = make_config(image, policies_dir)
    edits = [_edited(policies_dir, tmp_path / "edits", name) for name in ("tight", "tight-session")]

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        async with Worker(
            identity, config, backoff=FAST, warm_override=2, accept_policies=True
        ) as worker:
            launcher, tunnel = worker.host, worker.tunnel
            worker.start()
            await worker.connected(DEADLINE_S)
            assert control_plane.server is not None
            client = ControlPlaneClient(
                control_plane.server.address,
                data.api_keys().create("analyst"),
                data.ca().cert_pem(),
            )
            try:
                before = (await client.table(SETTINGS, "tight")).to_pylist()[0]
                assert before["threads"] == 1
                session = await client.open_session("tight-session")
                await launcher.pool_for(launcher.policies.get("tight")).wait_warm(60)
                old_warm = _of_policy(engine, config, "tight")
                assert old_warm, "the old version keeps a warm sandbox"

                # A query running across the edit finishes under the version it started with.
                slow = asyncio.create_task(
                    client.table(f"{SETTINGS}, sleep_ms(1200) IS NULL AS slept", "tight")
                )
                old_pool = launcher.pool_for(launcher.policies.get("tight"))
                await eventually(lambda: old_pool.stats()["busy"] == 1, "the slow query runs", 60)

                documents, _ = apply_policies(data.root, edits)
                applied = time.monotonic()
                await eventually(
                    lambda: tunnel.policies_revision == documents.revision,
                    "the worker takes the pushed policies",
                    60,
                )
                # Within the control plane's poll interval (1 s) and a tunnel round trip.
                print(f"policy push reached the worker in {time.monotonic() - applied:.2f} s")
                assert time.monotonic() - applied < 5
                assert not slow.done()
                # The old version's idle sandbox is being removed; the running one is kept.
                assert old_pool.stats()["ready"] == 0 and old_pool.stats()["busy"] == 1
                assert (await slow).to_pylist()[0]["threads"] == 1
                after = (await client.table(SETTINGS, "tight")).to_pylist()[0]
                assert after["threads"] == 2
                assert after["memory_limit"] != before["memory_limit"]
                # The session opened under the old version keeps it until it ends.
                in_session = await client.table(SETTINGS, session_id=session)
                assert in_session.to_pylist()[0]["threads"] == 1
                await eventually(
                    lambda: not old_warm & _of_policy(engine, config, "tight"),
                    "every sandbox of the old version is removed once unused",
                    60,
                )
                assert tunnel.connections == 1  # the same tunnel all along: no restart
                await client.close_session(session)
            finally:
                await client.close()
        assert containers_of(engine, config.launcher_id) == []

    try:
        asyncio.run(asyncio.wait_for(scenario(), 240))
    finally:
        control_plane.close()
