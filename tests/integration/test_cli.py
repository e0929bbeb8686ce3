"""The ``duckcell`` command as a user runs it: output, exit codes, one-line errors, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pyarrow.parquet as pq
import pytest

from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX

from .conftest import containers_of, sandboxes_that_started_a_query

pytestmark = pytest.mark.docker


def _env(image: str, policies_dir: Path, state: Path, launcher_id: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKCELL_")}
    env.update(
        DUCKCELL_IMAGE=image,
        DUCKCELL_POLICIES_DIR=str(policies_dir),
        DUCKCELL_STATE_DIR=str(state),
        DUCKCELL_LAUNCHER_ID=launcher_id,
    )
    env.update(extra)
    return env


def _duckcell(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli_env(image: str, policies_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    state = Path(tmp_path_factory.mktemp("s", numbered=True))
    return _env(image, policies_dir, state, f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-cli")


def test_query_prints_a_table(cli_env: dict) -> None:
    done = _duckcell("query", "SELECT 42 AS answer, 'hi' AS word", env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "answer" in done.stdout and "42" in done.stdout and "(1 row)" in done.stdout


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("csv", '"answer"\n42\n'), ("json", '[{"answer": 42}]\n')],
)
def test_query_formats(cli_env: dict, fmt: str, expected: str) -> None:
    done = _duckcell("query", "--format", fmt, "SELECT 42 AS answer", env=cli_env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


def test_query_parquet_output(cli_env: dict, tmp_path: Path) -> None:
    out = tmp_path / "r.parquet"
    done = _duckcell(
        "query", "--format", "parquet", "--output", str(out), "FROM range(5)", env=cli_env
    )
    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).num_rows == 5


def test_sql_error_exits_1_with_duckdbs_message(cli_env: dict) -> None:
    done = _duckcell("query", "SELECT * FROM no_such_table", env=cli_env)
    assert done.returncode == 1
    assert "Table with name no_such_table does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_policy_is_one_clear_line(cli_env: dict) -> None:
    done = _duckcell("query", "--policy", "nope", "SELECT 1", env=cli_env)
    assert done.returncode == 2
    assert "nope" in done.stderr and "default" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_invalid_policy_yaml_names_file_and_line(cli_env: dict, tmp_path: Path) -> None:
    bad = tmp_path / "policies"
    bad.mkdir()
    (bad / "broken.yaml").write_text(
        "name: broken\nisolation: query\nruntime: runc\nlimits:\n  cpus: 1\n  memory: lots\n"
    )
    done = _duckcell("query", "SELECT 1", env={**cli_env, "DUCKCELL_POLICIES_DIR": str(bad)})
    assert done.returncode == 2
    assert "broken.yaml:6" in done.stderr and "memory" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_missing_image_says_what_to_run(cli_env: dict) -> None:
    env = {**cli_env, "DUCKCELL_IMAGE": "duckcell-no-such-image:nope"}
    done = _duckcell("query", "SELECT 1", env=env)
    assert done.returncode == 2
    assert "duckcell image build" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_no_daemon_says_what_to_run(cli_env: dict, tmp_path: Path) -> None:
    env = {**cli_env, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    done = _duckcell("query", "SELECT 1", env=env)
    assert done.returncode == 2
    assert "Docker engine" in done.stderr and "ensure-docker.sh" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_killed_launcher_leaves_no_sandbox_after_restart(
    cli_env: dict, engine: docker.DockerClient
) -> None:
    """SIGKILL the launcher mid-query: its sandbox is an orphan until the next start reaps it."""
    launcher_id = f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-crash"
    env = {**cli_env, "DUCKCELL_LAUNCHER_ID": launcher_id}
    process = subprocess.Popen(
        [sys.executable, "-m", "launcher.cli", "query", "SELECT sleep_ms(30000)"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Mid-query: the runner logs one line when a query starts.
        deadline = time.monotonic() + 60
        while not _query_started(engine, launcher_id):
            assert process.poll() is None, "launcher exited before its query ran"
            assert time.monotonic() < deadline, "query never started in a sandbox"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert containers_of(engine, launcher_id), "the crash should have left an orphan"
    restarted = _duckcell("query", "SELECT 1", env=env)
    assert restarted.returncode == 0, restarted.stderr
    assert containers_of(engine, launcher_id) == []


def _query_started(engine: docker.DockerClient, launcher_id: str) -> bool:
    return bool(sandboxes_that_started_a_query(engine, launcher_id))


def test_sandboxes_reap_removes_sandbox_directories_of_gone_launchers(cli_env: dict) -> None:
    """A launcher killed with sandboxes up leaves their files directories in the cache."""
    cache = Path(cli_env["DUCKCELL_STATE_DIR"]) / "cache"
    stale = cache / ".sandboxes" / "deadbeefdeadbeef" / "slot1"
    stale.mkdir(parents=True)
    (stale / "linked.parquet").write_bytes(b"PAR1")
    done = _duckcell("sandboxes", "reap", env=cli_env)
    assert done.returncode == 0, done.stderr
    assert "removed the sandbox directories of 1 gone launcher(s)" in done.stdout
    assert not stale.parent.exists()
