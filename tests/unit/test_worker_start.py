"""`duckcell worker` at start: enrollment from a token (file, environment, Docker secret) when
the state holds no identity, none when it does, and one-line refusals; the state directory's
write check; the health file the compose health check reads. Real TLS against an in-thread
control plane (tests/support/controlplane.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from launcher.cli.worker import Health, identity_at_start, require_writable
from launcher.errors import ControlPlaneError, DuckcellError, UsedTokenError
from tests.support.controlplane import ControlPlane
from tests.support.waiting import eventually, run


def _start(cp: ControlPlane, state: Path, **kwargs: object) -> object:
    async def scenario() -> object:
        if cp.server is None:
            await cp.start()
        options: dict[str, object] = {
            "token_file": None,
            "address": cp.listen,
            "name": "compose-worker",
            "env": {},
            "secret_file": state.parent / "no-secret",
        }
        options.update(kwargs)
        return await identity_at_start(state, **options)  # type: ignore[arg-type]

    return asyncio.run(scenario())


def test_a_token_enrolls_once_and_a_restart_keeps_the_identity(
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    token = control_plane.data.tokens().create()
    state = tmp_path / "state"
    first = _start(control_plane, state, env={"DUCKCELL_ENROLL_TOKEN": token})
    # The same (now used) token again: the identity is there, so it is not even sent.
    again = _start(control_plane, state, env={"DUCKCELL_ENROLL_TOKEN": token})
    assert again == first
    assert first.name == "compose-worker"  # type: ignore[attr-defined]


def test_the_token_comes_from_a_file_or_a_docker_secret(
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    file = tmp_path / "token"
    file.write_text(control_plane.data.tokens().create() + "\n")
    by_file = _start(control_plane, tmp_path / "a", token_file=file, name="a")
    secret = tmp_path / "secret"
    secret.write_text(control_plane.data.tokens().create())
    by_secret = _start(control_plane, tmp_path / "b", secret_file=secret, name="b")
    assert by_file.worker_id != by_secret.worker_id  # type: ignore[attr-defined]


def test_a_used_token_without_an_identity_is_one_line_that_says_what_to_do(
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    token = control_plane.data.tokens().create()
    _start(control_plane, tmp_path / "first", env={"DUCKCELL_ENROLL_TOKEN": token}, name="x")
    with pytest.raises(UsedTokenError) as used:
        _start(control_plane, tmp_path / "second", env={"DUCKCELL_ENROLL_TOKEN": token})
    message = str(used.value)
    assert message.startswith("enrollment at start failed: ")
    assert "new token" in message and "\n" not in message and token not in message
    assert not (tmp_path / "second" / "identity").exists()


def test_no_token_no_identity_and_a_token_without_an_address_are_refused(
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    with pytest.raises(ControlPlaneError, match=r"no enrollment token.*DUCKCELL_ENROLL_TOKEN"):
        _start(control_plane, tmp_path / "s")
    with pytest.raises(DuckcellError, match="pass --enroll-address"):
        _start(control_plane, tmp_path / "s", env={"DUCKCELL_ENROLL_TOKEN": "t"}, address=None)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(DuckcellError, match="is empty"):
        _start(control_plane, tmp_path / "s", token_file=empty)


def test_a_state_directory_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(DuckcellError, match=r"is not writable .*: mount a writable volume"):
        require_writable(blocked / "state", "state directory")
    require_writable(tmp_path / "fine", "state directory")
    assert (tmp_path / "fine").is_dir() and not list((tmp_path / "fine").iterdir())


def test_the_health_file_forgets_a_killed_worker_and_follows_the_tunnel(tmp_path: Path) -> None:
    path = tmp_path / "health"
    path.write_text("connected\n")  # what a worker killed while connected leaves
    health = Health(path)
    assert path.read_text() == "starting\n"

    async def scenario() -> None:
        connected = asyncio.Event()
        follower = asyncio.create_task(health.follow(connected))
        await eventually(lambda: path.read_text() == "disconnected\n", "disconnected")
        connected.set()
        await eventually(lambda: path.read_text() == "connected\n", "connected")
        follower.cancel()
        health.write("stopped")

    run(scenario)
    assert path.read_text() == "stopped\n"
