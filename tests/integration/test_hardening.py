"""Every hardening promise, read back from the engine and checked from inside a sandbox.

The container spec is inspected through the engine API (what Docker will enforce), then a
probe runs inside a live sandbox with ``docker exec`` as the sandbox user (what the process
actually gets): capabilities, no-new-privileges, network interfaces, read-only root, tmpfs
size cap, read-only cache, user id, and an environment without credentials.
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from launcher.cli import allocator
from launcher.config import LauncherConfig
from launcher.errors import SqlError
from launcher.executor import collect_table
from launcher.host import LocalLauncher

from .conftest import make_config, run, with_launcher

pytestmark = pytest.mark.docker

_PROBE = r"""
import json, os, resource, socket
out = {}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
out["cap_eff"] = status["CapEff"].strip()
out["no_new_privs"] = status.get("NoNewPrivs", "absent").strip()  # gVisor omits it
out["uid"] = os.getuid()
out["interfaces"] = sorted(os.listdir("/sys/class/net"))
def writable(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return True
    except OSError:
        return False
out["root_writable"] = writable("/probe")
out["cache_writable"] = writable("/cache/files/probe")
out["scratch_writable"] = writable("/scratch/probe")
st = os.statvfs("/scratch")
out["scratch_bytes"] = st.f_blocks * st.f_frsize
out["env_keys"] = sorted(os.environ)
out["max_processes"] = str(resource.getrlimit(resource.RLIMIT_NPROC)[1])
out["core_limit"] = list(resource.getrlimit(resource.RLIMIT_CORE))
try:  # gVisor has no such file: it has no ICMP sockets for unprivileged users to configure
    out["ping_group_range"] = open("/proc/sys/net/ipv4/ping_group_range").read().split()
except FileNotFoundError:
    out["ping_group_range"] = None
out["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
try:
    socket.create_connection(("1.1.1.1", 53), timeout=1)
    out["network"] = "reachable"
except OSError as e:
    out["network"] = type(e).__name__
print(json.dumps(out))
"""


def _inspect_live_sandbox(
    config: LauncherConfig, engine: docker.DockerClient, policy: str
) -> tuple[dict, dict]:
    async def body(launcher: LocalLauncher) -> tuple[dict, dict]:
        pool = await launcher.warm(policy)
        sandbox = await pool.acquire()
        try:
            container = engine.containers.get(sandbox.name)
            attrs = container.attrs
            result = container.exec_run(["python3", "-c", _PROBE], user="65534:65534")
            assert result.exit_code == 0, result.output.decode()
            return attrs, json.loads(result.output.decode().strip().splitlines()[-1])
        finally:
            pool.release(sandbox)

    return run(with_launcher(config, body, warm=1))


def test_container_spec_has_every_hardening_flag(
    image: str, policies_dir: Path, engine: docker.DockerClient, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)  # writable by uid 65534 on the host: only the :ro mount can refuse
    config = make_config(image, policies_dir, cache_dir=cache)
    attrs, probe = _inspect_live_sandbox(config, engine, "default")
    host = attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert attrs["Config"]["User"] == "65534:65534"
    assert host["PidsLimit"] == 128
    assert host["Memory"] == 1024**3
    assert host["MemorySwap"] == 1024**3
    assert host["NanoCpus"] == 1_000_000_000
    for mount in ("/scratch", "/tmp"):
        assert "size=" in host["Tmpfs"][mount] and "noexec" in host["Tmpfs"][mount]
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]} == {
        "nofile": (1024, 1024),
        "core": (0, 0),  # no core files, not even raised by the runner
    }
    assert host["Sysctls"] == {"net.ipv4.ping_group_range": "1 0"}  # no ICMP sockets
    assert host["Runtime"] == "runc"
    binds = {b.split(":")[1]: b for b in host["Binds"]}
    assert binds["/cache/files"].endswith(":ro")  # the sandbox's own files, never the cache
    assert binds["/cache/files"].split(":")[0].startswith(str(cache / ".sandboxes"))
    labels = attrs["Config"]["Labels"]
    assert labels["duckcell.launcher"] == config.launcher_id
    assert labels["duckcell.policy"] == "default"
    assert labels["duckcell.query"]

    # What the process inside really gets.
    assert probe["cap_eff"] == "0000000000000000"
    assert probe["no_new_privs"] == "1"
    assert probe["core_limit"] == [0, 0]
    assert probe["ping_group_range"] == ["1", "0"]  # Docker's own default is "0 2147483647"
    assert probe["uid"] == 65534
    assert probe["interfaces"] == ["lo"]
    assert probe["network"] != "reachable"
    assert probe["root_writable"] is False
    assert probe["cache_writable"] is False
    assert probe["scratch_writable"] is True
    assert probe["scratch_bytes"] == 1024**3  # policy default: scratch 1GiB
    secretish = [k for k in probe["env_keys"] if any(w in k for w in ("KEY", "SECRET", "TOKEN"))]
    assert secretish == []
    # Not a hardening flag: the image's allocator settings, the values the launcher applies.
    assert probe["malloc_env"] == allocator.ENVIRONMENT


@pytest.mark.runsc
def test_strict_policy_runs_under_gvisor(
    config: LauncherConfig, engine: docker.DockerClient
) -> None:
    """strict.yaml uses runtime runsc: the container runs in gVisor and still answers."""
    attrs, probe = _inspect_live_sandbox(config, engine, "strict")
    assert attrs["HostConfig"]["Runtime"] == "runsc"
    assert attrs["HostConfig"]["ReadonlyRootfs"] is True
    # The policy's 128 pids are the query's, counted by gVisor (RLIMIT_NPROC); the cgroup
    # keeps a backstop that leaves room for gVisor's own threads (launcher.sandbox.spec).
    assert {u["Name"]: u["Hard"] for u in attrs["HostConfig"]["Ulimits"]}["nproc"] == 128
    assert attrs["HostConfig"]["PidsLimit"] == 128 * 8 + 64
    assert probe["max_processes"] == "128"
    assert {u["Name"]: u["Hard"] for u in attrs["HostConfig"]["Ulimits"]}["core"] == 0
    assert probe["core_limit"] == [0, 0]
    assert probe["cap_eff"] == "0000000000000000"
    assert probe["uid"] == 65534
    assert probe["network"] != "reachable"
    assert probe["root_writable"] is False

    async def body(launcher: LocalLauncher) -> None:
        table = await collect_table(launcher.execute("SELECT 6 * 7 AS answer", policy="strict"))
        assert table.to_pylist() == [{"answer": 42}]
        with pytest.raises(SqlError, match="Permission Error"):
            await collect_table(
                launcher.execute("SELECT * FROM read_text('/etc/passwd')", policy="strict")
            )

    run(with_launcher(config, body))
