"""A runner that lies, in a real container: the worker checks and counts every result itself.

The image is the real sandbox image with its runner swapped for ``hostile/hostile_runner.py``;
the launcher starts it like any sandbox. Each attack must end as a clear error, with the
sandbox destroyed and nothing of the bad result passed on (issue 16, items 2 and 3).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from launcher.errors import ResultLimitError, RunnerInvalidError, SqlError
from launcher.executor import collect_table
from launcher.host import LocalLauncher
from launcher.sandbox.runner_client import MAX_MESSAGE_CHARS, TRUNCATED
from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX

from .conftest import containers_of, make_config, run, with_launcher

pytestmark = pytest.mark.docker

HOSTILE = Path(__file__).parent / "hostile"
# 1,000 rows and 1 MiB at most: the `limits` attack sends 7,000 rows.
_SMALL = """\
name: small-results
isolation: query
runtime: runc
limits: {cpus: 1, memory: 256MiB, pids: 128, statement_timeout: 10s,
         max_result_rows: 1000, max_result_bytes: 1MiB}
duckdb: {threads: 1, memory_limit: 128MiB}
pool: {warm: 0}
"""


@pytest.fixture(scope="module")
def hostile_image(image: str, engine: docker.DockerClient) -> Iterator[str]:
    tag = f"duckcell-hostile-test:{uuid.uuid4().hex[:8]}"
    engine.images.build(path=str(HOSTILE), tag=tag, buildargs={"BASE": image}, rm=True)
    yield tag
    engine.images.remove(tag, force=True)


@pytest.fixture
def small_policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "small-results.yaml").write_text(_SMALL)
    return directory


@pytest.mark.parametrize(
    ("attack", "error", "words"),
    [
        ("offsets", RunnerInvalidError, "runner sent an invalid result"),
        ("lie", RunnerInvalidError, "runner sent an invalid result"),
        ("trailing", RunnerInvalidError, "runner sent an invalid result"),
        ("truncated", RunnerInvalidError, "runner sent an invalid result"),
        ("limits", ResultLimitError, "1000"),
        ("dictionaries", RunnerInvalidError, "more than 1 record batch without rows"),
        ("null-rows", RunnerInvalidError, "of 2147483647 rows"),
        ("extension", RunnerInvalidError, "arrow.py_extension_type"),
        ("statement-type", RunnerInvalidError, "a statement type of"),
        ("output", RunnerInvalidError, "an output file no query asked for"),
        ("long-failure", SqlError, "^Parser Error: \\[2J\\]0;pwned x+… \\(truncated\\)$"),
    ],
)
def test_a_lying_runner_is_stopped_by_the_worker(
    hostile_image: str,
    small_policies: Path,
    engine: docker.DockerClient,
    attack: str,
    error: type[Exception],
    words: str,
) -> None:
    config = make_config(hostile_image, small_policies)

    async def body(launcher: LocalLauncher) -> None:
        policy = launcher.policies.get("small-results")
        honest = launcher.executor.execute("honest", policy=policy)
        assert (await collect_table(honest)).to_pylist() == [{"x": 0}]
        execution = launcher.executor.execute(attack, policy=policy)
        with pytest.raises(error, match=words) as caught:
            await collect_table(execution)
        # Whatever the runner sent, the error is a bounded line a terminal can print.
        message = str(caught.value)
        assert len(message) <= MAX_MESSAGE_CHARS + len(TRUNCATED)
        assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in message), repr(message)

    run(with_launcher(config, body))
    assert containers_of(engine, config.launcher_id) == []


def test_the_cli_prints_one_line_and_no_foreign_memory(
    hostile_image: str, small_policies: Path, tmp_path: Path
) -> None:
    """The bad-offsets batch once made `duckcell query --format json` print 64 KB of the
    launcher's heap; now it never reaches the decoder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUCKCELL_")}
    env.update(
        DUCKCELL_IMAGE=hostile_image,
        DUCKCELL_POLICIES_DIR=str(small_policies),
        DUCKCELL_STATE_DIR=str(tmp_path / "state"),
        DUCKCELL_LAUNCHER_ID=f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-hostile",
    )
    command = ["query", "--policy", "small-results", "--format", "json", "offsets"]
    done = subprocess.run(
        [sys.executable, "-m", "launcher.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    # The error, and before it the warning every worker logs for a possible compromise.
    *logged, error = done.stderr.strip().splitlines()
    assert error.startswith("duckcell: error: runner sent an invalid result"), done.stderr
    assert len(logged) == 1 and "possible sandbox compromise" in logged[0], done.stderr
    assert "Traceback" not in done.stderr
