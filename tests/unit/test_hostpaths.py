"""Where a containerized worker's sandboxes find their mounts on the engine's host: the
setting's forms, the container id from a mount table, the mount holding each directory (bind
and named volume), the one-line refusals, and the translated binds of a sandbox's config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

from launcher.errors import BackendError
from launcher.sandbox.backend.base import SANDBOX_FILES, SandboxSpec
from launcher.sandbox.backend.docker_engine import RUNNER_DIR, container_config
from launcher.sandbox.backend.paths import EngineMount, EnginePaths
from launcher.worker.hostpaths import (
    HostPathsError,
    own_container_id,
    parse_host_paths,
    place,
    resolve_host_paths,
)

CONTAINER = "3f" * 32
MOUNTINFO = (
    "1210 1190 0:112 / / rw,relatime - overlay overlay rw\n"
    f"1231 1210 8:1 /var/lib/docker/containers/{CONTAINER}/resolv.conf /etc/resolv.conf "
    "rw,relatime - ext4 /dev/sda1 rw\n"
    f"1232 1210 8:1 /var/lib/docker/containers/{CONTAINER}/hostname /etc/hostname rw - ext4\n"
)
STATE = Path("/var/lib/duckcell")
NEEDED = {"state directory": STATE, "cache": STATE / "cache"}


def test_the_setting_reads_none_auto_and_pairs() -> None:
    assert parse_host_paths("none") == ()
    assert parse_host_paths("") == ()
    assert parse_host_paths("auto") is None
    assert parse_host_paths("/var/lib/duckcell=/srv/dc/, /c=/mnt/cache") == (
        ("/var/lib/duckcell", "/srv/dc"),
        ("/c", "/mnt/cache"),
    )
    for bad in ("relative=/srv", "/srv", "/a=b"):
        with pytest.raises(HostPathsError, match="not INSIDE=HOST"):
            parse_host_paths(bad)


def test_the_container_id_comes_from_the_mount_table() -> None:
    assert own_container_id(MOUNTINFO) == CONTAINER
    assert own_container_id("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n") is None


def test_a_named_volume_and_a_bind_mount_are_both_placed_deepest_first() -> None:
    volume = EngineMount("volume", "/var/lib/docker/volumes/p_state/_data", str(STATE), "p_state")
    cache = EngineMount("bind", "/srv/cache", str(STATE / "cache"))
    socket = EngineMount("bind", "/run/docker.sock", "/var/run/docker.sock")
    paths = place(NEEDED, [socket, volume, cache])
    assert paths.pairs == (
        (str(STATE), "/var/lib/docker/volumes/p_state/_data"),
        (str(STATE / "cache"), "/srv/cache"),
    )
    assert paths.engine_path(str(STATE / "run" / "ab12")) == (
        "/var/lib/docker/volumes/p_state/_data/run/ab12"
    )
    assert paths.engine_path(str(STATE / "cache" / ".sandboxes" / "i" / "s")) == (
        "/srv/cache/.sandboxes/i/s"
    )


def test_a_directory_on_no_mount_or_on_tmpfs_is_refused_naming_it() -> None:
    with pytest.raises(HostPathsError) as none:
        place(NEEDED, [EngineMount("bind", "/run/docker.sock", "/var/run/docker.sock")])
    message = str(none.value)
    assert "the state directory /var/lib/duckcell is on no mount" in message
    assert "\n" not in message and "DUCKCELL_HOST_PATHS" in message
    with pytest.raises(HostPathsError, match="cache /var/lib/duckcell/cache is on a tmpfs"):
        place(
            NEEDED,
            [
                EngineMount("volume", "/v/_data", str(STATE), "s"),
                EngineMount("tmpfs", "", str(STATE / "cache")),
            ],
        )


def test_the_engine_path_refuses_a_path_outside_every_pair() -> None:
    paths = EnginePaths(((str(STATE), "/srv/dc"),))
    assert paths.engine_path(str(STATE)) == "/srv/dc"
    with pytest.raises(BackendError, match="/var/lib/duckcellX/run"):
        paths.engine_path("/var/lib/duckcellX/run")
    assert EnginePaths.SAME.engine_path("/anything") == "/anything"


def test_a_sandbox_config_binds_the_engine_paths_and_keeps_its_hardening() -> None:
    api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41")
    spec = SandboxSpec(
        name="duckcell-x-1",
        image="duckcell-sandbox:latest",
        runtime="runc",
        user="65534:65534",
        cpus=1,
        memory_bytes=2**30,
        pids=64,
        scratch_bytes=2**20,
        tmp_bytes=2**20,
        nofile=256,
        files_dir=str(STATE / "cache" / ".sandboxes" / "i" / "s"),
    )
    paths = EnginePaths(((str(STATE), "/srv/dc"),))
    config = container_config(api, spec, STATE / "run" / "s", paths)
    host = config["host_config"]
    assert sorted(host["Binds"]) == sorted(
        [
            f"/srv/dc/run/s:{RUNNER_DIR}:rw",
            f"/srv/dc/cache/.sandboxes/i/s:{SANDBOX_FILES}:ro",
        ]
    )
    assert host["NetworkMode"] == "none" and host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges:true" in host["SecurityOpt"]


def test_explicit_pairs_must_cover_every_directory_at_start() -> None:
    """INSIDE=HOST pairs that leave the cache out stop the worker at start, naming it, rather
    than failing every query later; pairs that cover both are taken as given."""
    needed = {"state directory": Path("/var/lib/duckcell"), "cache": Path("/cache")}
    no_engine = None  # explicit pairs never inspect the container
    state_only = "/var/lib/duckcell=/srv/state"
    with pytest.raises(HostPathsError, match="the cache /cache is under none"):
        asyncio.run(resolve_host_paths(state_only, needed, no_engine, ""))  # type: ignore[arg-type]
    both = "/var/lib/duckcell=/srv/state,/cache=/srv/cache"
    paths = asyncio.run(resolve_host_paths(both, needed, no_engine, ""))  # type: ignore[arg-type]
    assert paths.engine_path("/cache/objects") == "/srv/cache/objects"
