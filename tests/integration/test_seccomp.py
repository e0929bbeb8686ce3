"""The seccomp profile in real sandboxes, under runc (`default`) and gVisor (`strict`).

A probe makes the refused calls itself through ctypes ``syscall()`` (x86_64 numbers), as the
sandbox user, so what is checked is the filter a process really has, not the spec. It runs as
the process of a twin of a live sandbox: the engine's own record of the sandbox's HostConfig
(runtime, SecurityOpt with the profile, capabilities, limits) with the probe in the runner's
place. Not through ``docker exec``: gVisor (2022-12) applies the OCI profile to the
container's process and its descendants, where a compromised runner lives, but not to
processes ``runsc exec`` adds (those get no filter at all; only the host's root can add them).
So the live sandbox is checked through ``docker exec`` only for what holds there: its runner,
pid 1, runs under a filter.

Every refused call must fail with EPERM, the profile's answer: without the profile several of
them succeed (io_uring_setup, userfaultfd, keyctl, unshare, ping sockets, inotify, syncfs
under runc; io_uring_setup, unshare, ping sockets, inotify and syncfs under gVisor) and the
rest fail with other errors (ENOSYS, EACCES, ENODEV, ENOTSUP, EAFNOSUPPORT, ...). The probe also
reads its core-file limit, which must be 0 and stay 0. Then a real query runs with two DuckDB
threads and writes Parquet to /scratch, to show the allowlist is enough for the runner.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import docker
import pytest

from launcher.config import LauncherConfig
from launcher.errors import EngineUnavailableError
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.sandbox.backend.docker_engine import DockerBackend
from launcher.sandbox.backend.runtimes import runsc_problem
from launcher.sandbox.backend.seccomp import profile_json

from .conftest import make_config, run, with_launcher

pytestmark = pytest.mark.docker

RUNTIMES = [
    pytest.param("default", "runc", id="runc"),
    pytest.param("strict", "runsc", id="runsc", marks=pytest.mark.runsc),
]
POLICIES = [
    pytest.param("default", id="runc"),
    pytest.param("strict", id="runsc", marks=pytest.mark.runsc),
]

# name: (x86_64 syscall number, arguments). Arguments are harmless: a zeroed buffer, or
# values the kernel would accept, so that a refusal can only come from the filter.
_PROBE = r"""
import ctypes, errno, json, os, platform, resource, subprocess, threading
assert platform.machine() == "x86_64", "the probe's syscall numbers are x86_64's"
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
buf = ctypes.create_string_buffer(4096)
BUF = ctypes.addressof(buf)
FILE = os.open("/tmp/probe", os.O_RDWR | os.O_CREAT, 0o600)  # on the sandbox's tmpfs
CALLS = {
    "io_uring_setup": (425, 4, BUF),
    "io_uring_enter": (426, 0, 0, 0, 0, 0),
    "io_uring_register": (427, 0, 0, 0, 0),
    "userfaultfd": (323, 1),  # UFFD_USER_MODE_ONLY: allowed unprivileged by the kernel
    "keyctl": (250, 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "add_key": (248, BUF, BUF, 0, 0, -3),
    "request_key": (249, BUF, BUF, 0, 0),
    "perf_event_open": (298, BUF, 0, -1, -1, 0),
    "bpf": (321, 0, BUF, 72),
    "unshare(CLONE_NEWUSER)": (272, 0x10000000),
    "unshare(CLONE_NEWNS)": (272, 0x00020000),
    "clone(CLONE_NEWUSER)": (56, 0x10000000 | 17, 0, 0, 0, 0),
    "setns": (308, 0, 0),
    "mount": (165, BUF, BUF, BUF, 0, 0),
    "umount2": (166, BUF, 0),
    "pivot_root": (155, BUF, BUF),
    "fsopen": (430, BUF, 0),
    "fsmount": (432, 0, 0, 0),
    "open_tree": (428, -100, BUF, 0),
    "move_mount": (429, -100, BUF, -100, BUF, 0),
    "ptrace": (101, 0x4206, 1, 0, 0),  # PTRACE_SEIZE the runner
    "process_vm_readv": (310, 1, 0, 0, 0, 0, 0),
    "process_vm_writev": (311, 1, 0, 0, 0, 0, 0),
    "kexec_load": (246, 0, 0, 0, 0),
    "init_module": (175, 0, 0, BUF),
    "reboot": (169, 0, 0, 0, 0),
    "personality(PER_LINUX32)": (135, 0x0008),
    "name_to_handle_at": (303, -100, BUF, BUF, BUF, 0),
    "socket(AF_ALG)": (41, 38, 5, 0),
    "socket(AF_VSOCK)": (41, 40, 1, 0),
    "socket(NETLINK_NETFILTER)": (41, 16, 3, 12),
    "socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)": (41, 2, 2, 1),  # a ping socket
    "socket(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6)": (41, 10, 2, 58),
    "socket(AF_INET, SOCK_DGRAM, IPPROTO_UDPLITE)": (41, 2, 2, 136),
    "socketpair(AF_VSOCK)": (53, 40, 1, 0, BUF),
    "socketpair(AF_NETLINK)": (53, 16, 3, 16, BUF),  # NETLINK_GENERIC
    "inotify_init1": (294, 0),
    "inotify_init": (253,),
    "syncfs": (306, FILE),
    "clone3": (435, BUF, 88),
    # Controls: what the runner needs keeps working.
    "socket(AF_UNIX)": (41, 1, 1, 0),
    "socket(NETLINK_ROUTE)": (41, 16, 3, 0),
    "socket(AF_INET, SOCK_STREAM, IPPROTO_TCP)": (41, 2, 1, 6),
    "socket(AF_INET, SOCK_DGRAM, 0)": (41, 2, 2, 0),
    "socketpair(AF_UNIX)": (53, 1, 1, 0, BUF),
    "fsync": (74, FILE),
    "fdatasync": (75, FILE),
    "getrandom": (318, BUF, 16, 0),
    "memfd_create": (319, BUF, 0),
}
out = {}
for name, (number, *args) in CALLS.items():
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    out[name] = "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
out["thread"] = "ok"
child = os.fork()
if child == 0:
    os._exit(0)
out["fork"] = "ok" if os.waitpid(child, 0)[1] == 0 else "failed"
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
out["seccomp_mode"] = status.get("Seccomp", "absent").strip()
out["RLIMIT_CORE"] = resource.getrlimit(resource.RLIMIT_CORE)
try:
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.RLIM_INFINITY))
    out["raise RLIMIT_CORE"] = "ok"
except ValueError:  # the kernel's EPERM for raising a hard limit
    out["raise RLIMIT_CORE"] = "refused"
# The shell's way in: a user namespace, where the sandbox user would be root.
unshare = subprocess.run(["unshare", "-r", "id"], capture_output=True, text=True)
out["unshare -r"] = "ok" if unshare.returncode == 0 else unshare.stderr.strip().split(": ")[-1]
print(json.dumps(out))
"""

REFUSED = [
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "userfaultfd",
    "keyctl",
    "add_key",
    "request_key",
    "perf_event_open",
    "bpf",
    "unshare(CLONE_NEWUSER)",
    "unshare(CLONE_NEWNS)",
    "clone(CLONE_NEWUSER)",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsmount",
    "open_tree",
    "move_mount",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "init_module",
    "reboot",
    "personality(PER_LINUX32)",
    "name_to_handle_at",
    "socket(AF_ALG)",
    "socket(AF_VSOCK)",
    "socket(NETLINK_NETFILTER)",
    "socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)",
    "socket(AF_INET6, SOCK_DGRAM, IPPROTO_ICMPV6)",
    "socket(AF_INET, SOCK_DGRAM, IPPROTO_UDPLITE)",
    "socketpair(AF_VSOCK)",
    "socketpair(AF_NETLINK)",
    "inotify_init1",
    "inotify_init",
    "syncfs",
]
CONTROLS = [
    "socket(AF_UNIX)",
    "socket(NETLINK_ROUTE)",
    "socket(AF_INET, SOCK_STREAM, IPPROTO_TCP)",
    "socket(AF_INET, SOCK_DGRAM, 0)",
    "socketpair(AF_UNIX)",
    "fsync",
    "fdatasync",
    "getrandom",
    "memfd_create",
]
EXPECTED = {
    **dict.fromkeys(REFUSED, "EPERM"),
    "clone3": "ENOSYS",  # so that glibc falls back to clone, whose flags the filter sees
    **dict.fromkeys(CONTROLS, "ok"),
    "thread": "ok",
    "fork": "ok",
    "seccomp_mode": "2",  # SECCOMP_MODE_FILTER
    "RLIMIT_CORE": [0, 0],  # no core files, and no raising the limit (runc gives [0, -1])
    "raise RLIMIT_CORE": "refused",
    "unshare -r": "Operation not permitted",
}


def _run_twin(engine: docker.DockerClient, attrs: dict, label: str) -> dict:
    """Run the probe in a container made from a sandbox's inspected configuration."""
    host_config = {k: v for k, v in attrs["HostConfig"].items() if k != "Binds"}
    created = engine.api.create_container(
        image=attrs["Config"]["Image"],
        entrypoint=["python3", "-c", _PROBE],
        user=attrs["Config"]["User"],
        name=f"{attrs['Name'].lstrip('/')}-probe",
        labels={"duckcell.launcher": label},
        host_config=host_config,
        network_disabled=True,
    )
    try:
        engine.api.start(created["Id"])
        assert engine.api.wait(created["Id"], timeout=120)["StatusCode"] == 0, engine.api.logs(
            created["Id"]
        ).decode()
        output = engine.api.logs(created["Id"], stdout=True, stderr=False).decode()
        return json.loads(output.strip().splitlines()[-1])
    finally:
        engine.api.remove_container(created["Id"], force=True)


def _probe_sandbox(
    config: LauncherConfig, engine: docker.DockerClient, policy: str
) -> tuple[dict, str, dict]:
    """A live sandbox's inspect output, its runner's seccomp mode, and its twin's probe."""

    async def body(launcher: LocalLauncher) -> tuple[dict, str, dict]:
        pool = await launcher.warm(policy)
        sandbox = await pool.acquire()
        try:
            container = engine.containers.get(sandbox.name)
            runner = container.exec_run(
                ["sh", "-c", "grep ^Seccomp: /proc/1/status"], user="65534:65534"
            )
            assert runner.exit_code == 0, runner.output.decode()
            probe = _run_twin(engine, container.attrs, f"{config.launcher_id}-twin")
            return container.attrs, runner.output.decode().split()[-1], probe
        finally:
            pool.release(sandbox)

    return run(with_launcher(config, body, warm=1))


@pytest.mark.parametrize(("policy", "runtime"), RUNTIMES)
def test_refused_calls_fail_inside_the_sandbox(
    image: str, policies_dir: Path, engine: docker.DockerClient, policy: str, runtime: str
) -> None:
    config = make_config(image, policies_dir)
    attrs, runner_seccomp_mode, probe = _probe_sandbox(config, engine, policy)
    assert attrs["HostConfig"]["Runtime"] == runtime
    assert f"seccomp={profile_json()}" in attrs["HostConfig"]["SecurityOpt"]
    assert runner_seccomp_mode == "2"  # the live runner is filtered (SECCOMP_MODE_FILTER)
    assert probe == EXPECTED


@pytest.fixture
def two_thread_policies(policies_dir: Path, tmp_path: Path) -> Path:
    """The shipped policies with DuckDB on two threads, so the query really runs in parallel."""
    directory = tmp_path / "policies"
    directory.mkdir()
    for source in policies_dir.glob("*.yaml"):
        text = source.read_text()
        if source.stem in ("default", "strict"):
            assert "\n  threads: 1\n" in text, f"{source.name} changed shape"
            text = text.replace("\n  threads: 1\n", "\n  threads: 2\n")
        (directory / source.name).write_text(text)
    return directory


@pytest.mark.parametrize("policy", POLICIES)
def test_a_real_query_runs_under_the_profile(
    image: str, two_thread_policies: Path, policy: str
) -> None:
    config = make_config(image, two_thread_policies)
    sql = """
        COPY (
            SELECT i % 7 AS k, count(*) AS n, sum(i) AS s
            FROM range(3000000) t(i) GROUP BY k
        ) TO '/scratch/groups.parquet' (FORMAT parquet);
        SELECT current_setting('threads') AS threads, count(*) AS groups, sum(n) AS rows,
               sum(s) AS total
        FROM read_parquet('/scratch/groups.parquet')
    """

    async def body(launcher: LocalLauncher) -> list[dict]:
        return (await collect_table(launcher.execute(sql, policy=policy))).to_pylist()

    assert run(with_launcher(config, body)) == [
        {"threads": 2, "groups": 7, "rows": 3_000_000, "total": sum(range(3_000_000))}
    ]


@pytest.mark.runsc
def test_the_engine_registers_runsc_as_the_profile_needs(engine: docker.DockerClient) -> None:
    # What scripts/ensure-docker.sh registers: --oci-seccomp, and --host-uds=create (not all).
    assert runsc_problem(engine.info()["Runtimes"]) is None


def test_runsc_policies_are_refused_on_an_engine_without_oci_seccomp(
    config: LauncherConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The engine's answer is doctored (its own registration is shared with other tests): runsc
    as it was registered before ``--oci-seccomp`` was required. The launcher starts with one
    warning line, a strict query fails with it, and a default (runc) query runs."""

    class WithoutOciSeccomp(DockerBackend):
        async def runtimes(self) -> dict[str, Any]:
            runtimes = dict(await super().runtimes())
            runtimes["runsc"] = {"path": "/usr/bin/runsc", "runtimeArgs": ["--host-uds=all"]}
            return runtimes

    async def body(launcher: LocalLauncher) -> list[dict]:
        with pytest.raises(EngineUnavailableError) as refused:
            await collect_table(launcher.execute("SELECT 1 AS one", policy="strict"))
        assert "runsc policies refused" in str(refused.value)
        assert "--oci-seccomp" in str(refused.value) and "has --host-uds=all" in str(refused.value)
        table = await collect_table(launcher.execute("SELECT 42 AS answer", policy="default"))
        return table.to_pylist()

    with caplog.at_level(logging.WARNING, logger="launcher.sandbox.backend.runtimes"):
        doctored = WithoutOciSeccomp.for_config(config)
        assert run(with_launcher(config, body, backend=doctored)) == [{"answer": 42}]
    [line] = [
        r.getMessage() for r in caplog.records if r.name == "launcher.sandbox.backend.runtimes"
    ]
    assert line.startswith("runsc policies (") and "strict" in line
    assert line.endswith("fix: sudo scripts/ensure-docker.sh")
