"""A compromised runner, played by ``docker exec`` as the sandbox user: what the kernel denies it.

Each test runs code as uid 65534 inside a live sandbox, started exactly as the launcher starts
it, under runc (policy ``default``) and gVisor (``strict``), and asserts what the process can
reach whatever DuckDB would allow (issue 16): other sandboxes' cached files, the cache itself,
the runner's socket directory on the host's disk, and the host's container log.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import docker
import pytest

from launcher.host import LocalLauncher
from launcher.model.catalog import Binding
from launcher.sandbox.spec import Sandbox

from .conftest import make_config, run, with_launcher

pytestmark = pytest.mark.docker

POLICIES = ["default", "strict"]  # runc, runsc

_LOOK = r"""
import json, os
def listing(path):
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        return type(e).__name__
def readable(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode()
    except OSError as e:
        return type(e).__name__
out = {
    "cache": listing("/cache"),
    "files": listing("/cache/files"),
    "objects": listing("/cache/objects"),
    "mine": {name: readable("/cache/files/" + name) for name in listing("/cache/files")}
        if isinstance(listing("/cache/files"), list) else {},
}
print(json.dumps(out))
"""

_SOCKET_DIR = r"""
import json, os
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = type(e).__name__
def write():
    with open("/run/duckcell/blob", "wb") as f:
        f.write(b"x" * 1024 * 1024)
attempt("write", write)
attempt("rename", lambda: os.rename("/run/duckcell/runner.sock", "/run/duckcell/old.sock"))
attempt("unlink", lambda: os.unlink("/run/duckcell/runner.sock"))
attempt("symlink", lambda: os.symlink("/var/run/docker.sock", "/run/duckcell/other.sock"))
attempt("mkdir", lambda: os.mkdir("/run/duckcell/d"))
print(json.dumps(out))
"""

_LOG_FLOOD = r"""
import os
line = b"x" * 1023 + b"\n"
with open("/proc/1/fd/1", "wb", buffering=0) as out:
    for _ in range(8 * 1024):  # 8 MiB
        out.write(line)
    out.write(b"flood-done\n")
"""


def _exec(engine: docker.DockerClient, sandbox: Sandbox, code: str) -> dict:
    result = engine.containers.get(sandbox.name).exec_run(
        ["python3", "-c", code], user="65534:65534"
    )
    assert result.exit_code == 0, result.output.decode()
    return json.loads(result.output.decode().strip().splitlines()[-1])


def _entry(cache: Path, name: str, text: str) -> Binding:
    """A cache entry as the cache writes it (objects/<shard>/<name>), bound as a table."""
    path = cache / "objects" / name[:2] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o640)
    if os.geteuid() == 0:
        os.chown(path, 0, 65534)
    return Binding(name.split(".")[0], "csv", (f"/cache/objects/{name[:2]}/{name}",))


@pytest.mark.parametrize("policy", POLICIES)
def test_a_sandbox_sees_only_its_own_files(
    image: str, policies_dir: Path, engine: docker.DockerClient, tmp_path: Path, policy: str
) -> None:
    """Two sandboxes of one host, each given one tenant's file: neither can list, read or
    guess the other's, nor see the cache (no ``/cache/objects``), as the sandbox user with
    arbitrary code, not through DuckDB."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    config = make_config(image, policies_dir, cache_dir=cache)
    alice = _entry(cache, "aa11.csv", "alice-secret\n")
    bob = _entry(cache, "bb22.csv", "bob-secret\n")

    async def body(launcher: LocalLauncher) -> tuple[dict, dict]:
        pool = await launcher.warm(policy)
        first, second = await pool.acquire(), await pool.acquire()
        try:
            assert first.files is not None and second.files is not None
            first.files.link((alice,))
            second.files.link((bob,))
            return _exec(engine, first, _LOOK), _exec(engine, second, _LOOK)
        finally:
            pool.release(first)
            pool.release(second)

    seen_by_alice, seen_by_bob = run(with_launcher(config, body, warm=0))
    assert seen_by_alice["files"] == ["aa11.csv"]
    assert seen_by_alice["mine"] == {"aa11.csv": "alice-secret\n"}
    assert seen_by_bob["files"] == ["bb22.csv"]
    assert seen_by_bob["mine"] == {"bb22.csv": "bob-secret\n"}
    for seen in (seen_by_alice, seen_by_bob):
        assert seen["cache"] == ["files"]  # the image's empty /cache, and the one mount
        assert seen["objects"] == "FileNotFoundError"
    # On the host: nobody but root and the sandbox's group reads an entry, and nobody but
    # the launcher passes through the cache root.
    entry = cache / "objects" / "aa" / "aa11.csv"
    if os.geteuid() == 0:
        assert stat.S_IMODE(entry.stat().st_mode) & 0o007 == 0
    assert not any((cache / ".sandboxes").rglob("*.csv"))  # links go with their sandboxes


@pytest.mark.parametrize("policy", POLICIES)
def test_the_runner_socket_directory_is_sealed(
    image: str, policies_dir: Path, engine: docker.DockerClient, policy: str
) -> None:
    """Once the runner is ready the sandbox can no longer write where its socket is: no
    file on the host's disk, no swapped socket for the launcher to dial."""
    config = make_config(image, policies_dir)

    async def body(launcher: LocalLauncher) -> tuple[dict, str, int]:
        pool = await launcher.warm(policy)
        sandbox = await pool.acquire()
        try:
            tried = _exec(engine, sandbox, _SOCKET_DIR)
            socket_dir = Path(sandbox.handle.runner_target.removeprefix("unix://")).parent
            info = os.stat(socket_dir)
            entries = sorted(os.listdir(socket_dir))
            # The sealed sandbox still answers on the socket it made.
            stream = sandbox.client.execute(
                query_id="q", sql="SELECT 42 AS x", timeout_s=10, max_rows=None, max_bytes=None
            )
            assert [item async for item in stream]  # IPC, then a summary
            return tried, " ".join(entries), stat.S_IMODE(info.st_mode) | (info.st_uid << 12)
        finally:
            pool.release(sandbox)

    tried, entries, mode_and_uid = run(with_launcher(config, body, warm=0))
    assert tried == {
        "write": "PermissionError",
        "rename": "PermissionError",
        "unlink": "PermissionError",
        "symlink": "PermissionError",
        "mkdir": "PermissionError",
    }
    assert entries == "runner.sock"
    assert mode_and_uid & 0o777 == 0o555
    if os.geteuid() == 0:
        assert mode_and_uid >> 12 == 0  # root's


@pytest.mark.parametrize("policy", POLICIES)
def test_the_container_log_is_capped(
    image: str, policies_dir: Path, engine: docker.DockerClient, policy: str
) -> None:
    """8 MiB written to the runner's stdout leaves at most about 1 MiB of log on the host."""
    config = make_config(image, policies_dir)

    async def body(launcher: LocalLauncher) -> tuple[dict, int]:
        pool = await launcher.warm(policy)
        sandbox = await pool.acquire()
        try:
            container = engine.containers.get(sandbox.name)
            result = container.exec_run(["python3", "-c", _LOG_FLOOD], user="65534:65534")
            assert result.exit_code == 0, result.output.decode()
            # Wait on state: the log driver has copied the last line written.
            copied = any(b"flood-done" in container.logs(tail=1) for _ in range(1000))
            assert copied, "the log driver never copied the last line"
            log_config = container.attrs["HostConfig"]["LogConfig"]
            return log_config, os.path.getsize(container.attrs["LogPath"])
        finally:
            pool.release(sandbox)

    log_config, size = run(with_launcher(config, body, warm=0))
    assert log_config == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "1"}}
    # json-file wraps each line in JSON (about +80 bytes a line) and rotates past 1 MiB.
    assert size < 2 * 1024 * 1024
