"""What the control plane and the worker's tunnel add over the local path, on the same warm pool.

The local path is ``LocalLauncher.execute`` in this process. The tunnel path is a
``ControlPlaneClient`` -> the reference control plane (TLS) -> the worker's mTLS tunnel ->
the same launcher's executor -> the same pool. The control plane runs in its own process
(``controlplane_process``), and so does the client (``client_process``), as they are deployed;
the worker is this process, as the local path is.

Two cases, local and tunnel reps interleaved so both see the same background load:

* ``SELECT 42``: latency, the pool refilled and settled (untimed) before every rep;
* a 10M-row, two-int64-column result: bytes/s from the call to the last chunk decoded, the
  same consumer for both paths (collect the IPC chunks, decode with pyarrow, count rows).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from bench.cases import POLICY, SELECT_42, settle
from bench.client_process import ClientProcess
from bench.controlplane_process import ControlPlaneProcess
from bench.stats import Json, MachineCpu, Progress, summarize
from bench.transfer import Transfer, consume
from launcher.config import LauncherConfig
from launcher.controlplane.datadir import ControlPlaneData
from launcher.host import LocalLauncher
from launcher.model.policy import PolicySet
from launcher.sandbox.pool import SandboxPool
from launcher.worker.daemon import Worker
from launcher.worker.enroll import enroll

WIDE = "SELECT i, i * 2 AS j FROM range(10000000) t(i)"
WIDE_ROWS = 10_000_000
CONNECT_TIMEOUT_S = 30.0


async def tunnel_cases(
    config: LauncherConfig,
    policies: PolicySet,
    reps: int,
    wide_reps: int,
    work_dir: Path,
    progress: Progress,
) -> Json:
    """Both cases through one control plane, one enrolled worker and one warm pool."""
    async with ControlPlaneProcess(ControlPlaneData(work_dir / "cp")) as control_plane:
        address, data = control_plane.address, control_plane.data
        identity = await enroll(address, data.tokens().create(), work_dir / "worker", "bench")
        async with Worker(
            identity, config, policies=policies, warm_override=2, progress=progress
        ) as worker:
            pool = await worker.host.warm(POLICY)
            worker.start()
            await worker.connected(CONNECT_TIMEOUT_S)
            api_key = data.api_keys().create("analyst")
            ca_pem = data.ca().cert_pem()
            async with ClientProcess(address, ca_pem, api_key, work_dir / "client") as client:
                paths = Paths(worker.host, client)
                latency = await latency_case(paths, pool, reps, progress)
                throughput = await throughput_case(paths, pool, wide_reps, progress)
    return {"queries": {"select42": SELECT_42, "wide": WIDE}} | latency | throughput


@dataclass(frozen=True, slots=True)
class Paths:
    """Both paths timed the same way (``consume``); the tunnel's in the client's process."""

    launcher: LocalLauncher
    client: ClientProcess

    async def local_select(self) -> float:
        return (await self.local_wide(SELECT_42)).seconds

    async def tunnel_select(self) -> float:
        return (await self.tunnel_wide(SELECT_42)).seconds

    async def local_wide(self, sql: str = WIDE) -> Transfer:
        async with self.launcher.run_query(sql, policy=POLICY) as execution:
            return await consume(execution.chunks())

    async def tunnel_wide(self, sql: str = WIDE) -> Transfer:
        return Transfer(**(await self.client.run(sql, POLICY)))


async def latency_case(paths: Paths, pool: SandboxPool, reps: int, progress: Progress) -> Json:
    for warm_up in (paths.local_select, paths.tunnel_select):  # first calls, lazy imports
        await settle(pool)
        await warm_up()
    local: list[float] = []
    tunnel: list[float] = []
    for i in range(reps):
        await settle(pool)
        local.append(await paths.local_select())
        await settle(pool)
        tunnel.append(await paths.tunnel_select())
        if (i + 1) % 10 == 0 or i + 1 == reps:
            progress(f"4a/4b SELECT 42 local vs tunnel: {i + 1}/{reps}")
    local_s, tunnel_s = summarize(local), summarize(tunnel)
    return {
        "select42_local": local_s,
        "select42_tunnel": tunnel_s,
        "added_p50_ms": tunnel_s["median_ms"] - local_s["median_ms"],
        "added_p95_ms": tunnel_s["p95_ms"] - local_s["p95_ms"],
    }


async def throughput_case(paths: Paths, pool: SandboxPool, reps: int, progress: Progress) -> Json:
    samples: dict[str, list[Transfer]] = {"local": [], "tunnel": []}
    for i in range(reps):
        for name, run in (("local", paths.local_wide), ("tunnel", paths.tunnel_wide)):
            await settle(pool)
            before = MachineCpu.now()
            transfer = await run()
            transfer = dataclasses.replace(transfer, cpu=MachineCpu.now().since(before))
            if transfer.rows != WIDE_ROWS:
                raise RuntimeError(f"{name} 10M-row result had {transfer.rows} rows")
            samples[name].append(transfer)
        local, tunnel = samples["local"][-1], samples["tunnel"][-1]
        progress(
            f"4c/4d 10M-row result {i + 1}/{reps}: local {local.bytes / local.seconds / 1e6:.0f}"
            f" MB/s, tunnel {tunnel.bytes / tunnel.seconds / 1e6:.0f} MB/s"
        )
    rows = {name: transfer_summary(transfers) for name, transfers in samples.items()}
    ratio = rows["tunnel"]["mb_per_s"] / rows["local"]["mb_per_s"]
    # The tunnel cannot finish before the machine has done its CPU work on all its cores:
    # tunnel time >= tunnel CPU / cores, which caps the ratio. The CPU counted is the whole
    # machine's, the pool's refill (started by each checkout) included, so this estimate of
    # the cap is low by the refill's share.
    cores = os.cpu_count() or 1
    ceiling = cores * rows["local"]["time"]["median_ms"] / rows["tunnel"]["cpu"]["median_ms"]
    return {
        "wide_local": rows["local"],
        "wide_tunnel": rows["tunnel"],
        "throughput_ratio": ratio,
        "throughput_ratio_cpu_ceiling": ceiling,
        "cores": cores,
    }


def transfer_summary(transfers: list[Transfer]) -> Json:
    """MB/s of the median rep (MB = 10^6 bytes of Arrow IPC stream)."""
    times = summarize([t.seconds for t in transfers])
    size = transfers[0].bytes
    return {
        "time": times,
        "cpu": summarize([t.cpu.busy for t in transfers]),
        "steal": summarize([t.cpu.steal for t in transfers]),
        "first_chunk": summarize([t.first_chunk for t in transfers]),
        "bytes": size,
        "rows": transfers[0].rows,
        "chunks": transfers[0].chunks,
        "mb_per_s": size / (times["median_ms"] / 1000) / 1e6,
    }
